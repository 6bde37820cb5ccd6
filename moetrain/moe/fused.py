"""Single-process CPU fast path: dispatch, SwiGLU experts and combine as one autograd node.

Shape suffixes: T tokens, D model dim, K slots per token, R = T*K rows in
expert-sorted order, E experts, F expert hidden size.

On CPU a fresh buffer above glibc's mmap threshold (32 MiB) is page-faulted in
on first touch, which costs several times the pass that fills it (timings:
``scripts/bench_moe.py``). The generic path (``LocalDispatcher`` +
``GroupedExperts``) holds three or four [R, D] tensors per layer (the gathered
rows, the experts' output, its gradient, the rows' gradient); this one holds
none. Everything runs one expert at a time on small temporaries that stay in
cache and are reused by the allocator: the expert gathers its tokens, runs its
SwiGLU, and its weighted output is summed straight into the [T, D] result
(``index_add_``, so the sum over each token's K slots needs no [R, D]
intermediate). Only the pre-activations h13 = [x W1 | x W3] are kept for the
backward, one [rows of e, 2F] tensor per expert (one [R, 2F] tensor would be
page-faulted in afresh at every step), which regathers each expert's tokens and recomputes
silu(h1) * h3 (it needs silu(h1) for d/dh3 anyway).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.moe.dispatch import Combined, DeviceCapacity, LocalDispatcher, OverlapWork
from moetrain.moe.experts import GroupedExperts, silu_into_grad_buffer, swiglu_backward


class LocalSwiGLUMoE(torch.autograd.Function):
    """``out[t] = sum_k w[t, k] * SwiGLU_{e[t, k]}(x[t])`` with stacked expert weights, one expert at a time.

    ``order_R`` sorts the T*K token-major slots by expert (stable), ``inverse_R``
    undoes it, ``counts`` are the rows per expert (a host list: CPU only). The
    GEMMs are the same per-expert ``torch.mm`` calls CPU ``torch._grouped_mm``
    makes (weight gradients included); the SwiGLU backward
    (:func:`~moetrain.moe.experts.swiglu_backward`) writes d/dh1 and d/dh3 into the two halves of one buffer (no
    ``cat``). Empty experts get zero weight gradients. Saved tensors are never
    modified, so a retained graph can run backward again.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x_TD: torch.Tensor,
        weight_TK: torch.Tensor,
        w13_EDF2: torch.Tensor,
        w2_EFD: torch.Tensor,
        order_R: torch.Tensor,
        inverse_R: torch.Tensor,
        counts: list[int],
    ) -> torch.Tensor:
        T, K = weight_TK.shape
        hidden = w2_EFD.shape[1]
        token_R = order_R // K  # slot a belongs to token a // K
        weight_R = weight_TK.reshape(-1).index_select(0, order_R)
        segments = []
        start = 0
        for count in counts:
            segments.append((start, start + count))
            start += count
        out_TD = x_TD.new_zeros(T, x_TD.shape[1])
        h13_list = []  # one [n_e, 2F] tensor per non-empty expert (small: no fresh page faults, see the module doc)
        for e, (s, t) in enumerate(segments):
            if t == s:
                continue
            h13 = torch.mm(x_TD.index_select(0, token_R[s:t]), w13_EDF2[e])
            h13_list.append(h13)
            a = F.silu(h13[:, :hidden]).mul_(h13[:, hidden:])  # a small temporary: recomputed in the backward
            out_TD.index_add_(0, token_R[s:t], torch.mm(a, w2_EFD[e]).mul_(weight_R[s:t, None]))
        ctx.save_for_backward(x_TD, weight_TK, w13_EDF2, w2_EFD, token_R, inverse_R, weight_R, *h13_list)
        ctx.segments = segments
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x_TD, weight_TK, w13_EDF2, w2_EFD, token_R, inverse_R, weight_R, *h13_list = ctx.saved_tensors
        need_x, need_w, need_w13, need_w2 = ctx.needs_input_grad[:4]
        segments: list[tuple[int, int]] = ctx.segments
        hidden = w2_EFD.shape[1]
        grad_TD = grad_TD.contiguous()
        dot_R = x_TD.new_empty(token_R.shape[0]) if need_w else None
        h13_iter = iter(h13_list)
        dw2 = torch.empty_like(w2_EFD) if need_w2 else None
        dw13 = torch.empty_like(w13_EDF2) if need_w13 else None
        dx_TD = torch.zeros_like(x_TD) if need_x else None
        for e, (s, t) in enumerate(segments):
            if t == s:
                for dw in (dw2, dw13):
                    if dw is not None:
                        dw[e].zero_()
                continue
            w_n1 = weight_R[s:t, None]
            h13 = next(h13_iter)
            dh13, silu_h1 = silu_into_grad_buffer(h13)  # silu(h1), kept in the d/dh3 half until it becomes d/dh3
            a = silu_h1 * h13[:, hidden:]  # the forward's a, recomputed
            # second GEMM: g = dy[tokens]; da = w * (g W2^T); dw = <a W2, g> = <a, g W2^T>; dW2 = a^T (w g)
            g_nD = grad_TD.index_select(0, token_R[s:t])
            da = torch.mm(g_nD, w2_EFD[e].t())
            if dot_R is not None:
                torch.linalg.vecdot(a, da, out=dot_R[s:t])  # one fused row-wise dot, not a batched 1xF @ Fx1 bmm
            if dw2 is not None:
                torch.mm(a.t(), g_nD.mul_(w_n1), out=dw2[e])
            if not (need_x or need_w13):
                continue
            dh13 = swiglu_backward(h13, da.mul_(w_n1), dh13)
            # first GEMM: dW13 = x[tokens]^T dh13; dx[tokens] += dh13 W13^T
            if dw13 is not None:
                torch.mm(x_TD.index_select(0, token_R[s:t]).t(), dh13, out=dw13[e])
            if dx_TD is not None:
                dx_TD.index_add_(0, token_R[s:t], torch.mm(dh13, w13_EDF2[e].t()))
        grad_w = dot_R.index_select(0, inverse_R).view_as(weight_TK) if dot_R is not None else None
        return dx_TD, grad_w, dw13, dw2, None, None, None


