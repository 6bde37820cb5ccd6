"""Dispatchers: move (token, expert) assignments to their experts and back.

The MoE layer talks to its experts and to other ranks only through the
dispatcher object it holds (:class:`Dispatcher`, one :meth:`~Dispatcher.run`
per forward): :class:`LocalDispatcher` is the single-process one,
:class:`~moetrain.moe.fused.FusedLocalDispatcher` the CPU fast path chosen when
the model is built, and :func:`moetrain.parallel.apply_expert_parallel` swaps in
:class:`~moetrain.parallel.all_to_all.AllToAllDispatcher` under expert
parallelism. This module also holds the permutation helpers they share.

Work that depends only on the layer's input (the shared experts) is handed to
:meth:`~Dispatcher.run` as an :class:`OverlapWork`, so that a dispatcher that
communicates can run it while its collectives are in flight (the all-to-all
dispatcher does; the local ones have nothing to hide it behind and run it last).

Shape suffixes: T tokens, D model dim, A assignments, R rows at the experts,
E local experts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CommStats:
    """What one all-to-all dispatch + combine moved, for one forward on one rank (tensors, no host sync).

    Filled by :class:`~moetrain.parallel.all_to_all.AllToAllDispatcher`; defined here, with the dispatcher
    contract that carries it, so the MoE package never imports the parallel one."""

    rows_sent: torch.Tensor
    """(token, rank) rows this rank sent to *other* ranks in the dispatch."""
    bytes_sent: torch.Tensor
    """Payload bytes this rank sends to other ranks in the dispatch and the combine (see ``AllToAllDispatcher``)."""
    rows_local: torch.Tensor
    """(token, rank) rows whose destination was this rank itself (no network)."""
    rows_total: torch.Tensor
    """All (token, rank) rows of this rank's tokens (local + sent)."""
    recv_rows_W: torch.Tensor
    """Expert rows (one per (token, local expert)) this rank computed, at its global rank's entry of a [W] vector."""
    dropped: torch.Tensor
    """Assignments of this rank's tokens dropped by the receive budget (``moe.max_recv_factor``)."""


class Dispatched(NamedTuple):
    """What a dispatcher hands the experts, and what its :meth:`~Dispatcher.combine` needs back."""

    rows_RD: torch.Tensor
    """Rows grouped by local expert, in the dtype they were given (the compute dtype)."""
    counts_E: torch.Tensor
    """Rows per local expert (long, on the rows' device)."""
    weight_R: torch.Tensor
    """Combine weight of each row (fp32, differentiable): the experts scale their outputs by it."""
    handle: Any
    """What :meth:`~Dispatcher.combine` needs to take the rows back to their tokens."""
    comm: CommStats | None = None
    """All-to-all traffic of this dispatch and its combine (``None`` on one process)."""
    keep_A: torch.Tensor | None = None
    """Which of the input assignments the dispatcher kept (``None`` = all): it may drop some at the
    receivers (device-level dropping, the receive budget); the layer's statistics count only the kept."""


class OverlapWork(NamedTuple):
    """Work independent of the dispatch (the MoE layer's shared experts), in two stages that a dispatcher runs
    while its collectives are in flight: Megatron-Core's ``moe_shared_expert_overlap`` split (the shared
    experts' first projection and activation during the dispatch all-to-all, the second during the combine).
    Run sequentially (:meth:`run`), the two stages are the same operations in the same order as the
    unsplit computation."""

    during_dispatch: Callable[[], torch.Tensor]
    """The first stage (the up projections and the activation)."""
    during_combine: Callable[[torch.Tensor], torch.Tensor]
    """The second stage, on the first one's result (the down projection, the gate)."""

    def run(self) -> torch.Tensor:
        """Both stages, one after the other."""
        return self.during_combine(self.during_dispatch())


class Combined(NamedTuple):
    """What one :meth:`Dispatcher.run` returns to the layer."""

    y_TD: torch.Tensor
    """Sum of each token's weighted expert outputs, in token order (fp32 accumulated)."""
    comm: CommStats | None = None
    """As :attr:`Dispatched.comm`."""
    keep_A: torch.Tensor | None = None
    """As :attr:`Dispatched.keep_A`."""
    overlap_out: torch.Tensor | None = None
    """The result of the :class:`OverlapWork` given to :meth:`Dispatcher.run` (``None`` when none was)."""


class DeviceCapacity(NamedTuple):
    """DeepSeek-V2 device-level dropping done by the receiving devices (a dispatcher with ``device_groups > 1``)."""

    factor: float
    """Budget per device: ceil(factor * A / D) over all senders' A assignments."""
    priority_A: torch.Tensor
    """Each assignment's affinity (float; +inf for a protected sequence's tokens, which are never dropped)."""


