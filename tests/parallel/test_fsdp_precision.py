"""FSDP2's bf16 policy (``parallel.fsdp`` on a GPU with ``trainer.precision=bf16``) keeps the residual stream fp32,
as the unsharded model under bf16 autocast does: checked on 2 gloo ranks with the GPU policy forced on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import tiny_train_config
from tests.helpers import spawned

pytestmark = pytest.mark.parity


def _record_dtypes(model: torch.nn.Module, seen: dict[str, torch.dtype]) -> None:
    """Hooks that record into ``seen`` the dtypes a forward gives the residual stream and the MoE boundary (run
    after FSDP's own pre-forward hook, so they see the inputs as FSDP hands them on)."""
    for i, block in enumerate(model.blocks):  # type: ignore[arg-type]

        def before(m: Any, args: Any, kwargs: Any, i: int = i) -> None:  # Block.forward(x, *, cos, sin, ...)
            seen.update({f"block {i} input": args[0].dtype, f"block {i} rope": kwargs["cos"].dtype})

        block.register_forward_pre_hook(before, with_kwargs=True)
        block.register_forward_hook(lambda m, args, o, i=i: seen.update({f"block {i} output": o[0].dtype}))
        if block.is_moe:
            block.ffn.register_forward_hook(lambda m, args, o, i=i: seen.update({f"moe {i} output": o[0].dtype}))
            block.ffn.experts.register_forward_pre_hook(
                lambda m, args, i=i: seen.update({f"experts {i} combine weights": args[2].dtype})
            )


def _residual_dtypes(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """The dtypes the residual stream, the RoPE tables, the MoE layer's output and the experts' combine weights
    have in a forward under bf16 autocast, without and with FSDP's bf16 policy."""
    from moetrain.model.transformer import build_model
    from moetrain.parallel.context import init_parallel
    from moetrain.parallel.data_parallel import apply_data_parallel

    cfg = tiny_train_config(Path(tmp) / "residual", eval_at_start=False)
    cfg.moe.num_shared_experts = 1
    pc = init_parallel(cfg.parallel, "cpu", num_experts=cfg.moe.num_experts)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(rank))
    out: dict[str, Any] = {}
    for fsdp in (False, True):
        model = build_model(cfg.model, cfg.moe, 256, 16, seed=0)
        if fsdp:
            apply_data_parallel(model, pc, shard=True, param_dtype=torch.bfloat16)
        seen: dict[str, torch.dtype] = {}
        _record_dtypes(model, seen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(tokens)
        out["fsdp" if fsdp else "plain"] = seen
    return out


spawned.register(2, "fsdp/bf16_residual", _residual_dtypes)


def test_fsdp_bf16_policy_keeps_the_residual_stream_fp32():
    """Every block's input and output, the RoPE tables, each MoE layer's output and the experts' combine weights
    are fp32 under FSDP's bf16 policy, as without FSDP. Catches FSDP's default input cast (every floating input
    of a unit to bf16) and a residual stream started from the bf16-gathered embedding."""
    for res in spawned.result(2, "fsdp/bf16_residual"):
        assert res["plain"] and set(res["plain"].values()) == {torch.float32}, res["plain"]
        assert res["fsdp"] == res["plain"]
