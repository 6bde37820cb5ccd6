"""Routed experts as stacked weights, run over expert-contiguous token segments.

Shape suffixes: R rows (token copies in expert-sorted order), D model dim,
E local experts, F expert hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def grouped_mm_supported(x: torch.Tensor, *dims: int) -> bool:
    """Whether ``torch._grouped_mm`` runs for these rows: on CPU (fp32/bf16, measured
    faster than a per-expert loop, see scripts/bench_moe.py) and on CUDA in bf16 on Hopper
    (sm90) or newer, with every matrix dimension ``dims`` a multiple of 16 bytes (the
    kernel's stride rule); elsewhere the experts fall back to a loop over segments."""
    if not hasattr(torch, "_grouped_mm") or any(d * x.element_size() % 16 for d in dims):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


class GroupedMM(torch.autograd.Function):
    """y[seg_e] = x[seg_e] @ w[e] over contiguous row segments, with a grouped-GEMM backward.

    ``offs`` are the cumulative row counts (int32, [E]). Backward: dx = dy @ w[e]^T
    (grouped, 2D x 3D) and dw[e] = x[seg_e]^T @ dy[seg_e] (grouped, 2D x 2D -> 3D);
    empty segments give zero weight gradients.
    """

    @staticmethod
    def forward(ctx, x_RD: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x_RD, w_EDF, offs_E)
        return torch._grouped_mm(x_RD, w_EDF, offs=offs_E)

    @staticmethod
    def backward(ctx, dy_RF: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # type: ignore[override]
        x_RD, w_EDF, offs_E = ctx.saved_tensors
        dy_RF = dy_RF.contiguous()
        dx = torch._grouped_mm(dy_RF, w_EDF.transpose(1, 2), offs=offs_E) if ctx.needs_input_grad[0] else None
        dw = torch._grouped_mm(x_RD.t(), dy_RF, offs=offs_E) if ctx.needs_input_grad[1] else None
        return dx, dw, None


class GroupedSwiGLU(torch.autograd.Function):
    """y[seg_e] = (silu(x W1_e) * (x W3_e)) W2_e over contiguous row segments, as one autograd node.

    The CPU path (see :func:`grouped_swiglu`). The same grouped GEMMs (two forward,
    up to four backward) as two :class:`GroupedMM` nodes around an eager SwiGLU, but
    with fewer fresh activation-sized buffers, which on CPU cost more than the
    arithmetic (a fresh allocation above glibc's 32 MiB mmap threshold is
    page-faulted in on first touch, ~15 ms per 48 MiB on the 2-core machine of
    ``scripts/bench_moe.py``, against ~3 ms for the pass that fills it):

    * forward: ``a = silu(h1)`` then ``a *= h3`` in place; saves x, h13 = [h1 | h3]
      and a (the autograd composition also keeps ``silu(h1)``);
    * backward: dh1 and dh3 are written straight into halves of one [R, 2F] buffer
      (``silu_backward`` in place, no ``cat`` of the two halves), ``silu(h1)`` recomputed.

    ``offs`` are the cumulative row counts (int32, [E]); empty segments give zero
    weight gradients. Saved tensors are never modified, so a retained graph can be
    run backward again.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x_RD: torch.Tensor, w13_EDF2: torch.Tensor, w2_EFD: torch.Tensor, offs_E: torch.Tensor
    ) -> torch.Tensor:
        hidden = w2_EFD.shape[1]
        h13_RF2 = torch._grouped_mm(x_RD, w13_EDF2, offs=offs_E)
        a_RF = F.silu(h13_RF2[:, :hidden]).mul_(h13_RF2[:, hidden:]).contiguous()
        ctx.save_for_backward(x_RD, w13_EDF2, w2_EFD, offs_E, h13_RF2, a_RF)
        return torch._grouped_mm(a_RF, w2_EFD, offs=offs_E)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, dy_RD: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        x_RD, w13_EDF2, w2_EFD, offs_E, h13_RF2, a_RF = ctx.saved_tensors
        need_x, need_w13, need_w2 = ctx.needs_input_grad[:3]
        hidden = w2_EFD.shape[1]
        dy_RD = dy_RD.contiguous()
        dw2 = torch._grouped_mm(a_RF.t(), dy_RD, offs=offs_E) if need_w2 else None
        if not (need_x or need_w13):
            return None, None, dw2, None
        da_RF = torch._grouped_mm(dy_RD, w2_EFD.transpose(1, 2), offs=offs_E)
        h1, h3 = h13_RF2[:, :hidden], h13_RF2[:, hidden:]
        dh13_RF2 = torch.empty_like(h13_RF2)
        dh1, dh3 = dh13_RF2[:, :hidden], dh13_RF2[:, hidden:]
        torch.ops.aten.silu.out(h1, out=dh3)
        dh3.mul_(da_RF)  # d/dh3 = da * silu(h1)
        torch.mul(da_RF, h3, out=dh1)
        torch.ops.aten.silu_backward.grad_input(dh1, h1, grad_input=dh1)  # d/dh1 = da * h3 * silu'(h1)
        dw13 = torch._grouped_mm(x_RD.t(), dh13_RF2, offs=offs_E) if need_w13 else None
        dx = torch._grouped_mm(dh13_RF2, w13_EDF2.transpose(1, 2), offs=offs_E) if need_x else None
        return dx, dw13, dw2, None


@torch.compiler.disable
def grouped_swiglu(
    x_RD: torch.Tensor, w13_EDF2: torch.Tensor, w2_EFD: torch.Tensor, counts_E: torch.Tensor
) -> torch.Tensor:
    """silu(x W1_e) * (x W3_e) W2_e over contiguous segments: two grouped GEMMs.

    On CPU one :class:`GroupedSwiGLU` node (fewer fresh buffers, measured faster
    in ``scripts/bench_moe.py``); elsewhere (CUDA, bf16 on sm90+) two
    :class:`GroupedMM` nodes around an eager SwiGLU. The grouped GEMMs themselves
    are the same: on CPU ``_grouped_mm`` measured as fast as a per-expert loop of
    ``torch.mm`` (also for the weight gradient x^T dy), so there is no loop path.

    Kept out of ``torch.compile`` graphs: it is already one kernel per GEMM, and the
    fake-tensor rule of ``_grouped_mm`` accepts only bf16 while the CPU kernel runs fp32.
    """
    offs_E = counts_E.cumsum(0).to(torch.int32)
    if x_RD.device.type == "cpu":
        return GroupedSwiGLU.apply(x_RD.contiguous(), w13_EDF2, w2_EFD, offs_E)
    h1, h3 = GroupedMM.apply(x_RD, w13_EDF2, offs_E).chunk(2, dim=-1)
    return GroupedMM.apply(F.silu(h1) * h3, w2_EFD, offs_E)


class GroupedExperts(nn.Module):
    """E SwiGLU experts, y_e = (silu(x W1_e) * (x W3_e)) W2_e, stored as stacked tensors.

    ``w13_EDF2`` holds W1 and W3 side by side so each expert does one up-projection
    GEMM. The forward takes rows already grouped by expert and the row count of
    each expert: a grouped GEMM over contiguous segments, with no mask over all
    tokens and no capacity padding.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.expert_offset = 0
        """Global index of local expert 0 (set by ``moetrain.parallel.apply_expert_parallel``)."""
        self.num_global_experts = num_experts
        """Experts of the whole layer; ``num_experts`` are the ones held here (``N / ep`` under EP)."""
        self.w13 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if grouped_mm_supported(x_RD, self.dim, self.hidden):
            return grouped_swiglu(x_RD, self.w13.to(x_RD.dtype), self.w2.to(x_RD.dtype), counts_E)
        out = []
        for e, x_e in enumerate(x_RD.split(counts_E.tolist())):
            if x_e.shape[0] == 0:
                continue
            h1, h3 = (x_e @ self.w13[e].to(x_e.dtype)).chunk(2, dim=-1)
            out.append((F.silu(h1) * h3) @ self.w2[e].to(x_e.dtype))
        return torch.cat(out) if out else x_RD.new_zeros(0, self.dim)