class Dispatcher(ABC):
    """Moves the kept (token, expert) assignments to their experts and back. A dispatcher implements
    :meth:`dispatch` and :meth:`combine`; the MoE layer calls :meth:`run` (which a fused dispatcher may
    replace by one node that never materialises the rows)."""

    num_local_experts: int
    expert_offset: int
    device_groups: int
    """Devices the experts are spread over (1 on one process; the EP size under expert parallelism)."""

    @abstractmethod
    def dispatch(
        self,
        x_TD: torch.Tensor,
        token_idx_A: torch.Tensor,
        expert_idx_A: torch.Tensor,
        weight_A: torch.Tensor,
        slots_per_token: int | None = None,
        device_capacity: DeviceCapacity | None = None,
    ) -> Dispatched:
        """Group the A kept (token, expert) assignments' rows by local expert.

        ``slots_per_token=K`` promises that every token kept all its K slots, in
        token-major order (A = T * K, ``token_idx_A`` = 0,0,..,1,1,..): the dropless
        case, which a dispatcher may handle without scatters. ``device_capacity``
        (only for ``device_groups > 1``): drop at the receiving devices, reported
        in :attr:`Dispatched.keep_A`."""

    @abstractmethod
    def combine(self, y_RD: torch.Tensor, handle: Any) -> torch.Tensor:
        """Sum of each token's (already weighted) expert rows, back in token order [T, D], accumulated in fp32."""

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
        """Dispatch, ``experts(rows_RD, counts_E, weight_R)``, combine: the MoE layer's one call.

        ``overlap``: work the dispatcher runs while its communication is in flight, its result returned in
        :attr:`Combined.overlap_out`; here (nothing in flight) after the combine."""
        d = self.dispatch(
            x_TD, token_idx_A, expert_idx_A, weight_A, slots_per_token=slots_per_token, device_capacity=device_capacity
        )
        y_TD = self.combine(experts(d.rows_RD, d.counts_E, d.weight_R), d.handle)
        return Combined(y_TD, d.comm, d.keep_A, overlap.run() if overlap is not None else None)


@dataclass
class LocalHandle:
    token_idx_R: torch.Tensor
    """Token of each row, in expert-sorted order."""
    num_tokens: int
    inverse_TK: torch.Tensor | None = None
    """Dropless path: the row of each (token, slot), i.e. the inverse of the sort."""


class PermuteRows(torch.autograd.Function):
    """``src[perm]`` for a permutation ``perm``, whose backward is the inverse gather ``grad[inv]``.

    Plain indexing would scatter-add in the backward (``index_add_``: serial on CPU,
    atomic and non-deterministic on GPU); for a permutation the gradient is a gather.
    """

    @staticmethod
    def forward(ctx, src: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(inv)
        return src.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (inv,) = ctx.saved_tensors
        return grad.index_select(0, inv), None, None


SLOT_SUM_IMPLS = ("embedding_bag", "gather_sum", "triton")


def default_slot_sum(device: torch.device) -> str:
    """The :func:`sum_token_slots` implementation for a model on ``device``, chosen once when the model is built
    (:func:`moetrain.model.apply.apply_slot_sum`): ``embedding_bag`` on CPU (measured the fastest there,
    ``scripts/bench_moe.py --primitives``); on CUDA the one-pass Triton kernel where Triton is installed (it
    writes no [T*K, D] intermediate, which the gather then sum writes and reads back, in the combine and again
    in the dispatch's backward), else ``gather_sum``."""
    if device.type != "cuda":
        return "embedding_bag"
    return "triton" if find_spec("triton") is not None else "gather_sum"


def sum_token_slots(rows_RD: torch.Tensor, inverse_TK: torch.Tensor, impl: str) -> torch.Tensor:
    """``out[t] = sum_k rows[inverse[t, k]]`` in the rows' dtype, accumulated in fp32.

    ``impl`` (:data:`SLOT_SUM_IMPLS`, the model's choice by :func:`default_slot_sum`): ``embedding_bag``,
    one fused gather-and-sum with no [T*K, D] intermediate; ``gather_sum``, a gather then a sum over K
    (PyTorch's reductions accumulate 16-bit inputs in fp32); ``triton`` (CUDA), one pass with no [T*K, D]
    intermediate (:func:`moetrain.moe.triton_gemm.slot_sum`). ``bench_moe.py --primitives`` times all three.
    """
    rows_RD = rows_RD.contiguous()
    if impl == "embedding_bag":
        return F.embedding_bag(inverse_TK, rows_RD, mode="sum")
    if impl == "gather_sum":
        T, K = inverse_TK.shape
        return rows_RD.index_select(0, inverse_TK.reshape(-1)).view(T, K, -1).sum(1)
    if impl == "triton":
        from moetrain.moe.triton_gemm import slot_sum

        return slot_sum(rows_RD, inverse_TK)
    raise ValueError(f"unknown slot-sum implementation {impl!r}: one of {SLOT_SUM_IMPLS}")


class GatherTokens(torch.autograd.Function):
    """Dropless dispatch ``x[token_R]``: each token copied to its K expert-sorted rows.

    Forward: one gather from the [T, D] tokens (no [T*K, D] expanded copy first).
    Backward: each token's gradient is the sum of its K rows, read through the
    sort's inverse (:func:`sum_token_slots`). No scatter-add either way.
    """

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, token_R: torch.Tensor, inverse_TK: torch.Tensor, impl: str) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse_TK)
        ctx.impl = impl
        return x_TD.index_select(0, token_R)

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        (inverse_TK,) = ctx.saved_tensors
        return sum_token_slots(grad_RD, inverse_TK, ctx.impl), None, None, None


