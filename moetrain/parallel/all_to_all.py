"""Expert-parallel dispatch and combine by uneven all-to-all over one EP group.

:func:`moetrain.parallel.apply_expert_parallel` installs an
:class:`AllToAllDispatcher` in every MoE layer; it implements the
:class:`~moetrain.moe.dispatch.Dispatcher` protocol, so the layer does not know
whether it is distributed. Besides the rows it returns, in its
:class:`~moetrain.moe.dispatch.Dispatched`, the traffic of the exchange
(:class:`~moetrain.moe.dispatch.CommStats`) and the assignments the receivers dropped (``keep_A``).

Shape suffixes: T tokens, D model dim, A assignments, P (token, destination)
rows sent, Q rows received, R rows at the local experts, E local experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moetrain.moe.capacity import rank_within_segment
from moetrain.moe.dispatch import (
    Combined,
    CommStats,
    DeviceCapacity,
    Dispatched,
    Dispatcher,
    OverlapWork,
    PermuteRows,
    count_per_bin,
    inverse_permutation,
)
from moetrain.parallel.collectives import all_to_all_detached, start_all_to_all
from moetrain.parallel.device_drop import drop_at_devices

META_BYTES = 2 * 8 + 4
"""Bytes of routing metadata per (token, expert) assignment sent: int64 row index, int64 local expert, fp32 weight."""


class RecvOverflowError(RuntimeError):
    """A rank would receive more rows than ``moe.max_recv_factor`` allows (``moe.recv_overflow=error``)."""


def local_expert_slice(num_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """``(offset, count)`` of the experts EP rank ``ep_rank`` holds: a contiguous block of ``num_experts / ep``.

    The one check that the experts split evenly over the EP ranks (sharding and dispatch both use it).
    """
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by the EP size {ep_size}")
    count = num_experts // ep_size
    return ep_rank * count, count


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


@dataclass
class _Sent:
    """The sender's side of one dispatch, after the count exchange (host splits and device counts)."""

    send_rows_P: torch.Tensor
    send_assign_P: torch.Tensor
    recv_counts_P2: torch.Tensor
    """[rows, assignments] received from each rank (device)."""
    send_rows: list[int]
    send_assign: list[int]
    recv_rows: list[int]
    recv_assign: list[int]


