"""Structured configuration: the one source of truth for every key.

The schema is in :mod:`.model` (``model.*``, ``moe.*``) and :mod:`.run` (everything else, the root
:class:`TrainConfig`), the rules in :mod:`.validate`; this package re-exports all of them.

Hydra only composes YAML values on top of these dataclasses (registered as the
schema of ``configs/train.yaml``); the entry point converts the composed config
once with ``OmegaConf.to_object`` and calls :func:`validate`, so nothing below
the entry point ever sees a ``DictConfig``.

Every field has its documentation next to its default. Cross-field rules live in
:func:`validate`, which raises :class:`ConfigError` with one line naming the key,
its value and the rule, before any model or data is built.
"""

from moetrain.config.errors import ConfigError
from moetrain.config.model import (
    BalanceConfig,
    ModelConfig,
    MoEConfig,
    RopeScalingConfig,
    RouterConfig,
    resolve_num_groups,
)
from moetrain.config.run import (
    CheckpointConfig,
    DataConfig,
    EngineConfig,
    LoggerConfig,
    OptimConfig,
    ParallelConfig,
    SourceConfig,
    TrainConfig,
    TrainerConfig,
    WandbConfig,
    config_keys,
    from_dict,
    to_dict,
)
from moetrain.config.validate import (
    BACKENDS,
    BALANCE_SCOPES,
    DEVICES,
    ENGINES,
    EXPERT_FORMS,
    GROUP_SCORES,
    HASH_TABLES,
    NONFINITE_POLICIES,
    PRECISIONS,
    RECV_OVERFLOWS,
    SCORE_FNS,
    WANDB_MODES,
    ZERO_STAGES,
    ep_layout_error,
    float_values,
    validate,
    validate_engine,
)
from moetrain.config.world import default_threads, micro_batch_for, with_micro_batch

__all__ = [
    "BACKENDS",
    "BALANCE_SCOPES",
    "DEVICES",
    "ENGINES",
    "EXPERT_FORMS",
    "GROUP_SCORES",
    "HASH_TABLES",
    "NONFINITE_POLICIES",
    "PRECISIONS",
    "RECV_OVERFLOWS",
    "SCORE_FNS",
    "WANDB_MODES",
    "ZERO_STAGES",
    "BalanceConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "LoggerConfig",
    "MoEConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RopeScalingConfig",
    "RouterConfig",
    "SourceConfig",
    "TrainConfig",
    "TrainerConfig",
    "WandbConfig",
    "config_keys",
    "default_threads",
    "ep_layout_error",
    "float_values",
    "from_dict",
    "micro_batch_for",
    "resolve_num_groups",
    "to_dict",
    "validate",
    "validate_engine",
    "with_micro_batch",
]
