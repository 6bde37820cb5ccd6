"""Resuming through the Trainer across pipeline and expert-parallel sizes: a PP=2 run's checkpoint resumes at
PP=1 with EP=2, a PP=1 x EP=2 run's at PP=2 (EP=1), each equal to the uninterrupted run of its own layout, and
a PP=2 run's checkpoint exports as the same weights saved by one process.

On 2 gloo ranks, 4 blocks (the first dense), 4 experts, the expert balance loss and the loss-free bias on, fp32,
global batch 8 in micro-batches of 2 (PP=1 x EP=2: 2 data-parallel ranks accumulating 2 each; PP=2: one
pipeline of 4), 4 steps with a checkpoint at step 2. A resumed run trains steps 3-4 from the other layout's
step-2 checkpoint; its losses of steps 3-4 and its final parameters, loss-free biases and AdamW state (per
global expert) must equal its own layout's uninterrupted run (fp32 tolerance: the two layouts reduce in
another order, so their step-2 states differ in the last bits).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moetrain.config import TrainConfig, from_dict, to_dict
from moetrain.train.checkpoint import model_entries, optimizer_entries
from tests.conftest import tiny_train_config
from tests.helpers import spawned
from tests.helpers.distributed import merged
from tests.helpers.exported import assert_export_equals_one_process

pytestmark = pytest.mark.parity

STEPS, SAVED = 4, 2
RUNS = {"pp2": (2, 1), "pp1_ep2": (1, 2)}
"""The uninterrupted 2-rank runs: name -> (parallel.pp, parallel.ep)."""
RESUMES = [("pp1_ep2", "pp2"), ("pp2", "pp1_ep2")]
"""(resumed run's layout, the run whose step-2 checkpoint it starts from)."""


def resume_config(root: Path) -> TrainConfig:
    cfg = tiny_train_config(root, max_steps=STEPS, global_batch_size=8, micro_batch_size=2, eval_at_start=False)
    cfg.model.n_layers = 4
    cfg.data.seq_len = 16
    cfg.trainer.eval_every = 0
    cfg.trainer.precision = "fp32"
    cfg.optim.warmup_steps, cfg.optim.lr = 2, 3e-3
    cfg.moe.balance.expert_coef = 0.01
    cfg.moe.router.bias_update_rate = 1e-2
    cfg.checkpoint.every, cfg.checkpoint.keep_last = SAVED, 0
    return cfg


def shared_config(rank: int, root: Path, name: str) -> TrainConfig:
    """:func:`resume_config` made by rank 0 alone (it writes the corpus), with ``name``'s layout."""
    box = [to_dict(resume_config(root)) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    cfg = from_dict(box[0])
    cfg.parallel.pp, cfg.parallel.ep = RUNS[name]
    return cfg


def state(trainer: Any) -> dict[str, torch.Tensor]:
    """This rank's parameters, buffers and AdamW state as checkpoint entries (global names, one per global
    expert), copied; the union over the ranks is the run's whole state."""
    entries = {**model_entries(trainer.model), **optimizer_entries(trainer.model, trainer.optimizer)}
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in entries.items()}


def fit(cfg: TrainConfig, run_dir: Path, rank: int) -> dict[str, Any]:
    from moetrain.parallel import init_parallel
    from moetrain.train.trainer import Trainer

    trainer = Trainer(cfg, run_dir, init_parallel(cfg.parallel, "cpu", num_experts=cfg.moe.num_experts))
    trainer.fit()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if rank == 0 else []
    losses = {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}
    out = {"state": state(trainer), "losses": losses, "step": trainer.step}
    trainer.close()
    return {**out, "run_dir": str(run_dir)}


def _straight(rank: int, world: int, tmp: str, name: str) -> dict[str, Any]:
    root = Path(tmp) / "pp_resume"
    return fit(shared_config(rank, root, name), root / name, rank)


def _resume(rank: int, world: int, tmp: str, name: str, source: str) -> dict[str, Any]:
    root = Path(tmp) / "pp_resume"
    cfg = shared_config(rank, root, name)
    cfg.trainer.resume = str(root / source / "checkpoints" / f"step_{SAVED:06d}")
    cfg.checkpoint.enabled = False
    return fit(cfg, root / f"{name}_from_{source}", rank)


for _name in RUNS:
    spawned.register(2, f"pp_resume/{_name}", functools.partial(_straight, name=_name))
for _run, _source in RESUMES:
    spawned.register(2, f"pp_resume/{_run}<-{_source}", functools.partial(_resume, name=_run, source=_source))


@pytest.mark.parametrize(("run", "source"), RESUMES)
def test_resume_across_pipeline_and_expert_sizes_equals_the_uninterrupted_run(run: str, source: str) -> None:
    """Catches a resume across layouts that loads a stage's tensors into the wrong place, misses a stage's
    optimizer state or loss-free biases, or restarts the LR schedule or the data: PP=2 -> PP=1 x EP=2 and
    PP=1 x EP=2 -> PP=2, the losses of steps 3-4 and every final tensor as the uninterrupted run's."""
    resumed, straight = spawned.result(2, f"pp_resume/{run}<-{source}"), spawned.result(2, f"pp_resume/{run}")
    what = f"{run} from {source}"
    got_losses, ref_losses = resumed[0]["losses"], straight[0]["losses"]
    assert sorted(got_losses) == list(range(SAVED + 1, STEPS + 1)), what
    for step, loss in got_losses.items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), f"{what}: step {step}"
    assert all(r["step"] == STEPS for r in resumed), what
    got, ref = merged(resumed, "state"), merged(straight, "state")
    assert got.keys() == ref.keys(), f"{what}: {sorted(got.keys() ^ ref.keys())[:4]}"
    assert any(k.endswith("expert_bias") for k in got) and any(".experts." in k and "exp_avg_sq" in k for k in got)
    for key, value in ref.items():
        # each tensor to 1e-4 of its own scale: AdamW's second moments are ~1e-8, a fixed atol would pass anything
        atol = 1e-4 * float(value.abs().max()) if value.is_floating_point() and value.numel() else 0.0
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=atol, msg=f"{what}: {key}")


def test_a_pp2_runs_checkpoint_exports_as_its_weights_saved_by_one_process(tmp_path: Path) -> None:
    """Catches ``moetrain-export`` of a PP=2 run's checkpoint missing or misplacing a stage's tensors: equal,
    tensor for tensor, to the export of the run's final weights put into one whole model."""
    ranks = spawned.result(2, "pp_resume/pp2")
    full = merged(ranks, "state")
    flat = {k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")}
    ckpt = Path(ranks[0]["run_dir"]) / "checkpoints" / f"step_{STEPS:06d}"
    assert json.loads((ckpt / "meta.json").read_text())["pp"] == 2
    assert_export_equals_one_process(ckpt, flat, tmp_path)