class AllToAllDispatcher(Dispatcher):
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
    reads device values on the host. The receive budget (``moe.max_recv_factor``, off
    by default) adds two: its all-reduced totals (the budget and the error are
    decided on the host) and, when it drops, the kept assignments' count (one
    ``nonzero``, then gathers); device-level dropping adds none (its budget and
    masks stay on the device).

    Counted per dispatch (:attr:`Dispatched.comm`): rows sent to other ranks
    (``r_s``), rows received from other ranks (``r_r``), assignments sent to
    other ranks (``a_s``); ``bytes = (r_s + r_r) * D * itemsize(x) + a_s *
    META_BYTES`` — the dispatch payload, its metadata, and the combine rows this
    rank returns.

    Receive budget (``max_recv_factor``, docs/parallelism.md "Receive budget"): after the
    count exchange an all-reduce of the per-destination assignment counts gives
    every rank the expert rows each EP rank would receive. Over
    ``floor(factor * total / ep)`` the forward either raises
    :class:`RecvOverflowError` on every rank (``overflow="error"``), or
    (``"drop"``) each sender keeps at most its proportional share
    ``floor(budget * a_sd / recv_d)`` of the over-budget destination's rows,
    dropping its lowest-weight assignments first (the capacity rule, applied
    per sender so no affinities need to be exchanged). Assignments dropped here
    or by device-level dropping come back in :attr:`Dispatched.keep_A`.

    Overlap (:meth:`run`'s ``overlap``, the shared experts; DeepSeek-V3 technical report
    sec. 3.2.1-3.2.2, Megatron-Core's ``moe_shared_expert_overlap``): every exchange is
    launched asynchronously (:func:`~moetrain.parallel.collectives.start_all_to_all`).
    Forward: the shared experts' up projections and activation run while the dispatch's
    rows, metadata and weights are in flight, their down projection and gate while the
    combine's rows are. Backward, by the order the autograd engine runs ready nodes: the
    combine's reverse exchange is launched, the down projection's and gate's backward run,
    then it is waited for; the routed experts' backward; the dispatch's reverse exchanges
    are launched, the up projections' backward runs, then they are waited for. What cannot
    overlap: the count exchange (its splits are needed on the host before any row moves),
    the routed experts (they need the received rows), the receive budget's and device-level
    dropping's collectives (they need the counts or the received weights), and the routing
    before it all. The gradients arrive in the sequential order: the results are bitwise
    those of ``overlap_work=False``.
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
        overlap_work: bool = True,
    ) -> None:
        if overflow not in ("drop", "error"):
            raise ValueError(f"overflow={overflow!r}: must be drop or error")
        self.expert_offset, self.num_local_experts = local_expert_slice(num_experts, ep_size, ep_rank)
        self.num_global_experts = num_experts
        self.ep_size, self.ep_rank, self.group = ep_size, ep_rank, group
        self.rank, self.world_size, self.layer_idx = rank, world_size, layer_idx
        self.max_recv_factor, self.overflow = max_recv_factor, overflow
        self.device_groups = ep_size
        self.overlap_work = overlap_work
        """Run :meth:`run`'s ``overlap`` while the all-to-alls are in flight (off: after the combine, the
        sequential order; the results are bitwise the same either way)."""

    # ------------------------------------------------------------------ guardrail
    def _recv_budget_keep(
        self, dest_A: torch.Tensor, weight_A: torch.Tensor, send_assign_P: torch.Tensor
    ) -> torch.Tensor | None:
        """Keep mask over the assignments under the receive budget (``None`` = all kept)."""
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
        # Each sender's share of an over-budget destination, on the device (no host read per destination).
        over_P = recv_total > budget
        quota = torch.where(over_P, budget * send_assign_P // recv_total.clamp_min(1), torch.iinfo(torch.long).max)
        # Rank of each assignment among those to its destination, by descending weight (stable).
        rank_A = rank_within_segment(dest_A, weight_A.detach(), self.ep_size)
        return rank_A < quota[dest_A]

    def _apply_recv_budget(
        self, token_idx_A: torch.Tensor, expert_idx_A: torch.Tensor, weight_A: torch.Tensor,
        prio_A: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor | None]:  # fmt: skip
        """``(keep_A, dropped, (token, expert, weight, dest) of the kept, their priorities)``."""
        dest_A = expert_idx_A // self.num_local_experts
        kept = (token_idx_A, expert_idx_A, weight_A, dest_A)
        dropped = torch.zeros((), device=dest_A.device)
        if self.max_recv_factor is None:
            return None, dropped, kept, prio_A
        keep_A = self._recv_budget_keep(dest_A, weight_A, count_per_bin(dest_A, self.ep_size))
        if keep_A is None:
            return None, dropped, kept, prio_A
        kept_idx = keep_A.nonzero().squeeze(1)  # one host sync for the kept assignments' count, then gathers
        return (
            keep_A,
            (~keep_A).sum().float(),
            tuple(t.index_select(0, kept_idx) for t in kept),
            None if prio_A is None else prio_A.index_select(0, kept_idx),
        )

    # ------------------------------------------------------------------ dispatch
    def _rows(
        self, T: int, token_idx_A: torch.Tensor, dest_A: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Callable[[int], torch.Tensor]]:
        """(token, destination) rows, sorted by destination then token, without host sync.

        Returns the rows per destination [ep], each assignment's row [A], and a
        function of the (host) row total giving each row's token. Deduplicated:
        a hit table over the ep * T (destination, token) keys; a row's index is
        the number of hits before its key.
        """
        key_A = dest_A * T + token_idx_A
        hit_K = torch.zeros(self.ep_size * T, dtype=torch.bool, device=dest_A.device).scatter_(0, key_A, True)
        send_rows_P = hit_K.view(self.ep_size, T).sum(dim=1)
        row_of_A = (hit_K.cumsum(0) - 1)[key_A]
        # the hit keys in key order: a stable sort puts hits (0) before misses (1)
        return send_rows_P, row_of_A, lambda n: (~hit_K).to(torch.uint8).argsort(stable=True)[:n] % max(T, 1)

    def _exchange_counts(self, send_rows_P: torch.Tensor, send_assign_P: torch.Tensor) -> _Sent:
        """Count exchange: [rows, assignments] for every pair of ranks; the one host sync."""
        ep = self.ep_size
        counts_P2 = all_to_all_detached(
            torch.stack([send_rows_P, send_assign_P], dim=1), [1] * ep, [1] * ep, self.group
        )
        host = torch.cat([counts_P2.reshape(-1), send_rows_P, send_assign_P]).tolist()
        return _Sent(
            send_rows_P, send_assign_P, counts_P2,
            send_rows=host[2 * ep : 3 * ep], send_assign=host[3 * ep :],
            recv_rows=host[0 : 2 * ep : 2], recv_assign=host[1 : 2 * ep : 2],
        )  # fmt: skip

    def _expand(
        self, s: _Sent, meta_recv: torch.Tensor, w_recv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Receiver: each received row expanded to its local experts, stably sorted by local expert.

        Returns the received row of each expert row, the rows per local expert and the rows' weights."""
        recv_rows_Q, recv_assign_Q = s.recv_counts_P2[:, 0], s.recv_counts_P2[:, 1]
        src_start = recv_rows_Q.cumsum(0) - recv_rows_Q
        src_of_a = torch.repeat_interleave(
            torch.arange(self.ep_size, device=w_recv.device), recv_assign_Q, output_size=sum(s.recv_assign)
        )  # output_size: no sync
        row_idx = meta_recv[:, 0] + src_start[src_of_a]
        local_e = meta_recv[:, 1]
        order_R = local_e.argsort(stable=True)
        weight_R = PermuteRows.apply(w_recv, order_R, inverse_permutation(order_R))
        return row_idx[order_R], count_per_bin(local_e, self.num_local_experts), weight_R

    def _comm_stats(self, s: _Sent, row_bytes: int, dropped: torch.Tensor) -> CommStats:
        """Traffic, from the device counts (no host values copied back to the device)."""
        k = self.ep_rank
        recv_rows_Q, recv_assign_Q = s.recv_counts_P2[:, 0], s.recv_counts_P2[:, 1]
        r_s = s.send_rows_P.sum() - s.send_rows_P[k]
        r_r = recv_rows_Q.sum() - recv_rows_Q[k]
        a_s = s.send_assign_P.sum() - s.send_assign_P[k]
        recv_W = torch.zeros(self.world_size, device=dropped.device)
        recv_W[self.rank] = recv_assign_Q.sum().float()
        return CommStats(
            rows_sent=r_s.float(),
            bytes_sent=((r_s + r_r) * row_bytes + a_s * META_BYTES).float(),
            rows_local=s.send_rows_P[k].float(),
            rows_total=s.send_rows_P.sum().float(),
            recv_rows_W=recv_W,
            dropped=dropped,
        )

    # ------------------------------------------------------------------ the exchanges
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
        """Dispatch, experts, combine, with ``overlap``'s first stage run while the dispatch's rows, metadata
        and weights are in flight and its second while the combine's rows are (the class docstring says
        what overlaps in the backward); after the combine when :attr:`overlap_work` is off."""
        if overlap is None or not self.overlap_work:
            args = (x_TD, token_idx_A, expert_idx_A, weight_A, slots_per_token, device_capacity, overlap)
            return super().run(experts, *args)
        d, h = self._dispatch(x_TD, token_idx_A, expert_idx_A, weight_A, device_capacity, overlap.during_dispatch)
        assert h is not None  # the first stage's result
        y_RD = experts(d.rows_RD, d.counts_E, d.weight_R)
        y_TD, side_TD = self._combine(y_RD, d.handle, lambda: overlap.during_combine(h))
        return Combined(y_TD, d.comm, d.keep_A, side_TD)

    def dispatch(
        self,
        x_TD: torch.Tensor,
        token_idx_A: torch.Tensor,
        expert_idx_A: torch.Tensor,
        weight_A: torch.Tensor,
        slots_per_token: int | None = None,
        device_capacity: DeviceCapacity | None = None,
    ) -> Dispatched:
        return self._dispatch(x_TD, token_idx_A, expert_idx_A, weight_A, device_capacity)[0]

    def combine(self, y_RD: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        """Sum each received row's (weighted) expert outputs, return one row per (token, rank), sum per token."""
        return self._combine(y_RD, handle)[0]

    def _dispatch(
        self, x_TD: torch.Tensor, token_idx_A: torch.Tensor, expert_idx_A: torch.Tensor, weight_A: torch.Tensor,
        device_capacity: DeviceCapacity | None, during: Callable[[], torch.Tensor] | None = None,
    ) -> tuple[Dispatched, torch.Tensor | None]:  # fmt: skip
        """The dispatch, and what ``during`` returned (run while the rows, metadata and weights are in flight)."""
        E, (T, D) = self.num_local_experts, x_TD.shape
        prio_A = device_capacity.priority_A if device_capacity is not None else None
        keep_A, dropped, kept, prio_A = self._apply_recv_budget(token_idx_A, expert_idx_A, weight_A, prio_A)
        token_idx_A, expert_idx_A, weight_A, dest_A = kept
        send_rows_P, row_of_A, tokens_of_rows = self._rows(T, token_idx_A, dest_A)

        # Metadata in row order: the row within its destination chunk, the destination's local expert, the weight.
        order_A = row_of_A.argsort(stable=True)
        row_start_P = send_rows_P.cumsum(0) - send_rows_P
        dest_sorted = dest_A[order_A]
        meta_A2 = torch.stack(
            [row_of_A[order_A] - row_start_P[dest_sorted], expert_idx_A[order_A] - dest_sorted * E], dim=1
        )
        w_send_A = PermuteRows.apply(weight_A.float(), order_A, inverse_permutation(order_A))

        s = self._exchange_counts(send_rows_P, count_per_bin(dest_A, self.ep_size))
        token_P = tokens_of_rows(sum(s.send_rows))
        rows = start_all_to_all(x_TD.index_select(0, token_P), s.recv_rows, s.send_rows, self.group)
        meta = start_all_to_all(meta_A2, s.recv_assign, s.send_assign, self.group)
        w = start_all_to_all(w_send_A, s.recv_assign, s.send_assign, self.group)
        side = during() if during is not None else None
        rows_recv_QD, meta_recv, w_recv = rows.wait(), meta.wait(), w.wait()
        if device_capacity is not None:
            assert prio_A is not None
            sent = (s.send_assign_P, s.send_assign, s.recv_assign)
            w_recv, keep_A = drop_at_devices(device_capacity, prio_A, order_A, sent, w_recv, keep_A, self.group)

        row_idx_R, counts_E, weight_R = self._expand(s, meta_recv, w_recv)
        handle = AllToAllHandle(row_idx_R, sum(s.recv_rows), token_P, T, s.send_rows, s.recv_rows)
        comm = self._comm_stats(s, D * x_TD.element_size(), dropped)
        return Dispatched(rows_recv_QD[row_idx_R], counts_E, weight_R, handle, comm, keep_A), side

    def _combine(
        self, y_RD: torch.Tensor, handle: AllToAllHandle, during: Callable[[], torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The combine, and what ``during`` returned (run while the returned rows are in flight)."""
        D = y_RD.shape[-1]
        partial_QD = y_RD.new_zeros(handle.num_recv, D, dtype=torch.float32).index_add_(
            0, handle.row_idx_R, y_RD.float()
        )
        back = start_all_to_all(partial_QD.to(y_RD.dtype), handle.send_splits, handle.recv_splits, self.group)
        side = during() if during is not None else None
        out_TD = partial_QD.new_zeros(handle.num_tokens, D)
        return out_TD.index_add_(0, handle.token_idx_P, back.wait().float()), side
