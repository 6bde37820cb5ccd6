"""MLA and multi-token prediction under parallelism, on 2 gloo ranks: expert parallelism (EP=2) equals one
process, loss and every gradient; FSDP with EP=2, activation checkpointing, regional compile and gradient
accumulation equals the plain EP=2 run step for step."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from moetrain.config import ModelConfig, MoEConfig, ParallelConfig, RouterConfig
from moetrain.data import rank_slice
from moetrain.model import build_model
from moetrain.model.mtp import mtp_loss
from moetrain.parallel import init_parallel
from moetrain.train.step import lm_loss
from tests.conftest import tiny_train_config
from tests.helpers.distributed import run_distributed
from tests.helpers.ep_parity import assert_grads_equal_reference, ep_model

pytestmark = pytest.mark.parity

V, S, B, N = 64, 16, 8, 4
MODEL = ModelConfig(
    dim=32, n_layers=2, n_heads=4, ffn_hidden_size=48, first_k_dense=0, attention="mla", q_lora_rank=12, mtp_depth=2
)
MOE = MoEConfig(num_experts=N, top_k=2, expert_hidden_size=16, router=RouterConfig(score_fn="sigmoid"))


def _loss(model: torch.nn.Module, mb: torch.Tensor) -> torch.Tensor:
    out = model(mb[:, :-1])
    return lm_loss(out.logits, mb[:, 1:]) + out.aux_loss + mtp_loss(out.mtp_logits, mb[:, 1:], out.mtp_lambda)[0]


def _ep_parity(rank: int, world: int) -> dict[str, Any]:
    """EP=2 on this rank's half of the batch against one process running both halves as micro-batches."""
    pc = init_parallel(ParallelConfig(ep=2), "cpu", num_experts=N)
    ref = build_model(MODEL, MOE, V, S, ep=2, seed=0)
    assert len(ref.moe_layers()) == 4  # 2 main + 2 MTP blocks, all MoE: their experts are sharded too
    model = ep_model(ref, pc)  # experts sharded, gradients reduced in the backward by FSDP2's replicate units
    batch = torch.randint(0, V, (B, S + 1), generator=torch.Generator().manual_seed(1))
    ref_loss = torch.zeros(())
    for r in range(world):
        loss = _loss(ref, rank_slice(batch, r, world))
        (loss / world).backward()
        ref_loss += loss.detach() / world
    loss = _loss(model, rank_slice(batch, rank, world))
    loss.backward()
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)
    torch.testing.assert_close(global_loss / world, ref_loss, rtol=1e-6, atol=1e-7)
    return {"max_grad_diff": assert_grads_equal_reference(model, ref, pc, "mla+mtp")}


def _train(rank: int, world: int, tmp: str, fsdp: bool) -> dict[str, Any]:
    """3 steps of an MLA + MTP model at EP=2 (2 micro-batches per rank); with FSDP, checkpointing and compile."""
    from torch.distributed.tensor import DTensor

    import moetrain.train.trainer as trainer_mod
    from moetrain.model.apply import apply_compile

    cfg = tiny_train_config(Path(tmp), max_steps=3, micro_batch_size=2, eval_at_start=False)
    cfg.model = copy.deepcopy(MODEL)
    cfg.model.mtp_depth = 1
    cfg.moe = copy.deepcopy(MOE)
    cfg.checkpoint.enabled, cfg.trainer.resume, cfg.trainer.precision = False, "none", "fp32"
    cfg.parallel.ep, cfg.parallel.fsdp = 2, fsdp
    cfg.trainer.activation_checkpointing = cfg.trainer.compile = fsdp
    pc = init_parallel(cfg.parallel, "cpu", num_experts=N)
    original = trainer_mod.apply_compile
    trainer_mod.apply_compile = functools.partial(apply_compile, backend="aot_eager")
    try:
        t = trainer_mod.Trainer(cfg, Path(tmp) / f"run_{fsdp}", pc)
    finally:
        trainer_mod.apply_compile = original
    steps = [t.train_step(t.loader.next_batch()) for _ in range(3)]
    params = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in t.model.named_parameters()
    }
    out = {
        "loss": [s.loss.item() for s in steps],
        "mtp": [s.reduced.host()["train/mtp_loss_1"] for s in steps],
        "params": params,
        # replicate units hold Replicate DTensors too; FSDP's hold Shard ones
        "sharded": any(
            isinstance(p, DTensor) and any(pl.is_shard() for pl in p.placements) for p in t.model.parameters()
        ),
    }
    t.close()
    return out


def _suite(rank: int, world: int, tmp: str) -> dict[str, Any]:
    return {
        "ep": _ep_parity(rank, world),
        "plain": _train(rank, world, tmp, False),
        "fsdp": _train(rank, world, tmp, True),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_distributed(_suite, 2, str(tmp_path_factory.mktemp("mla_parallel")), timeout=600)


def test_ep2_equals_one_process_with_mla_and_moe_mtp_blocks(results):
    """Catches MTP experts left unsharded or MLA state that differs per rank: loss and every gradient equal."""
    assert all(r["ep"]["max_grad_diff"] < 1e-5 for r in results)


def test_fsdp_checkpointing_compile_accumulation_equal_the_plain_ep2_run(results):
    """Catches MLA / MTP parameters FSDP gathers wrongly (the MTP modules live in the root unit)."""
    for r in results:
        assert r["fsdp"]["sharded"] and not r["plain"]["sharded"]
        torch.testing.assert_close(r["fsdp"]["loss"], r["plain"]["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["fsdp"]["mtp"], r["plain"]["mtp"], rtol=1e-5, atol=1e-6)
        for name, p in r["plain"]["params"].items():
            torch.testing.assert_close(r["fsdp"]["params"][name], p, rtol=1e-4, atol=1e-6, msg=name)
