"""DeepSpeed with an expert-data-parallel group of two ranks (4 ranks, EP=2 x DP=2) against the native engine.

``test_deepspeed.py`` runs EP=2 on 2 ranks, where each expert shard has one
copy and ZeRO's expert partitioning (DeepSpeed's ``expert_data_parallel``
groups, the expert gradients' all-reduce over them) never runs. Here every
shard has two copies: ZeRO-2 must average the expert gradients over the EDP
pair with the scale that makes EP x DP equal one process, as the native engine
does (``parallel/data_parallel.py``), and clip by the same global norm.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from moetrain.config import validate
from tests.conftest import tiny_train_config
from tests.helpers.distributed import run_distributed
from tests.helpers.step_grads import assert_updates_close, linear_adamw_step

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs the deepspeed extra"),
]

STEPS = 4


def _worker(rank: int, world: int, cfg: Any, tmp: str) -> dict[str, Any]:
    from moetrain.parallel import init_parallel
    from moetrain.train.checkpoint.sharded import local_tensor
    from moetrain.train.cli import make_trainer

    out: dict[str, Any] = {}
    for name, engine, probe in (
        ("native", "native", False),
        ("zero2", "deepspeed", False),
        ("native_probe", "native", True),
        ("zero2_probe", "deepspeed", True),
    ):
        c = linear_adamw_step(cfg) if probe else copy.deepcopy(cfg)
        c.engine.name, c.engine.zero_stage = engine, 2
        validate(c, world_size=world)
        trainer = make_trainer(c, Path(tmp) / name, init_parallel(c.parallel, "cpu", num_experts=c.moe.num_experts))
        try:
            before = {n: local_tensor(p).detach().float().clone() for n, p in trainer.model.named_parameters()}
            trainer.fit()
            after = {n: local_tensor(p).detach().float().clone() for n, p in trainer.model.named_parameters()}
            out[name] = {n: after[n] - before[n] for n in after} if probe else after
        finally:
            trainer.close()
    return out


def test_deepspeed_zero2_with_two_expert_data_parallel_ranks_tracks_the_native_engine(tmp_path):
    cfg = tiny_train_config(tmp_path, max_steps=STEPS, micro_batch_size=2, eval_at_start=False, eval_every=0)
    cfg.parallel.ep = 2
    cfg.moe.num_experts = 4
    cfg.data.max_val_sequences = 4
    cfg.optim.grad_clip = 0.5  # active: the global norm counts each expert shard once, not once per EDP copy
    cfg.optim.warmup_steps = 1
    cfg.optim.lr = 3e-3
    # Adam divides by sqrt(v) + eps: a gradient that is ~0 by cancellation (an embedding row whose positions'
    # gradients cancel) turns the engines' different reduction orders into an update of up to lr (a flaky
    # mismatch of embed.weight, seen once). eps 1e-6 bounds that amplification; real gradients are far larger.
    cfg.optim.eps = 1e-6
    cfg.checkpoint.enabled = False
    ranks = run_distributed(_worker, 4, cfg, str(tmp_path), timeout=900)

    def curve(name: str, key: str) -> list[float]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [r[key] for r in map(json.loads, lines) if key in r]

    native, ds = curve("native", "train/loss"), curve("zero2", "train/loss")
    assert len(native) == len(ds) == STEPS
    assert ds == pytest.approx(native, rel=2e-5, abs=1e-6)
    gn_native, gn_ds = curve("native", "train/grad_norm"), curve("zero2", "train/grad_norm")
    assert min(gn_native) > cfg.optim.grad_clip and gn_ds == pytest.approx(gn_native, rel=1e-4)
    for rank, out in enumerate(ranks):  # each rank's expert shard and replicated weights end equal
        for n, p in out["native"].items():
            torch.testing.assert_close(out["zero2"][n], p, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {n}")
    for rank, out in enumerate(ranks):  # a linear step's update ~ the gradient: catches a wrong reduction scale
        assert_updates_close(out["zero2_probe"], out["native_probe"], f"rank {rank}")
    for a, b in ((0, 2), (1, 3)):  # the two copies of each expert shard (EDP pairs) stay identical
        for n, p in ranks[a]["zero2"].items():
            if ".experts." in n:
                assert torch.equal(p, ranks[b]["zero2"][n]), n
