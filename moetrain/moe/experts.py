"""Routed experts as stacked weights, run over expert-contiguous row segments.

Shape suffixes: R rows (token copies in expert-sorted order), D model dim,
E local experts, F expert hidden size, K / N a GEMM's contraction / output dim.

The experts are one autograd node, :class:`GroupedSwiGLU`, over a *segment
GEMM* backend chosen per call from the rows' device and dtype
(:func:`segment_gemm`):

* ``torch._grouped_mm`` (:class:`TorchGroupedMM`): CUDA bf16 on sm90/sm100 (its
  CUTLASS kernels) and CPU fp32/bf16; the segment offsets stay on the device.
* Triton (:class:`TritonGroupedMM`, ``moetrain/moe/triton_gemm.py``): every other
  CUDA case (fp32, fp16, bf16 before Hopper), where ``torch._grouped_mm`` would
  fall back to a loop that copies the offsets to the host.
* a loop over segments (:class:`LoopGroupedMM`): only where neither runs (a
  non-16-byte-aligned hidden size on CPU, CUDA without Triton, other devices).
  It needs the row counts on the host (one synchronisation per forward), and
  its weight gradient writes each expert's ``x_e^T dy_e`` straight into that
  expert's slice of one [E, K, N] tensor: O(E) traffic, no full-size
  accumulation per expert.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn


def grouped_mm_supported(x: torch.Tensor, *dims: int) -> bool:
    """Whether ``torch._grouped_mm`` runs its own kernels for these rows: on CPU (fp32/bf16: one call
    for all experts instead of a per-expert loop, see ``scripts/bench_moe.py``) and on CUDA in bf16 on sm90/sm100 (elsewhere
    on CUDA it loops over the groups after copying the offsets to the host), with every matrix dimension
    ``dims`` a multiple of 16 bytes (the kernel's stride rule)."""
    if not hasattr(torch, "_grouped_mm") or any(d * x.element_size() % 16 for d in dims):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] in (9, 10)
    return False


@functools.cache
def _triton_installed() -> bool:
    return find_spec("triton") is not None


def triton_supported(x: torch.Tensor) -> bool:
    """Whether the Triton segment GEMMs can run for these rows (CUDA with Triton installed)."""
    return x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and _triton_installed()


class SegmentGEMM(Protocol):
    """GEMMs over the row segments of one expert layout (one backend object per forward)."""

    def mm(self, x_RK: torch.Tensor, w_EKN: torch.Tensor) -> torch.Tensor:
        """``y[seg e] = x[seg e] @ w[e]``: [R, K] x [E, K, N] -> [R, N]; ``w`` may be a strided view."""
        ...

    def wgrad(self, x_RK: torch.Tensor, dy_RN: torch.Tensor) -> torch.Tensor:
        """``dw[e] = x[seg e]^T @ dy[seg e]``: [E, K, N], zeros for an empty segment."""
        ...


