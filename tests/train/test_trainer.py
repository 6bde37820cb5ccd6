"""The trainer: gradient accumulation invariance, seed determinism, and the CLI end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from moetrain.train.trainer import Trainer
from tests.conftest import local_losses, tiny_train_config
from tests.helpers.wandb_records import read_wandb_history


def grads_for(tmp_path, micro: int, batch: torch.Tensor, **moe_balance) -> tuple[float, dict[str, torch.Tensor]]:
    cfg = tiny_train_config(tmp_path, micro_batch_size=micro)
    for k, v in moe_balance.items():
        setattr(cfg.moe.balance, k, v)
    trainer = Trainer(cfg, tmp_path / f"run{micro}")
    lm_sum, aux_sum, n = local_losses(trainer.forward_backward(batch))
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
    return ((lm_sum + aux_sum) / n).item(), grads


@pytest.mark.parity
def test_one_two_or_four_micro_batches_give_the_same_loss_and_gradients(tmp_path):
    """Per-token losses (LM, router z-loss) are exactly invariant to the accumulation split."""
    cfg = tiny_train_config(tmp_path)
    batch = Trainer(cfg, tmp_path / "probe").loader.next_batch()
    ref_loss, ref = grads_for(tmp_path, 8, batch, expert_coef=0.0, z_loss_coef=1e-3)
    for micro in (4, 2):
        loss, grads = grads_for(tmp_path, micro, batch, expert_coef=0.0, z_loss_coef=1e-3)
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parity
def test_same_seed_same_loss_curve_and_other_seed_differs(tmp_path):
    def curve(seed: int, name: str) -> list[float]:
        cfg = tiny_train_config(tmp_path, seed=seed)
        trainer = Trainer(cfg, tmp_path / name)
        return [trainer.train_step(trainer.loader.next_batch()).loss.item() for _ in range(3)]

    a, b, c = curve(0, "a"), curve(0, "b"), curve(1, "c")
    assert a == b
    assert a != c


@pytest.mark.e2e
def test_cli_default_corpus_writes_metrics_and_wandb_offline_and_loss_decreases(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "MOETRAIN_CACHE": str(tmp_path / "cache"), "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    env.pop("WANDB_MODE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moetrain.train",
            "experiment=smoke",
            "trainer.max_steps=30",
            "trainer.log_every=5",
            "trainer.eval_every=15",
            "optim.lr=3e-3",
            f"run_dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "config.yaml").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in val] == [0, 15, 30]
    for key in ("train/aux_loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec", "perf/mfu", "moe/maxvio"):
        assert all(math.isfinite(r[key]) for r in train), key
    layer_keys = [k for k in train[-1] if k.startswith("moe/layer_") and k.endswith("/load")]
    assert layer_keys == ["moe/layer_1/load"]
    load = train[-1]["moe/layer_1/load"]
    assert len(load) == 8 and sum(load) == 8 * 64 * 2  # global batch x seq_len x top_k, dropless
    mean = sum(load) / 8
    assert train[-1]["moe/layer_1/maxvio"] == pytest.approx((max(load) - mean) / mean)
    for key in ("val/ppl", "val/maxvio_global", "val/layer_1/maxvio_global"):
        assert key in val[-1]
    assert val[-1]["val/ppl"] == pytest.approx(math.exp(val[-1]["val/loss"]), rel=1e-6)
    assert train[-1]["train/loss"] < train[0]["train/loss"] - 0.3
    assert val[-1]["val/loss"] < val[0]["val/loss"]

    history = read_wandb_history(run_dir)
    logged = [h for h in history if "moe/layer_1/load" in h]
    assert [h["_step"] for h in logged] == [5, 10, 15, 20, 25, 30]
    assert logged[-1]["moe/layer_1/load"] == load
    assert logged[-1]["moe/layer_1/maxvio"] == pytest.approx(train[-1]["moe/layer_1/maxvio"])
    pictures = [h for h in history if "moe/load_by_layer/_type" in h]  # one heatmap of all layers per log step
    assert [h["_step"] for h in pictures] == [5, 10, 15, 20, 25, 30]
    assert pictures[0]["moe/load_by_layer/_type"] == "image-file"
    assert not any("load_chart" in key for h in history for key in h)  # no table + bar chart per layer
    assert [h["_step"] for h in history if "val/loss" in h] == [0, 15, 30]
    assert any("val/maxvio_global" in h for h in history)
    heatmaps = [h for h in history if "moe/load_heatmap/_type" in h]  # the load heatmap image, at evaluations
    assert [h["_step"] for h in heatmaps] == [15, 30] and heatmaps[0]["moe/load_heatmap/_type"] == "image-file"