def fused_local_supported(x_TD: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether :func:`local_swiglu_moe` applies: CPU, everything fp32, no CPU autocast (whose
    ``torch.mm`` would run in bf16 inside the node)."""
    return (
        x_TD.device.type == "cpu"
        and x_TD.dtype == torch.float32
        and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
        and not torch.is_autocast_enabled("cpu")
    )


@torch.compiler.disable
def local_swiglu_moe(
    x_TD: torch.Tensor,
    expert_idx_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    w13_EDF2: torch.Tensor,
    w2_EFD: torch.Tensor,
) -> torch.Tensor:
    """Dropless top-K MoE of SwiGLU experts on one CPU process: ``sum_k w[t, k] SwiGLU_{e[t, k]}(x[t])``.

    One stable sort of the T*K slots by expert, then :class:`LocalSwiGLUMoE`.
    The per-expert row counts come to the host (free on CPU). Kept out of
    ``torch.compile`` graphs, like the grouped GEMM path.
    """
    E = w13_EDF2.shape[0]
    expert_idx_A = expert_idx_TK.reshape(-1)
    order_R = expert_idx_A.argsort(stable=True)
    inverse_R = torch.empty_like(order_R).scatter_(0, order_R, torch.arange(order_R.numel()))
    counts = torch.bincount(expert_idx_A, minlength=E).tolist()
    return LocalSwiGLUMoE.apply(x_TD, weight_TK, w13_EDF2, w2_EFD, order_R, inverse_R, counts)


class FusedLocalDispatcher(LocalDispatcher):
    """One process: :func:`local_swiglu_moe` (dispatch, experts and combine as one node, no [T*K, D]
    tensors) where it applies, the :class:`~moetrain.moe.dispatch.LocalDispatcher` path otherwise.

    The MoE layer's default dispatcher, chosen when the model is built;
    :func:`moetrain.parallel.apply_expert_parallel` replaces it with the
    all-to-all one and :func:`moetrain.parallel.use_unfused_dispatch` with the
    plain :class:`~moetrain.moe.dispatch.LocalDispatcher` (for an engine whose
    hooks must see the experts' forward, which the fused node never calls).
    """

    @staticmethod
    def supports(x_TD: torch.Tensor, experts: nn.Module) -> bool:
        """Whether the fused node computes what ``experts`` would: plain :class:`GroupedExperts` (not a
        subclass such as DeepSpeed's adopted experts, whose module hooks must see their forward),
        CPU and fp32 (:func:`fused_local_supported`)."""
        return type(experts) is GroupedExperts and fused_local_supported(x_TD, experts.w13, experts.w2)

    def run(
        self,
        experts: nn.Module,
        x_TD: torch.Tensor,
        token_idx_A: torch.Tensor,
        expert_idx_A: torch.Tensor,
        weight_A: torch.Tensor,
        slots_per_token: int | None = None,
        device_capacity: DeviceCapacity | None = None,
        overlap: OverlapWork | None = None,
    ) -> Combined:
        """The fused node for a dropless batch (``slots_per_token``, token-major slots), else dispatch + experts
        + combine; ``overlap`` after them (one process: nothing in flight to hide it behind)."""
        if slots_per_token is None or device_capacity is not None or not self.supports(x_TD, experts):
            return super().run(
                experts, x_TD, token_idx_A, expert_idx_A, weight_A, slots_per_token, device_capacity, overlap
            )
        shape_TK: Any = (x_TD.shape[0], slots_per_token)
        w13, w2 = experts.w13, experts.w2
        y_TD = local_swiglu_moe(x_TD, expert_idx_A.view(shape_TK), weight_A.view(shape_TK), w13, w2)
        return Combined(y_TD, overlap_out=overlap.run() if overlap is not None else None)
