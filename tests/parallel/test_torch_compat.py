"""What differs between the torch versions moetrain supports (``pyproject.toml``'s floor to the newest).

The GPU machine runs torch 2.11 while the CPU test bed runs 2.13; ``scripts/compat_check.sh`` runs the fast suite
on the declared floor. These tests pin the version-dependent spots that have broken before.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.helpers import spawned


@pytest.fixture
def matmul_precision():
    """Restore every fp32 matmul precision setting the test changes (global and per backend)."""
    matmul = torch.backends.cuda.matmul
    saved = (torch.backends.fp32_precision, matmul.fp32_precision) if hasattr(matmul, "fp32_precision") else None
    legacy = None if saved else matmul.allow_tf32
    yield matmul
    if saved is not None:
        torch.backends.fp32_precision, matmul.fp32_precision = saved
    else:
        matmul.allow_tf32 = legacy


@pytest.mark.unit
def test_triton_precision_follows_every_way_of_allowing_tf32(matmul_precision):
    """The Triton segment GEMMs take fp32 operands exactly ("ieee") unless TF32 is allowed, whichever API allowed
    it, and reading the setting never raises after legacy and new API calls were mixed (bug caught: reading
    ``torch.backends.cuda.matmul.allow_tf32`` or ``torch.get_float32_matmul_precision()``, which raise on torch
    2.9+ once ``fp32_precision`` was set next to the legacy flag)."""
    pytest.importorskip("triton", reason="triton is a dev dependency on Linux x86-64 only")
    from moetrain.moe.triton_gemm import _precision

    assert _precision(torch.float32) == "ieee"
    assert _precision(torch.bfloat16) == "tf32"  # 16-bit operands: the matrix units take them as they are
    torch.set_float32_matmul_precision("high")
    assert _precision(torch.float32) == "tf32"
    torch.set_float32_matmul_precision("highest")
    assert _precision(torch.float32) == "ieee"
    if not hasattr(matmul_precision, "fp32_precision"):
        return  # torch without the new API: the legacy flag is the only setting
    matmul_precision.allow_tf32 = True  # legacy ...
    matmul_precision.fp32_precision = "ieee"  # ... then new: the getters of both raise on torch 2.9+
    assert _precision(torch.float32) == "ieee"
    matmul_precision.fp32_precision = "tf32"
    assert _precision(torch.float32) == "tf32"


def _router_unit_after_steps(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Two forward+backward passes of a 2-rank FSDP model under the GPU's bf16 policy (forced on CPU): each
    router unit's reshard-after-forward setting and whether every sharded gradient came back finite."""
    from pathlib import Path

    from torch.distributed.tensor import DTensor

    from moetrain.model.transformer import build_model
    from moetrain.parallel.context import init_parallel
    from moetrain.parallel.data_parallel import RESHARD_AFTER_FORWARD, apply_data_parallel
    from tests.conftest import tiny_train_config

    cfg = tiny_train_config(Path(tmp) / "router_unit", max_steps=1)
    pc = init_parallel(cfg.parallel, "cpu", num_experts=cfg.moe.num_experts)
    model = build_model(cfg.model, cfg.moe, 256, 16, seed=0)
    apply_data_parallel(model, pc, shard=True, param_dtype=torch.bfloat16)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens)
        (out.logits.float().logsumexp(-1).mean() + out.aux_loss).backward()
    routers = [m for name, m in model.named_modules() if name.endswith("ffn.router")]
    grads = [p.grad for p in model.parameters() if isinstance(p.grad, DTensor)]
    return {
        "router_reshards": [getattr(m, RESHARD_AFTER_FORWARD) for m in routers],
        "finite": all(bool(g.to_local().isfinite().all()) for g in grads),
        "grads": len(grads),
    }


spawned.register(2, "compat/router_unit", _router_unit_after_steps)


@pytest.mark.parity
def test_fsdp_bf16_router_unit_stays_gathered_from_forward_to_backward():
    """Under the bf16 policy each router is an fp32 unit nested in its block's unit; torch 2.11 does not gather a
    resharded nested unit again for its backward ("setStorage ... storage of size 0": this test's steps fail
    there with the router resharded after forward, while 2.13 forgives it). Bug caught on any torch: the router
    unit built with ``reshard_after_forward=True`` again."""
    for res in spawned.result(2, "compat/router_unit"):
        assert res["router_reshards"] and not any(res["router_reshards"]), res
        assert res["finite"] and res["grads"] > 0, res