class SumTokenSlots(torch.autograd.Function):
    """Dropless combine ``out[t] = sum_k y[inverse[t, k]]``: the transpose of :class:`GatherTokens`.

    Forward: :func:`sum_token_slots`. Backward: each row's gradient is its token's,
    one gather ``grad[token_R]``. The combine weights were applied by the experts.
    """

    @staticmethod
    def forward(ctx, y_RD: torch.Tensor, inverse_TK: torch.Tensor, token_R: torch.Tensor, impl: str) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(token_R)
        return sum_token_slots(y_RD, inverse_TK, impl)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        (token_R,) = ctx.saved_tensors
        return grad_TD.contiguous().index_select(0, token_R), None, None, None


def count_per_bin(idx: torch.Tensor, num_bins: int) -> torch.Tensor:
    """``bincount(idx, minlength=num_bins)`` (long) by ``scatter_add``: no host sync on GPU (``bincount``
    sizes its output from the data); ``idx`` must lie in ``[0, num_bins)``."""
    out = torch.zeros(num_bins, dtype=torch.long, device=idx.device)
    return out.scatter_add_(0, idx, torch.ones_like(idx))


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[order[i]] = i``."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


class LocalDispatcher(Dispatcher):
    """Single process: one stable sort of the assignments by expert, then gathers.

    Dropless (``slots_per_token`` given): rows are a permutation of the T*K slots,
    so dispatch and combine are gathers both ways (forward and backward), the
    combine a sum over each token's K slots; no host synchronisation. With dropped
    assignments: one gather and one scatter-add.
    """

    device_groups = 1

    def __init__(self, num_experts: int, slot_sum: str = "embedding_bag") -> None:
        self.num_local_experts = num_experts
        self.expert_offset = 0
        self.slot_sum = slot_sum
        """How the dropless combine and the dispatch's backward sum each token's rows (:func:`sum_token_slots`);
        set for the model's device when it is built (:func:`default_slot_sum`)."""

    def dispatch(
        self,
        x_TD: torch.Tensor,
        token_idx_A: torch.Tensor,
        expert_idx_A: torch.Tensor,
        weight_A: torch.Tensor,
        slots_per_token: int | None = None,
        device_capacity: DeviceCapacity | None = None,
    ) -> Dispatched:
        if device_capacity is not None:
            raise ValueError("LocalDispatcher has one device: device-level dropping happens before dispatch")
        T = x_TD.shape[0]
        order_A = expert_idx_A.argsort(stable=True)
        inverse_A = inverse_permutation(order_A)
        counts_E = count_per_bin(expert_idx_A, self.num_local_experts)
        weight_R = PermuteRows.apply(weight_A, order_A, inverse_A)
        if slots_per_token is not None:
            K = slots_per_token
            token_R = order_A // K  # slots are token-major: slot a belongs to token a // K
            inverse_TK = inverse_A.view(T, K)
            rows_RD = GatherTokens.apply(x_TD, token_R, inverse_TK, self.slot_sum)
            return Dispatched(rows_RD, counts_E, weight_R, LocalHandle(token_R, T, inverse_TK))
        token_idx_R = token_idx_A[order_A]
        return Dispatched(x_TD[token_idx_R], counts_E, weight_R, LocalHandle(token_idx_R, T))

    def combine(self, y_RD: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        if handle.inverse_TK is not None:
            return SumTokenSlots.apply(y_RD, handle.inverse_TK, handle.token_idx_R, self.slot_sum)
        out_TD = y_RD.new_zeros(handle.num_tokens, y_RD.shape[-1], dtype=torch.float32)
        return out_TD.index_add_(0, handle.token_idx_R, y_RD.float())


def kept_within(keep: torch.Tensor, keep_of_kept: torch.Tensor) -> torch.Tensor:
    """``keep`` (a flat mask) with the elements it keeps turned off where ``keep_of_kept`` (one flag per kept
    element, in order) is False. No host sync (no ``nonzero``, no boolean indexing): kept element i is the
    ``cumsum(keep)[i] - 1``-th kept one."""
    if keep_of_kept.numel() == 0:  # nothing kept (a host shape, not a device value)
        return keep
    return keep & keep_of_kept[(keep.cumsum(0) - 1).clamp_min(0)]


def kept_after_dispatch(keep_TK: torch.Tensor, keep_A: torch.Tensor | None) -> torch.Tensor:
    """``keep_TK`` with the assignments a dispatcher dropped (``keep_A`` over the kept ones) turned off."""
    if keep_A is None:
        return keep_TK
    return kept_within(keep_TK.reshape(-1), keep_A).view_as(keep_TK)