@dataclass(frozen=True)
class TorchGroupedMM:
    """``torch._grouped_mm`` with the segment ends ``offs_E`` (int32, on the rows' device)."""

    offs_E: torch.Tensor

    def mm(self, x_RK: torch.Tensor, w_EKN: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(x_RK, w_EKN, offs=self.offs_E)

    def wgrad(self, x_RK: torch.Tensor, dy_RN: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(x_RK.t(), dy_RN, offs=self.offs_E)


@dataclass(frozen=True)
class TritonGroupedMM:
    """The Triton kernels of :mod:`moetrain.moe.triton_gemm` (offsets read on the device)."""

    offs_E: torch.Tensor

    def mm(self, x_RK: torch.Tensor, w_EKN: torch.Tensor) -> torch.Tensor:
        from moetrain.moe.triton_gemm import segment_mm

        return segment_mm(x_RK, w_EKN, self.offs_E)

    def wgrad(self, x_RK: torch.Tensor, dy_RN: torch.Tensor) -> torch.Tensor:
        from moetrain.moe.triton_gemm import segment_wgrad

        return segment_wgrad(x_RK, dy_RN, self.offs_E)


@dataclass(frozen=True)
class LoopGroupedMM:
    """One ``torch.mm`` per non-empty segment, each writing into its slice of one output tensor."""

    counts: list[int]
    """Rows per expert, on the host."""

    def _segments(self) -> list[tuple[int, int, int]]:
        out, start = [], 0
        for e, n in enumerate(self.counts):
            out.append((e, start, start + n))
            start += n
        return out

    def mm(self, x_RK: torch.Tensor, w_EKN: torch.Tensor) -> torch.Tensor:
        y = x_RK.new_empty(x_RK.shape[0], w_EKN.shape[2])
        for e, s, t in self._segments():
            if t > s:
                torch.mm(x_RK[s:t], w_EKN[e], out=y[s:t])
        return y

    def wgrad(self, x_RK: torch.Tensor, dy_RN: torch.Tensor) -> torch.Tensor:
        dw = x_RK.new_empty(len(self.counts), x_RK.shape[1], dy_RN.shape[1])
        for e, s, t in self._segments():
            if t > s:
                torch.mm(x_RK[s:t].t(), dy_RN[s:t], out=dw[e])
            else:
                dw[e].zero_()
        return dw


GEMM_BACKENDS = ("auto", "grouped_mm", "triton", "loop")


def segment_gemm(
    x_RD: torch.Tensor, counts_E: torch.Tensor, dims: tuple[int, ...], backend: str = "auto"
) -> SegmentGEMM:
    """The segment-GEMM backend for these rows (``auto``: the fastest that runs, see the module doc).

    ``counts_E`` are the rows per expert (on the rows' device). Only the loop
    backend copies them to the host.
    """
    if backend == "auto":
        if grouped_mm_supported(x_RD, *dims):
            backend = "grouped_mm"
        elif triton_supported(x_RD):
            backend = "triton"
        else:
            backend = "loop"
    if backend == "loop":
        return LoopGroupedMM(counts_E.tolist())
    offs_E = counts_E.cumsum(0).to(torch.int32)
    if backend == "grouped_mm":
        return TorchGroupedMM(offs_E)
    if backend == "triton":
        return TritonGroupedMM(offs_E)
    raise ValueError(f"unknown segment GEMM backend {backend!r}: one of {GEMM_BACKENDS}")


def silu_into_grad_buffer(h13_RF2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A new buffer for d/d[h1 | h3] whose d/dh3 half holds silu(h1), and that half: a caller that needs
    silu(h1) itself (to recompute the activation) then hands the buffer to :func:`swiglu_backward`."""
    hidden = h13_RF2.shape[1] // 2
    dh13_RF2 = torch.empty_like(h13_RF2)
    return dh13_RF2, torch.ops.aten.silu.out(h13_RF2[:, :hidden], out=dh13_RF2[:, hidden:])


def swiglu_backward(h13_RF2: torch.Tensor, da_RF: torch.Tensor, dh13_RF2: torch.Tensor | None = None) -> torch.Tensor:
    """d/d[h1 | h3] of ``a = silu(h1) * h3`` given ``da``, written into the two halves of one buffer (no ``cat``).

    ``dh13_RF2``: the buffer from :func:`silu_into_grad_buffer` (silu(h1) already in its d/dh3 half), else a new one.
    """
    hidden = da_RF.shape[1]
    h1, h3 = h13_RF2[:, :hidden], h13_RF2[:, hidden:]
    if dh13_RF2 is None:
        dh13_RF2, _ = silu_into_grad_buffer(h13_RF2)
    dh1, dh3 = dh13_RF2[:, :hidden], dh13_RF2[:, hidden:]
    dh3.mul_(da_RF)  # d/dh3 = da * silu(h1)
    torch.mul(da_RF, h3, out=dh1)
    torch.ops.aten.silu_backward.grad_input(dh1, h1, grad_input=dh1)  # d/dh1 = da * h3 * silu'(h1)
    return dh13_RF2


def _scaled(a_RF: torch.Tensor, weight_R: torch.Tensor) -> torch.Tensor:
    """``a * w`` per row, computed in fp32 (``w`` is fp32) and stored in ``a``'s dtype (one kernel)."""
    return torch.mul(a_RF, weight_R.unsqueeze(1), out=torch.empty_like(a_RF))


def _row_dot(a_RF: torch.Tensor, b_RF: torch.Tensor) -> torch.Tensor:
    """``<a_r, b_r>`` per row, accumulated in fp32."""
    if a_RF.dtype == torch.float32:
        return torch.linalg.vecdot(a_RF, b_RF)
    return torch.mul(a_RF, b_RF).sum(dim=1, dtype=torch.float32)


class GroupedSwiGLU(torch.autograd.Function):
    """``y[r] = w_r * (silu(x_r W1_e) * (x_r W3_e)) W2_e`` for row r of expert e's segment, as one autograd node.

    ``weight_R`` (fp32, optional) are the combine weights of the rows: they scale
    the activation before the down projection, so the combine that follows is a
    plain sum of each token's rows. ``w a W2 = (w a) W2`` exactly; ``w * a`` is
    computed in fp32 and the GEMM accumulates in fp32, so the weights are applied
    with fp32 accumulation whatever the rows' dtype (DeepSeek-V2 eq. 20's
    ``sum_i g_{i,t} FFN_i(u_t)``). Its gradient is the row-wise dot
    ``<a_r, dL/d(w a)_r>`` in fp32.

    Forward: two segment GEMMs; saves x, h13 = [h1 | h3] and a. Backward: up to
    four segment GEMMs (dW2, d(wa), dW13, dx); d/dh1 and d/dh3 go straight into
    the halves of one buffer. Saved tensors are never modified, so a retained
    graph can be run backward again. ``gemm`` is the :class:`SegmentGEMM` backend.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x_RD: torch.Tensor,
        w13_EDF2: torch.Tensor,
        w2_EFD: torch.Tensor,
        weight_R: torch.Tensor | None,
        gemm: SegmentGEMM,
    ) -> torch.Tensor:
        hidden = w2_EFD.shape[1]
        h13_RF2 = gemm.mm(x_RD, w13_EDF2)
        a_RF = F.silu(h13_RF2[:, :hidden]).mul_(h13_RF2[:, hidden:])
        ctx.save_for_backward(x_RD, w13_EDF2, w2_EFD, weight_R, h13_RF2, a_RF)
        ctx.gemm = gemm
        return gemm.mm(a_RF if weight_R is None else _scaled(a_RF, weight_R), w2_EFD)

    @staticmethod
    def backward(ctx, dy_RD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x_RD, w13_EDF2, w2_EFD, weight_R, h13_RF2, a_RF = ctx.saved_tensors
        need_x, need_w13, need_w2, need_weight = ctx.needs_input_grad[:4]
        gemm: SegmentGEMM = ctx.gemm
        dy_RD = dy_RD.contiguous()
        dw2 = None
        if need_w2:
            dw2 = gemm.wgrad(a_RF if weight_R is None else _scaled(a_RF, weight_R), dy_RD)
        if not (need_x or need_w13 or need_weight):
            return None, None, dw2, None, None
        dwa_RF = gemm.mm(dy_RD, w2_EFD.transpose(1, 2))  # dL/d(w a)
        dweight = _row_dot(a_RF, dwa_RF) if need_weight else None
        if not (need_x or need_w13):
            return None, None, dw2, dweight, None
        da_RF = dwa_RF if weight_R is None else dwa_RF.mul_(weight_R.unsqueeze(1))  # fp32 math, rows' dtype
        dh13_RF2 = swiglu_backward(h13_RF2, da_RF)
        dw13 = gemm.wgrad(x_RD, dh13_RF2) if need_w13 else None
        dx = gemm.mm(dh13_RF2, w13_EDF2.transpose(1, 2)) if need_x else None
        return dx, dw13, dw2, dweight, None


@torch.compiler.disable
def grouped_swiglu(
    x_RD: torch.Tensor,
    w13_EDF2: torch.Tensor,
    w2_EFD: torch.Tensor,
    counts_E: torch.Tensor,
    weight_R: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``weight_R * SwiGLU_e(x)`` over contiguous segments (:class:`GroupedSwiGLU` on :func:`segment_gemm`).

    Kept out of ``torch.compile`` graphs (a graph break): it is already one kernel
    per GEMM, and the fake-tensor rule of ``_grouped_mm`` accepts only bf16 while
    the CPU kernel runs fp32.
    """
    gemm = segment_gemm(x_RD, counts_E, (w2_EFD.shape[2], w2_EFD.shape[1]), backend)
    return GroupedSwiGLU.apply(x_RD.contiguous(), w13_EDF2, w2_EFD, weight_R, gemm)


class CachedCast(torch.autograd.Function):
    """``w.to(cast.dtype)`` whose value is ``cast``, an already made copy (:meth:`GroupedExperts.cast_weight`).

    The backward is ``ToCopyBackward``'s (the gradient cast back to ``w``'s dtype), so ``w`` gets bitwise the
    gradient ``w.to(dtype)`` would give it.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.dtype = w.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad.to(ctx.dtype), None


class GroupedExperts(nn.Module):
    """E SwiGLU experts, y_e = (silu(x W1_e) * (x W3_e)) W2_e, stored as stacked tensors.

    ``w13_EDF2`` holds W1 and W3 side by side so each expert does one up-projection
    GEMM. The forward takes rows already grouped by expert, the row count of each
    expert and optionally each row's combine weight: a grouped GEMM over
    contiguous segments, with no mask over all tokens and no capacity padding.
    The weights are cast to the rows' dtype (the compute dtype, e.g. bf16 under
    autocast); their gradients flow back in fp32.

    The cast is made once per weight update, not once per forward
    (:meth:`cast_weight`, on while :attr:`cache_casts`): the micro-batches of a
    step, the routing pre-pass and activation checkpointing's recomputation reuse
    it. It costs one compute-dtype copy of the expert weights held between
    forwards; the values and gradients are bitwise those of a cast per forward.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.expert_offset = 0
        """Global index of local expert 0 (set by ``moetrain.parallel.apply_expert_parallel``)."""
        self.num_global_experts = num_experts
        """Experts of the whole layer; ``num_experts`` are the ones held here (``N / ep`` under EP)."""
        self.gemm_backend = "auto"
        """Segment-GEMM backend (:data:`GEMM_BACKENDS`); ``auto`` picks the fastest that runs."""
        self.cache_casts = True
        """Keep the weights' compute-dtype copy until they change (:meth:`cast_weight`); FSDP, which refills
        the gathered weights in place, turns it off (``moetrain.parallel.data_parallel.apply_data_parallel``)."""
        self._casts: dict[str, tuple[tuple, torch.Tensor]] = {}
        self.w13 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def cast_weight(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Weight ``name`` in ``dtype``: itself if it has that dtype, else its cast, made again only when the
        weight changed since the last one (an optimizer step or a load writes it in place, which bumps its
        version counter; a replaced tensor has another address) and attached to the weight by
        :class:`CachedCast`."""
        w: torch.Tensor = getattr(self, name)
        if w.dtype == dtype:
            return w
        if not self.cache_casts:
            return w.to(dtype)
        key = (dtype, w.device, w._version, w.data_ptr(), tuple(w.shape))
        hit = self._casts.get(name)
        if hit is None or hit[0] != key:
            hit = (key, w.detach().to(dtype))
            self._casts[name] = hit
        return CachedCast.apply(w, hit[1])

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor, weight_R: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x_RD.dtype
        w13, w2 = self.cast_weight("w13", dtype), self.cast_weight("w2", dtype)
        return grouped_swiglu(x_RD, w13, w2, counts_E, weight_R, self.gemm_backend)


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP (Shazeer 2020): w2(silu(x w1) * (x w3)): the shared experts and the dense layers' FFN.

    ``part`` splits one call in two, each through the module's ``__call__`` (its hooks and
    ``torch.compile`` see both): ``up`` returns h = silu(x w1) * (x w3), ``down`` takes h and returns
    h w2; ``down(up(x))`` is ``all`` operation for operation. The MoE layer runs its shared experts this
    way, up during the dispatch all-to-all and down during the combine
    (:class:`~moetrain.moe.dispatch.OverlapWork`)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, part: Literal["all", "up", "down"] = "all") -> torch.Tensor:
        if part == "down":
            return self.w2(x)
        if part not in ("all", "up"):
            raise ValueError(f"part={part!r}: one of all, up, down")
        h = F.silu(self.w1(x)) * self.w3(x)
        return h if part == "up" else self.w2(h)
