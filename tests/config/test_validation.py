"""Config validation: every bad value stops with one line naming the key, before any work."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moetrain.config import ConfigError, TrainConfig, from_dict, to_dict, validate
from moetrain.train.cli import config_dir

pytestmark = pytest.mark.unit


def cfg_with(**changes) -> TrainConfig:
    cfg = TrainConfig()
    for dotted, value in changes.items():
        obj = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, leaf, value)
    return cfg


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model__dim": 250}, "model.dim=250: must be divisible by model.n_heads=8"),
        ({"model__n_kv_heads": 3}, "model.n_kv_heads=3: must divide model.n_heads=8"),
        ({"moe__top_k": 9}, "moe.top_k=9: must be <= moe.num_experts=8"),
        ({"model__first_k_dense": 7}, "model.first_k_dense=7: must be in [0, model.n_layers=4]"),
        (
            {"trainer__global_batch_size": 12, "trainer__micro_batch_size": 16},
            "trainer.global_batch_size=12: must be divisible by trainer.micro_batch_size=16",
        ),
        ({"moe__router__score_fn": "relu"}, "moe.router.score_fn='relu': must be one of softmax, sigmoid"),
        ({"moe__router__dtype": "fp16"}, "moe.router.dtype='fp16': must be one of fp32, bf16"),
        (
            {"moe__router__topk_groups": 5, "moe__router__num_groups": 4},
            "moe.router.topk_groups=5: must be <= the number of groups (4)",
        ),
        ({"moe__router__num_groups": 3}, "moe.router.num_groups=3: must divide moe.num_experts=8"),
        ({"optim__lr": -1.0}, "optim.lr=-1.0: must be > 0"),
        ({"data__val_fraction": 1.5}, "data.val_fraction=1.5: must be in (0, 1)"),
        ({"parallel__ep": 3}, "parallel.ep=3: must divide the world size (1 rank)"),
        ({"logger__wandb__mode": "sometimes"}, "logger.wandb.mode='sometimes': must be one of"),
    ],
)
def test_bad_values_name_the_key_and_rule(changes, message):
    with pytest.raises(ConfigError) as err:
        validate(cfg_with(**changes))
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_defaults_are_valid_and_roundtrip_through_dict():
    cfg = validate(TrainConfig())
    assert from_dict(to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict({"model": {"dimm": 3}})


def test_hydra_composes_the_schema_and_groups():
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        dcfg = compose("train", overrides=["trainer.max_steps=7", "model.dim=128", "experiment=smoke"])
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, TrainConfig)
    assert cfg.trainer.max_steps == 7  # command-line overrides win over the experiment preset
    assert cfg.model.dim == 128
    assert cfg.model.n_layers == 2  # ... which sets what they leave alone
    validate(cfg)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        dcfg = compose("train", overrides=["trainer.max_steps=7"])
    assert OmegaConf.to_object(dcfg).trainer.max_steps == 7


def test_unknown_key_is_rejected_by_the_schema():
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"), pytest.raises(Exception, match="dimm"):
        compose("train", overrides=["model.dimm=3"])


def test_cli_bad_value_exits_with_one_line_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "moetrain.train", "model.dim=250", f"run_dir={tmp_path / 'run'}", "logger=none"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["moetrain: config error: model.dim=250: must be divisible by model.n_heads=8"]
    assert not (tmp_path / "run").exists()


COMPOSE_CASES = [
    [],
    ["experiment=smoke"],
    ["model=small", "moe=deepseek_v2", "parallel.ep=2", "optim.lr=1e-3", "trainer.micro_batch_size=8"],
    ["moe=deepseek_v3", "logger=none", "data.source=files", "data.paths=[a.txt,b.txt]", "moe.router.num_groups=null"],
    ["experiment=smoke", "moe=hash", "trainer.max_steps=3", "moe.balance.expert_coef=0", "model.dim=96"],
    ["moe=switch", "trainer.resume_allow_changes=[optim.lr]", "trainer.precision=bf16", "data.tokenizer='gpt2'"],
    # a model preset's own defaults pick the routing preset unless the command line picks one
    ["model=deepseek_v3", "moe.top_k=6"],
    ["model=deepseek_v2_tiny", "moe=default", "experiment=smoke"],
    ["model=deepseek_v2_lite"],
]


@pytest.mark.parametrize("overrides", COMPOSE_CASES)
def test_composition_without_hydra_equals_hydras(overrides):
    """``compose_without_hydra`` (the GPU check's benchmarks, on a machine without hydra-core) builds the config
    Hydra builds, key for key and type for type (bugs caught: a group file merged at the wrong package, the
    experiment applied before ``train.yaml``'s own keys, ``1e-3`` read as a string, an int left where the schema
    has a float)."""
    from moetrain.config.compose import compose_without_hydra
    from moetrain.config.docs import composed_defaults
    from moetrain.train.checkpoint.compat import flat_config

    ours, hydras = (
        flat_config(to_dict(compose_without_hydra(overrides))),
        flat_config(to_dict(composed_defaults(overrides))),
    )
    assert ours == hydras
    assert {k: type(v) for k, v in ours.items()} == {k: type(v) for k, v in hydras.items()}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.dimm=3", "model.dimm: unknown key"),
        ("model=huge", "model=huge: no such option"),
        ("+model.dim=3", "only key=value"),
        ("model.dim.x=3", "model.dim.x: unknown key"),
    ],
)
def test_composition_without_hydra_names_a_bad_override(override, message):
    """A bad override stops with one line naming it, as under Hydra."""
    from moetrain.config.compose import compose_without_hydra

    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        compose_without_hydra([override])
