"""scripts/replicate.py: every run it would launch is a valid config, and its summary statistics."""

from __future__ import annotations

import importlib.util
import json
import math
from argparse import Namespace
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "replicate.py"


def load_replicate():
    spec = importlib.util.spec_from_file_location("replicate", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RUNS = [(study, name) for study, strategies in load_replicate().STUDIES.items() for name in strategies]


@pytest.mark.parametrize(("study", "name"), RUNS)
def test_every_replication_run_composes_and_validates(study, name):
    """The overrides each (study, strategy) passes to moetrain-train, as the script passes them (M = 1 with
    groups too small for top-K, say, fails here and not after an hour of other runs)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moetrain.config import validate
    from moetrain.train.cli import config_dir

    rep = load_replicate()
    args = Namespace(steps=rep.STEPS[study], log_every=5, threads=1)
    cmd = rep.train_command(
        [*rep.SETUP, *rep.STUDIES[study][name], f"trainer.num_threads={args.threads}", "trainer.seed=0"],
        args.steps,
        args.log_every,
        Path("unused"),
        [],
    )
    overrides = [a for a in cmd[3:] if not a.startswith(("run_dir=", "logger="))]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=overrides))
    validate(cfg)
    assert (cfg.data.seq_len, cfg.trainer.global_batch_size) == (128, 8)
    if study == "balancing":
        assert cfg.trainer.micro_batch_size == 2  # 4 micro-batches, so global_batch's scope differs
        assert (cfg.moe.balance.scope == "global") == (name == "global_batch")
    else:
        assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.router.num_groups) == (32, 4, 8)
        assert cfg.moe.router.topk_groups == {"unrestricted": None, "m1": 1, "m2": 2, "m3": 3}[name]


def test_aggregate_and_table(tmp_path):
    rep = load_replicate()
    per_seed = []
    for seed, (loss, dpt) in enumerate([(2.0, 1.0), (2.2, 1.2)]):
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        rows = [
            {"step": s, "train/loss": 3.0, "moe/maxvio": 0.1 * s, "perf/tokens_per_sec": 1.0}
            | {f"moe/layer_{i}/devices_per_token": dpt + (i - 1) * 0.5 for i in (1, 2)}
            for s in range(1, 11)
        ]
        rows.append({"step": 10, "val/loss": loss, "val/maxvio_global": 0.3})
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        per_seed.append(rep.summarise_run(run))
    assert per_seed[0]["devices_per_token"] == pytest.approx(1.25)  # layers 1.0 and 1.5, last 20% of steps
    agg = rep.aggregate(per_seed)
    assert agg["val_loss"][0] == pytest.approx(2.1) and agg["val_loss"][1] == pytest.approx(math.sqrt(0.02))
    assert agg["maxvio_mean"][0] == pytest.approx(0.55) and agg["maxvio_tail"][0] == pytest.approx(0.95)
    assert agg["devices_per_token"][0] == pytest.approx(1.35)
    assert agg["maxvio_curve"][2] == (pytest.approx(0.3), 0.0) and agg["seeds"] == 2
    text = rep.table("device_limited", {"m1": agg}, Namespace(steps=10, seeds=[0, 1], log_every=1))
    assert "| m1 | 2 | 2.1000 ± 0.1414 | 0.300 ± 0.000 | 0.550 ± 0.000 | 0.950 ± 0.000 | 1.35 ± 0.14 |" in text


def test_paired_deltas_use_the_seeds_both_strategies_have():
    rep = load_replicate()
    runs = {
        "ref": {0: {"val_loss": 2.0}, 1: {"val_loss": 2.4}, 2: {"val_loss": 2.1}},
        "b": {0: {"val_loss": 2.1}, 1: {"val_loss": 2.5}},  # seed 2 not finished
    }
    results = {"ref": {}, "b": {}}
    rep.add_paired_deltas(results, runs, "ref")
    assert "val_loss_delta" not in results["ref"]
    assert results["b"]["val_loss_delta"] == (pytest.approx(0.1), pytest.approx(0.0, abs=1e-12))
