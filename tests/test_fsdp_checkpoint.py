"""FSDP checkpoints are the same checkpoints: saved with ``parallel.fsdp=true`` they resume with or without FSDP,
on another world and EP size, and export alike; saved without FSDP they resume with it.

Every run trains the same global batches (8 sequences a step, micro-batches of 2, so the micro-batch balance loss
is the same everywhere) for 5 steps, with a checkpoint at step 2. On 2 gloo ranks: FSDP with EP=1 (the routed
experts are DTensors over EDP=2, 2 rows a rank) and EP=2 (EDP=1: plain experts; its step-2 checkpoint is written
asynchronously while step 3 runs), and both without FSDP. A resumed run trains steps 3-5 from one of those
step-2 checkpoints; it must equal the uninterrupted run of its own config: the losses of steps 3-5, every
parameter and AdamW's moments and steps, all keyed per global expert (fp32 tolerance: FSDP reduces in another
order). A 4-rank FSDP EP=2 x DP=2 checkpoint (experts over EDP=2, one row a rank) resumes on 2 ranks with EP=1.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from moetrain.config import TrainConfig, from_dict, to_dict
from moetrain.train.checkpoint import model_entries, optimizer_entries
from moetrain.train.trainer import Trainer
from tests import spawned
from tests.conftest import tiny_train_config
from tests.distributed import run_distributed

pytestmark = pytest.mark.parity

STEPS, SAVED = 5, 2
RUNS = {"fsdp_ep1": (True, 1), "fsdp_ep2": (True, 2), "plain_ep1": (False, 1), "plain_ep2": (False, 2)}
"""The uninterrupted 2-rank runs: name -> (parallel.fsdp, parallel.ep)."""
ASYNC = "fsdp_ep2"
"""The run whose checkpoints are written in the background."""
RESUMES = [("fsdp_ep1", "fsdp_ep1"), ("fsdp_ep2", ASYNC), ("plain_ep2", "fsdp_ep1"), ("plain_ep1", "fsdp_ep2")]
RESUMES += [("fsdp_ep1", "plain_ep2")]
"""(resumed run's config, the run whose step-2 checkpoint it starts from), on 2 ranks."""


def ckpt_config(root: Path) -> TrainConfig:
    """Warmup + cosine LR, loss-free bias on, a dense layer and a shared expert (more DTensors to shard)."""
    cfg = tiny_train_config(root, max_steps=STEPS, micro_batch_size=2, eval_at_start=False, eval_every=0)
    cfg.trainer.precision = "fp32"
    cfg.optim.warmup_steps = 2
    cfg.optim.lr = 3e-3
    cfg.moe.router.bias_update_rate = 1e-3
    cfg.data.max_val_sequences = 4
    cfg.checkpoint.every = SAVED
    cfg.checkpoint.keep_last = 0
    return cfg


def shared_config(rank: int, root: Path, build: Any = ckpt_config) -> TrainConfig:
    """``build(root)`` made by rank 0 alone (it writes the corpus) and given to every rank."""
    box = [to_dict(build(root)) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return from_dict(box[0])


def run_config(cfg: TrainConfig, name: str) -> TrainConfig:
    out = copy.deepcopy(cfg)
    out.parallel.fsdp, out.parallel.ep = RUNS[name]
    return out


def gathered(entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint entries as plain tensors: DTensors gathered whole (a test's view; checkpoints never do this),
    expert rows as this rank holds them."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in entries.items()}


def state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter, buffer and AdamW state, keyed per global expert (the same for every layout)."""
    return gathered({**model_entries(trainer.model), **optimizer_entries(trainer.model, trainer.optimizer)})


def fit(cfg: TrainConfig, run_dir: Path, pc: Any = None, rank: int = 0) -> dict[str, Any]:
    """Train to ``trainer.max_steps``; the final state, the logged losses (rank 0) and where checkpoints are."""
    trainer = Trainer(cfg, run_dir, pc)
    trainer.fit()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if rank == 0 else []
    losses = {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}
    out = {"state": state(trainer), "losses": losses, "step": trainer.step, "cfg": to_dict(cfg)}
    trainer.close()
    return {**out, "ckpt": str(run_dir / "checkpoints" / f"step_{SAVED:06d}")}


def _init(cfg: TrainConfig) -> Any:
    from moetrain.parallel.context import init_parallel

    return init_parallel(cfg.parallel, "cpu", cfg.moe.num_experts)


# ------------------------------------------------------------------ the ranks' side
def _straight(rank: int, world: int, tmp: str, name: str, async_save: bool = False) -> dict[str, Any]:
    """The uninterrupted run ``name`` (checkpoints at steps 2, 4, 5)."""
    root = Path(tmp) / "fsdp_ckpt"
    cfg = run_config(shared_config(rank, root), name)
    cfg.checkpoint.async_save = async_save
    return fit(cfg, root / name, _init(cfg), rank)


def _resume(rank: int, world: int, tmp: str, name: str, source: str) -> dict[str, Any]:
    """Run ``name`` from the step-2 checkpoint of the 2-rank run ``source`` (same spawn, same corpus)."""
    root = Path(tmp) / "fsdp_ckpt"
    cfg = run_config(shared_config(rank, root), name)
    cfg.trainer.resume = str(root / source / "checkpoints" / f"step_{SAVED:06d}")
    cfg.checkpoint.enabled = False
    return fit(cfg, root / f"{name}_from_{source}", _init(cfg), rank)


def _resume_from(rank: int, world: int, ckpt: str, cfg_dict: dict[str, Any], name: str, run_dir: str) -> Any:
    """Run ``name`` (the saving run's config otherwise) from ``ckpt``."""
    cfg = run_config(from_dict(cfg_dict), name)
    cfg.trainer.resume, cfg.checkpoint.enabled = ckpt, False
    return fit(cfg, Path(run_dir), _init(cfg), rank)


for _name in RUNS:
    spawned.register(2, f"fsdp_ckpt/{_name}", functools.partial(_straight, name=_name, async_save=_name == ASYNC))
for _run, _source in RESUMES:
    spawned.register(2, f"fsdp_ckpt/{_run}<-{_source}", functools.partial(_resume, name=_run, source=_source))
spawned.register(4, "fsdp_ckpt/ep2xdp2", functools.partial(_straight, name="fsdp_ep2"))


# ----------------------------------------------------------------- the comparisons
def merged(per_rank: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The union of the ranks' entries; an entry several ranks hold must agree bitwise."""
    full: dict[str, torch.Tensor] = {}
    for r in per_rank:
        for k, v in r["state"].items():
            if k in full:
                assert torch.equal(full[k], v), f"ranks disagree on {k}"
            full[k] = v
    return full


def assert_continues(runs: list[dict[str, Any]], refs: list[dict[str, Any]], what: str) -> None:
    """``runs`` (resumed at step 2) equal the uninterrupted ``refs``: losses of steps 3-5, every tensor."""
    got_losses, ref_losses = runs[0]["losses"], refs[0]["losses"]
    assert sorted(got_losses) == list(range(SAVED + 1, STEPS + 1)), what
    for step, loss in got_losses.items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), f"{what}: step {step}"
    assert all(r["step"] == STEPS for r in runs), what
    got, ref = merged(runs), merged(refs)
    assert got.keys() == ref.keys(), f"{what}: {sorted(got.keys() ^ ref.keys())[:4]}"
    assert any(".experts." in k and k.endswith("exp_avg_sq") for k in got)  # per-expert moments are compared
    for k, v in ref.items():
        # each tensor to 1e-4 of its own scale: AdamW's second moments are ~1e-8, a fixed atol would pass anything
        atol = 1e-4 * float(v.abs().max()) if v.is_floating_point() and v.numel() else 0.0
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=atol, msg=f"{what}: {k}")


@pytest.mark.parametrize(("run", "source"), RESUMES)
def test_checkpoint_resumes_on_two_ranks_with_or_without_fsdp(run, source):
    """FSDP -> FSDP (EP=1 and EP=2, the latter saved asynchronously), FSDP -> without (EP 1 -> 2 and
    2 -> 1), and without FSDP -> FSDP (EP 2 -> 1)."""
    resumed = spawned.result(2, f"fsdp_ckpt/{run}<-{source}")
    assert_continues(resumed, spawned.result(2, f"fsdp_ckpt/{run}"), f"{run} from {source}")


@pytest.mark.parametrize("source", ["fsdp_ep1", "fsdp_ep2"])
def test_fsdp_checkpoint_resumes_in_one_process(tmp_path, source):
    saved = spawned.result(2, f"fsdp_ckpt/{source}")
    cfg = from_dict(saved[0]["cfg"])  # the spawn's corpus
    cfg.parallel.fsdp, cfg.parallel.ep, cfg.trainer.num_threads = False, 1, 1
    straight = fit(cfg, tmp_path / "straight")
    cfg.trainer.resume, cfg.checkpoint.enabled = saved[0]["ckpt"], False
    assert_continues([fit(cfg, tmp_path / "resumed")], [straight], f"one process from {source}")


def test_four_rank_fsdp_checkpoint_resumes_on_two_ranks_with_another_ep():
    """Saved by FSDP EP=2 x DP=2 (experts over EDP=2), resumed by FSDP EP=1 on 2 ranks (experts over EDP=2, two
    rows a rank): world and EP size both change. The 2-rank resume needs a spawn of its own (after the save)."""
    saved = spawned.result(4, "fsdp_ckpt/ep2xdp2")
    run_dir = str(Path(saved[0]["ckpt"]).parents[2] / "fsdp_ep1_from_4")
    resumed = run_distributed(_resume_from, 2, saved[0]["ckpt"], saved[0]["cfg"], "fsdp_ep1", run_dir)
    assert_continues(resumed, spawned.result(2, "fsdp_ckpt/fsdp_ep1"), "FSDP EP=1 on 2 from FSDP EP=2 x DP=2 on 4")
    assert_continues(resumed, saved, "the 4-rank run itself")
