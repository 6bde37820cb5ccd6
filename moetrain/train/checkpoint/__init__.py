"""Sharded, atomic, resharding checkpoints, by concern.

* :mod:`~moetrain.train.checkpoint.layout`: directory names, ``meta.json``, checksums, atomic publish, pruning;
* :mod:`~moetrain.train.checkpoint.entries`: the native state as flat entries, experts by global index;
* :mod:`~moetrain.train.checkpoint.sharded`: FSDP's DTensors as entries, each rank its own shard;
* :mod:`~moetrain.train.checkpoint.reading`: safe reading (restricted unpickler, every check before a copy);
* :mod:`~moetrain.train.checkpoint.compat`: whether a checkpoint fits this run (engine, architecture, config);
* :mod:`~moetrain.train.checkpoint.native`: the native engine's DCP files;
* :mod:`~moetrain.train.checkpoint.manager`: when to save, publishing, resuming, over the stateful parts.

DeepSpeed's files are defined in :mod:`moetrain.train.deepspeed.checkpoint`; loading only the weights of
either engine's checkpoint (export, inference) is :func:`moetrain.train.weights.load_model_weights`.
"""

from moetrain.train.checkpoint.compat import arch_of, check_arch, flat_config, resume_target
from moetrain.train.checkpoint.entries import model_entries, optimizer_entries
from moetrain.train.checkpoint.layout import (
    FORMAT_VERSION,
    META_FILE,
    CheckpointError,
    checkpoint_name,
    complete_checkpoints,
    hash_share,
    latest_checkpoint,
    read_meta,
    resolve_checkpoint,
    truncate_metrics,
    verify_checkpoint,
)
from moetrain.train.checkpoint.manager import CheckpointManager
from moetrain.train.checkpoint.reading import read_entries

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "CheckpointError",
    "CheckpointManager",
    "arch_of",
    "check_arch",
    "checkpoint_name",
    "complete_checkpoints",
    "flat_config",
    "hash_share",
    "latest_checkpoint",
    "model_entries",
    "optimizer_entries",
    "read_entries",
    "read_meta",
    "resolve_checkpoint",
    "resume_target",
    "truncate_metrics",
    "verify_checkpoint",
]
