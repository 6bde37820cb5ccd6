"""Dispatchers: move (token, expert) assignments to their experts and back.

The MoE layer talks to other ranks only through a dispatcher object it is
given; :class:`LocalDispatcher` is the single-process one, and
``moetrain.parallel`` swaps in the all-to-all one under expert parallelism.

Shape suffixes: T tokens, D model dim, A assignments, R rows at the experts,
E local experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F


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


class DeviceCapacity(NamedTuple):
    """DeepSeek-V2 device-level dropping done by the receiving devices (a dispatcher with ``device_groups > 1``)."""

    factor: float
    """Budget per device: ceil(factor * A / D) over all senders' A assignments."""
    priority_A: torch.Tensor
    """Each assignment's affinity (float; +inf for a protected sequence's tokens, which are never dropped)."""


class Dispatcher(Protocol):
    num_local_experts: int
    expert_offset: int
    device_groups: int
    """Devices the experts are spread over (1 on one process; the EP size under expert parallelism)."""

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
        in ``Dispatched.comm.keep_A``."""
        ...

    def combine(self, y_RD: torch.Tensor, handle: Any) -> torch.Tensor:
        """Sum of each token's (already weighted) expert rows, back in token order [T, D], accumulated in fp32."""
        ...


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


def sum_token_slots(rows_RD: torch.Tensor, inverse_TK: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """``out[t] = sum_k rows[inverse[t, k]]`` in the rows' dtype, accumulated in fp32.

    ``impl`` (:data:`SLOT_SUM_IMPLS`): ``embedding_bag``, one fused gather-and-sum (the default on
    CPU, measured faster there, see ``scripts/bench_moe.py``); ``gather_sum``, a gather then a sum
    over K (PyTorch's reductions accumulate 16-bit inputs in fp32; the default elsewhere);
    ``triton`` (CUDA), one pass with no [T*K, D] intermediate (:func:`moetrain.moe.triton_gemm.slot_sum`).
    ``bench_moe.py --primitives`` times all three.
    """
    rows_RD = rows_RD.contiguous()
    if impl is None:
        impl = "embedding_bag" if rows_RD.device.type == "cpu" else "gather_sum"
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
    def forward(ctx, x_TD: torch.Tensor, token_R: torch.Tensor, inverse_TK: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse_TK)
        return x_TD.index_select(0, token_R)

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (inverse_TK,) = ctx.saved_tensors
        return sum_token_slots(grad_RD, inverse_TK), None, None


class SumTokenSlots(torch.autograd.Function):
    """Dropless combine ``out[t] = sum_k y[inverse[t, k]]``: the transpose of :class:`GatherTokens`.

    Forward: :func:`sum_token_slots`. Backward: each row's gradient is its token's,
    one gather ``grad[token_R]``. The combine weights were applied by the experts.
    """

    @staticmethod
    def forward(ctx, y_RD: torch.Tensor, inverse_TK: torch.Tensor, token_R: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(token_R)
        return sum_token_slots(y_RD, inverse_TK)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (token_R,) = ctx.saved_tensors
        return grad_TD.contiguous().index_select(0, token_R), None, None


def count_per_bin(idx: torch.Tensor, num_bins: int) -> torch.Tensor:
    """``bincount(idx, minlength=num_bins)`` (long) by ``scatter_add``: no host sync on GPU (``bincount``
    sizes its output from the data); ``idx`` must lie in ``[0, num_bins)``."""
    out = torch.zeros(num_bins, dtype=torch.long, device=idx.device)
    return out.scatter_add_(0, idx, torch.ones_like(idx))


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[order[i]] = i``."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


class LocalDispatcher:
    """Single process: one stable sort of the assignments by expert, then gathers.

    Dropless (``slots_per_token`` given): rows are a permutation of the T*K slots,
    so dispatch and combine are gathers both ways (forward and backward), the
    combine a sum over each token's K slots; no host synchronisation. With dropped
    assignments: one gather and one scatter-add.
    """

    device_groups = 1

    def __init__(self, num_experts: int) -> None:
        self.num_local_experts = num_experts
        self.expert_offset = 0

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
            rows_RD = GatherTokens.apply(x_TD, token_R, inverse_TK)
            return Dispatched(rows_RD, counts_E, weight_R, LocalHandle(token_R, T, inverse_TK))
        token_idx_R = token_idx_A[order_A]
        return Dispatched(x_TD[token_idx_R], counts_E, weight_R, LocalHandle(token_idx_R, T))

    def combine(self, y_RD: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        if handle.inverse_TK is not None:
            return SumTokenSlots.apply(y_RD, handle.inverse_TK, handle.token_idx_R)
        out_TD = y_RD.new_zeros(handle.num_tokens, y_RD.shape[-1], dtype=torch.float32)
        return out_TD.index_add_(0, handle.token_idx_R, y_RD.float())


# ----------------------------------------------------------------------------- expert parallel

META_BYTES = 2 * 8 + 4
"""Bytes of routing metadata per (token, expert) assignment sent: int64 row index, int64 local expert, fp32 weight."""


class RecvOverflowError(RuntimeError):
    """A rank would receive more rows than ``moe.max_recv_factor`` allows (``moe.recv_overflow=error``)."""


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    """``dist.all_to_all_single`` with uneven first-dim splits, returning a new tensor.

    gloo has no all-to-all for CUDA tensors, so under gloo (several ranks on one
    GPU, smoke runs) the exchange goes through host memory.
    """
    import torch.distributed as dist

    via_host = x.is_cuda and dist.get_backend(group) == "gloo"
    src = x.detach().cpu() if via_host else x.detach()
    out = src.new_empty((sum(out_splits), *src.shape[1:]))
    dist.all_to_all_single(out, src.contiguous(), out_splits, in_splits, group=group)
    return out.to(x.device) if via_host else out


class _AllToAll(torch.autograd.Function):
    """Differentiable uneven all-to-all: the backward is the reverse exchange of the gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _all_to_all(grad.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    """Send ``x[sum(in_splits[:j]) : ...]`` to rank j of ``group``; autograd-aware when ``x`` needs a gradient."""
    if x.requires_grad:
        return _AllToAll.apply(x, out_splits, in_splits, group)
    return _all_to_all(x, out_splits, in_splits, group)


@dataclass
class CommStats:
    """What one all-to-all dispatch + combine moved, for one forward on one rank (tensors, no host sync)."""

    rows_sent: torch.Tensor
    """(token, rank) rows this rank sent to *other* ranks in the dispatch."""
    bytes_sent: torch.Tensor
    """Payload bytes this rank sends to other ranks in the dispatch and the combine (see :class:`AllToAllDispatcher`)."""
    rows_local: torch.Tensor
    """(token, rank) rows whose destination was this rank itself (no network)."""
    rows_total: torch.Tensor
    """All (token, rank) rows of this rank's tokens (local + sent)."""
    recv_rows_W: torch.Tensor
    """Expert rows (one per (token, local expert)) this rank computed, at its global rank's entry of a [W] vector."""
    dropped: torch.Tensor
    """Assignments of this rank's tokens dropped by the receive budget (``moe.max_recv_factor``)."""
    keep_A: torch.Tensor | None = None
    """Which input assignments survived the receive budget (``None`` = all)."""


@dataclass
class AllToAllHandle:
    row_idx_R: torch.Tensor
    """For each expert row, the received (token, rank) row it was expanded from."""
    num_recv: int
    token_idx_P: torch.Tensor
    """Token of each (token, rank) row this rank sent, in send order."""
    num_tokens: int
    send_splits: list[int]
    recv_splits: list[int]


class AllToAllDispatcher:
    """Expert-parallel dispatch and combine over one EP group by uneven all-to-all.

    Sender (this rank's T tokens, A kept (token, expert) assignments with global
    expert ids): an assignment goes to EP rank ``expert // E`` (E = experts per
    rank). Assignments are grouped into (token, destination rank) *rows*: a
    token is sent **once per destination rank**, however many of its experts
    live there (DeepSeek-V2, arXiv 2405.04434, sec. 2.2.2-2.2.3: with device-limited
    routing a token's communication is bounded by M devices). One small
    all-to-all exchanges the row and assignment counts; then the hidden rows
    (in the dtype given, the compute dtype) and the metadata (row index within
    the chunk, local expert id; fp32 weight) travel with uneven
    ``all_to_all_single``.

    Receiver: expands each received row into one row per (token, local expert)
    it was sent for, stably sorted by local expert (deterministic order:
    expert, then source rank, then the sender's order); the experts run on the
    expert-contiguous segments and scale each row by its weight. :meth:`combine`
    sums each received row's expert outputs in fp32 (partial combine), returns
    ONE row per (token, rank) in the rows' dtype by the reverse all-to-all, and
    the sender sums the returned rows per token in fp32. Autograd runs back
    through both exchanges.

    Host synchronisation: exactly one per dispatch, the count exchange's copy to
    the host (the splits of the uneven all-to-alls must be known there). Rows are
    deduplicated through a [ep, T] hit table and a cumulative sum, not
    ``torch.unique``; counts by ``scatter_add``, not ``bincount``; nothing else
    reads device values on the host. The receive budget adds one more (its
    all-reduced totals).

    Counted per dispatch (:attr:`Dispatched.comm`): rows sent to other ranks
    (``r_s``), rows received from other ranks (``r_r``), assignments sent to
    other ranks (``a_s``); ``bytes = (r_s + r_r) * D * itemsize(x) + a_s *
    META_BYTES`` — the dispatch payload, its metadata, and the combine rows this
    rank returns.

    ``dedup=False`` sends one row per (token, expert) instead (the naive
    dispatcher, for ``scripts/bench_dispatch.py``).

    Receive budget (``max_recv_factor``, DESIGN.md "Parallel layout"): after the
    count exchange an all-reduce of the per-destination assignment counts gives
    every rank the expert rows each EP rank would receive. Over
    ``floor(factor * total / ep)`` the forward either raises
    :class:`RecvOverflowError` on every rank (``overflow="error"``), or
    (``"drop"``) each sender keeps at most its proportional share
    ``floor(budget * a_sd / recv_d)`` of the over-budget destination's rows,
    dropping its lowest-weight assignments first (the capacity rule, applied
    per sender so no affinities need to be exchanged).
    """

    def __init__(
        self,
        num_experts: int,
        ep_size: int,
        ep_rank: int,
        group: Any,
        rank: int = 0,
        world_size: int = 1,
        layer_idx: int = 0,
        max_recv_factor: float | None = None,
        overflow: str = "drop",
        dedup: bool = True,
    ) -> None:
        if num_experts % ep_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by the EP size {ep_size}")
        if overflow not in ("drop", "error"):
            raise ValueError(f"overflow={overflow!r}: must be drop or error")
        self.num_global_experts = num_experts
        self.ep_size, self.ep_rank, self.group = ep_size, ep_rank, group
        self.num_local_experts = num_experts // ep_size
        self.expert_offset = ep_rank * self.num_local_experts
        self.rank, self.world_size, self.layer_idx = rank, world_size, layer_idx
        self.max_recv_factor, self.overflow, self.dedup = max_recv_factor, overflow, dedup
        self.device_groups = ep_size

    # ------------------------------------------------------------------ device-level dropping
    def _device_keep(
        self, device_capacity: DeviceCapacity, prio_send_A: torch.Tensor, send_assign_P: torch.Tensor,
        recv_assign: list[int], send_assign: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """DeepSeek-V2 device-level dropping at the receiver (arXiv 2405.04434, sec. 2.2.4), no host sync.

        This rank is one device. Its budget is ceil(factor * A / D) with A the
        assignments of every sender of the EP group (an all-reduce); it keeps its
        received assignments with the highest affinities, protected ones (+inf)
        always. Received assignments arrive in (source rank, token, slot) order,
        the order of one process's batch of all the ranks' tokens, so a stable
        sort breaks ties as :func:`~moetrain.moe.routing.device_capacity_keep`
        does there. Returns the keep mask in receive order, and each sent
        assignment's keep flag sent back, in send order.
        """
        import torch.distributed as dist

        from moetrain.moe.routing import device_budget

        total = send_assign_P.sum().reshape(1)
        dist.all_reduce(total, group=self.group)
        budget = device_budget(device_capacity.factor, total, self.ep_size)
        prio_recv = _all_to_all(prio_send_A.double(), recv_assign, send_assign, self.group)
        rank_R = inverse_permutation(prio_recv.argsort(descending=True, stable=True))
        keep_recv = (rank_R < budget) | torch.isposinf(prio_recv)
        keep_sent = _all_to_all(keep_recv.to(torch.uint8), send_assign, recv_assign, self.group).bool()
        return keep_recv, keep_sent

    # ------------------------------------------------------------------ guardrail
    def _recv_budget_keep(
        self, dest_A: torch.Tensor, weight_A: torch.Tensor, send_assign_P: torch.Tensor
    ) -> torch.Tensor | None:
        """Keep mask over the assignments under the receive budget (``None`` = all kept)."""
        import torch.distributed as dist

        recv_total = send_assign_P.clone()
        dist.all_reduce(recv_total, group=self.group)  # expert rows each EP rank would receive
        recv = recv_total.tolist()
        total = sum(recv)
        budget = int(self.max_recv_factor * total / self.ep_size)  # type: ignore[operator]
        over = [d for d, c in enumerate(recv) if c > budget]
        if not over:
            return None
        if self.overflow == "error":
            d = over[0]
            raise RecvOverflowError(
                f"MoE layer {self.layer_idx}: EP rank {d} would receive {recv[d]} expert rows, over the budget "
                f"{budget} = moe.max_recv_factor {self.max_recv_factor} x balanced share {total / self.ep_size:.1f} "
                f"(rows per EP rank: {recv})"
            )
        quota = torch.full_like(send_assign_P, torch.iinfo(torch.long).max)
        for d in over:
            quota[d] = budget * int(send_assign_P[d]) // recv[d]
        # Rank of each assignment among those to its destination, by descending weight (stable).
        order = weight_A.detach().argsort(descending=True, stable=True)
        order = order[dest_A[order].argsort(stable=True)]
        starts = send_assign_P.cumsum(0) - send_assign_P
        rank_sorted = torch.arange(dest_A.numel(), device=dest_A.device) - starts[dest_A[order]]
        rank_A = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
        return rank_A < quota[dest_A]

    # ------------------------------------------------------------------ dispatch
    def _rows(
        self, T: int, token_idx_A: torch.Tensor, dest_A: torch.Tensor, send_assign_P: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Callable[[int], torch.Tensor]]:
        """(token, destination) rows, sorted by destination then token, without host sync.

        Returns the rows per destination [ep], each assignment's row [A], and a
        function of the (host) row total giving each row's token. Deduplicated:
        a hit table over the ep * T (destination, token) keys; a row's index is
        the number of hits before its key. ``dedup=False``: one row per
        assignment, in (destination, assignment) order.
        """
        ep, dev = self.ep_size, dest_A.device
        A = token_idx_A.numel()
        if not self.dedup:
            order = (dest_A * max(A, 1) + torch.arange(A, device=dev)).argsort()
            row_of_A = inverse_permutation(order)
            return send_assign_P, row_of_A, lambda n: token_idx_A[order[:n]]
        key_A = dest_A * T + token_idx_A
        hit_K = torch.zeros(ep * T, dtype=torch.bool, device=dev).scatter_(0, key_A, True)
        send_rows_P = hit_K.view(ep, T).sum(dim=1)
        row_of_A = (hit_K.cumsum(0) - 1)[key_A]
        # the hit keys in key order: a stable sort puts hits (0) before misses (1)
        return send_rows_P, row_of_A, lambda n: (~hit_K).to(torch.uint8).argsort(stable=True)[:n] % max(T, 1)

    def dispatch(
        self,
        x_TD: torch.Tensor,
        token_idx_A: torch.Tensor,
        expert_idx_A: torch.Tensor,
        weight_A: torch.Tensor,
        slots_per_token: int | None = None,
        device_capacity: DeviceCapacity | None = None,
    ) -> Dispatched:
        ep, E, dev = self.ep_size, self.num_local_experts, x_TD.device
        prio_A = device_capacity.priority_A if device_capacity is not None else None
        T, D = x_TD.shape
        dest_A = expert_idx_A // E
        send_assign_P = count_per_bin(dest_A, ep)

        keep_A = None
        dropped = torch.zeros((), device=dev)
        if self.max_recv_factor is not None:
            keep_A = self._recv_budget_keep(dest_A, weight_A, send_assign_P)
            if keep_A is not None:
                dropped = (~keep_A).sum().float()
                token_idx_A, expert_idx_A, weight_A = token_idx_A[keep_A], expert_idx_A[keep_A], weight_A[keep_A]
                dest_A = dest_A[keep_A]
                send_assign_P = count_per_bin(dest_A, ep)
                if prio_A is not None:
                    prio_A = prio_A[keep_A]

        send_rows_P, row_of_A, tokens_of_rows = self._rows(T, token_idx_A, dest_A, send_assign_P)

        # Metadata in row order: the row within its destination chunk, the destination's local expert, the weight.
        order_A = row_of_A.argsort(stable=True)
        row_start_P = send_rows_P.cumsum(0) - send_rows_P
        dest_sorted = dest_A[order_A]
        meta_A2 = torch.stack(
            [row_of_A[order_A] - row_start_P[dest_sorted], expert_idx_A[order_A] - dest_sorted * E], dim=1
        )
        w_send_A = PermuteRows.apply(weight_A.float(), order_A, inverse_permutation(order_A))

        # Count exchange: [rows, assignments] for every pair of ranks; the one host sync.
        counts_P2 = _all_to_all(torch.stack([send_rows_P, send_assign_P], dim=1), [1] * ep, [1] * ep, self.group)
        host = torch.cat([counts_P2.reshape(-1), send_rows_P, send_assign_P]).tolist()
        recv_rows, recv_assign = host[0 : 2 * ep : 2], host[1 : 2 * ep : 2]
        send_rows, send_assign = host[2 * ep : 3 * ep], host[3 * ep :]

        token_P = tokens_of_rows(sum(send_rows))
        rows_recv_QD = all_to_all(x_TD.index_select(0, token_P), recv_rows, send_rows, self.group)
        meta_recv = _all_to_all(meta_A2, recv_assign, send_assign, self.group)
        w_recv = all_to_all(w_send_A, recv_assign, send_assign, self.group)
        if device_capacity is not None:
            assert prio_A is not None
            keep_recv, keep_sent = self._device_keep(
                device_capacity, prio_A[order_A], send_assign_P, recv_assign, send_assign
            )
            w_recv = w_recv * keep_recv.to(
                w_recv.dtype
            )  # a dropped row is computed with weight 0: no value, no gradient
            keep_dev_A = torch.empty_like(keep_sent).scatter_(0, order_A, keep_sent)  # back to this rank's A order
            if keep_A is None:
                keep_A = keep_dev_A
            else:  # compose with the receive budget's mask (over the original assignments)
                keep_A = keep_A.clone()
                keep_A[keep_A.clone()] = keep_dev_A

        # Receiver: expand each row to its local experts, stably sorted by local expert.
        recv_rows_Q, recv_assign_Q = counts_P2[:, 0], counts_P2[:, 1]
        src_start = recv_rows_Q.cumsum(0) - recv_rows_Q
        src_of_a = torch.repeat_interleave(
            torch.arange(ep, device=dev), recv_assign_Q, output_size=sum(recv_assign)
        )  # output_size: no sync
        row_idx = meta_recv[:, 0] + src_start[src_of_a]
        local_e = meta_recv[:, 1]
        order_R = local_e.argsort(stable=True)
        row_idx_R = row_idx[order_R]
        counts_E = count_per_bin(local_e, E)
        weight_R = PermuteRows.apply(w_recv, order_R, inverse_permutation(order_R))

        # Traffic, from the device counts (no host values copied back to the device).
        k = self.ep_rank
        r_s = send_rows_P.sum() - send_rows_P[k]
        r_r = recv_rows_Q.sum() - recv_rows_Q[k]
        a_s = send_assign_P.sum() - send_assign_P[k]
        recv_W = torch.zeros(self.world_size, device=dev)
        recv_W[self.rank] = recv_assign_Q.sum().float()
        comm = CommStats(
            rows_sent=r_s.float(),
            bytes_sent=((r_s + r_r) * (D * x_TD.element_size()) + a_s * META_BYTES).float(),
            rows_local=send_rows_P[k].float(),
            rows_total=send_rows_P.sum().float(),
            recv_rows_W=recv_W,
            dropped=dropped,
            keep_A=keep_A,
        )
        handle = AllToAllHandle(
            row_idx_R=row_idx_R,
            num_recv=sum(recv_rows),
            token_idx_P=token_P,
            num_tokens=T,
            send_splits=send_rows,
            recv_splits=recv_rows,
        )
        return Dispatched(rows_recv_QD[row_idx_R], counts_E, weight_R, handle, comm)

    def combine(self, y_RD: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        """Sum each received row's (weighted) expert outputs, return one row per (token, rank), sum per token."""
        D = y_RD.shape[-1]
        partial_QD = y_RD.new_zeros(handle.num_recv, D, dtype=torch.float32).index_add_(
            0, handle.row_idx_R, y_RD.float()
        )
        back_PD = all_to_all(partial_QD.to(y_RD.dtype), handle.send_splits, handle.recv_splits, self.group)
        out_TD = partial_QD.new_zeros(handle.num_tokens, D)
        return out_TD.index_add_(0, handle.token_idx_P, back_PD.float())


def kept_after_dispatch(keep_TK: torch.Tensor, keep_A: torch.Tensor | None) -> torch.Tensor:
    """``keep_TK`` with the assignments a dispatcher dropped (``keep_A`` over the kept ones) turned off."""
    if keep_A is None:
        return keep_TK
    flat = keep_TK.reshape(-1).clone()
    idx = flat.nonzero().squeeze(1)
    flat[idx[~keep_A]] = False
    return flat.view_as(keep_TK)
