"""Resharding continues training exactly: an EP=4 checkpoint loaded into EP=2 and into one process.

``test_checkpoint.py`` compares logits after a reshard, which sees only the
weights. Training on shows the rest: per-expert AdamW moments mapped to the
wrong expert, a wrong step count (bias correction), scheduler or loader state
all change the next steps. The EP=4 run trains 5 steps (checkpoint at step 2);
EP=2 (x DP=2, on the same 4 ranks) and one process resume from step 2 and train
3 more. Every run splits the global batch of 8 into the same four groups of 2
(ranks x micro-batches), so the micro-batch balance loss is the same everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from moetrain.config import TrainConfig, from_dict, to_dict
from moetrain.train.checkpoint import model_entries, optimizer_entries
from moetrain.train.checkpoint.sharded import local_tensor
from moetrain.train.trainer import Trainer
from tests.conftest import tiny_train_config
from tests.helpers import spawned
from tests.helpers.distributed import merged

pytestmark = pytest.mark.parity

STEPS, SAVED = 5, 2


def reshard_config(root: Path) -> TrainConfig:
    cfg = tiny_train_config(root, max_steps=STEPS, micro_batch_size=2, eval_at_start=False, eval_every=0)
    cfg.model.first_k_dense = 0
    cfg.optim.warmup_steps = 2
    cfg.optim.lr = 3e-3
    cfg.moe.router.bias_update_rate = 1e-3
    cfg.data.max_val_sequences = 4
    cfg.checkpoint.every = SAVED
    cfg.checkpoint.keep_last = 0
    return cfg


def state(trainer: Trainer) -> dict[str, Any]:
    """Everything that decides the next step, keyed by global expert index (the same for every EP size); a
    replicated DTensor entry (the native engine's ``replicate`` units) as its local tensor, the whole one."""
    entries = {**model_entries(trainer.model), **optimizer_entries(trainer.model, trainer.optimizer)}
    tensors = {k: local_tensor(v).detach().clone() for k, v in entries.items()}
    return {
        "tensors": tensors,
        "loader": trainer.loader.state_dict(),
        "step": trainer.step,
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "scheduler_epoch": trainer.module.scheduler.last_epoch,
    }


def train_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


def fit(cfg: TrainConfig, run_dir: Path, pc: Any = None, rank: int = 0) -> dict[str, Any]:
    trainer = Trainer(cfg, run_dir, pc)
    trainer.fit()
    out = state(trainer)
    out["losses"] = train_losses(run_dir) if rank == 0 else {}
    return out


def _ep4_then_ep2(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """EP=4 for 5 steps (checkpoints at 2, 4, 5), then EP=2 x DP=2 resumed from step 2 for 3 steps."""
    from moetrain.parallel.context import init_parallel

    root = Path(tmp) / "reshard"
    box = [to_dict(reshard_config(root)) if rank == 0 else None]  # rank 0 alone writes the corpus
    dist.broadcast_object_list(box, src=0)
    cfg = from_dict(box[0])
    cfg.parallel.ep = 4
    original = fit(cfg, root / "ep4", init_parallel(cfg.parallel, "cpu", cfg.moe.num_experts), rank)
    ckpt = root / "ep4" / "checkpoints" / f"step_{SAVED:06d}"
    cfg.trainer.resume = str(ckpt)
    cfg.checkpoint.enabled = False
    cfg.parallel.ep = 2
    resumed = fit(cfg, root / "ep2", init_parallel(cfg.parallel, "cpu", cfg.moe.num_experts), rank)
    return {"original": original, "ep2": resumed, "cfg": to_dict(cfg)}


spawned.register(4, "reshard/ep4_then_ep2", _ep4_then_ep2)


def test_ep4_checkpoint_continues_in_ep2_and_one_process_like_the_original(tmp_path):
    reports = spawned.result(4, "reshard/ep4_then_ep2")
    original = [r["original"] for r in reports]
    ref = merged(original, "tensors")
    ref_losses = original[0]["losses"]
    assert sorted(ref_losses) == list(range(1, STEPS + 1))

    cfg = from_dict(reports[0]["cfg"])  # resume from the EP=4 step-2 checkpoint
    cfg.parallel.ep = 1
    cfg.trainer.num_threads = 1
    one = [fit(cfg, tmp_path / "one")]

    for name, runs in (("EP=2", [r["ep2"] for r in reports]), ("one process", one)):
        got_losses = runs[0]["losses"]
        assert sorted(got_losses) == list(range(SAVED + 1, STEPS + 1)), name
        for step, loss in got_losses.items():
            assert loss == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), f"{name}: step {step}"
        for r in runs:
            assert r["loader"] == original[0]["loader"], name
            assert r["step"] == STEPS and r["scheduler_epoch"] == original[0]["scheduler_epoch"], name
            assert r["lr"] == pytest.approx(original[0]["lr"], rel=1e-12), name
        got = merged(runs, "tensors")
        assert got.keys() == ref.keys(), name
        assert any(".experts." in k and "exp_avg_sq" in k for k in got)  # per-expert moments are compared
        for k, v in ref.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-7, msg=f"{name}: {k}")
