"""Dispatchers: move (token, expert) assignments to their experts and back.

The MoE layer talks to other ranks only through a dispatcher object it is
given; :class:`LocalDispatcher` is the single-process one, and
``moetrain.parallel`` swaps in the all-to-all one under expert parallelism.

Shape suffixes: T tokens, D model dim, A assignments, R rows at the experts,
E local experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F


class Dispatcher(Protocol):
    num_local_experts: int
    expert_offset: int

    def dispatch(
        self,
        x_TD: torch.Tensor,
        token_idx_A: torch.Tensor,
        expert_idx_A: torch.Tensor,
        weight_A: torch.Tensor,
        slots_per_token: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Return rows grouped by local expert [R, D], rows per local expert [E], and a handle.

        ``slots_per_token=K`` promises that every token kept all its K slots, in
        token-major order (A = T * K, ``token_idx_A`` = 0,0,..,1,1,..): the dropless
        case, which a dispatcher may handle without scatters."""
        ...

    def combine(self, y_RD: torch.Tensor, handle: Any) -> torch.Tensor:
        """Weighted sum of the expert outputs back in token order [T, D]."""
        ...


@dataclass
class LocalHandle:
    token_idx_R: torch.Tensor | None
    """Token of each row, in expert-sorted order (both paths)."""
    weight_R: torch.Tensor
    """Combine weight of each row (masked path), or [T, K] in slot order (dropless path)."""
    num_tokens: int
    inverse_R: torch.Tensor | None = None
    """Dropless path: the inverse of the sort, taking expert-sorted rows back to slot order."""
    order_R: torch.Tensor | None = None


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


class GatherTokens(torch.autograd.Function):
    """Dropless dispatch ``x[token_R]``: each token copied to its K expert-sorted rows.

    Forward: one gather from the [T, D] tokens (no [T*K, D] expanded copy first).
    Backward: each token's gradient is the sum of its K rows, read through the
    sort's inverse: one fused gather-and-sum (``embedding_bag``) on CPU, a gather
    and a sum over K elsewhere. No scatter-add either way.
    """

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, token_R: torch.Tensor, inverse_TK: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse_TK)
        return x_TD.index_select(0, token_R)

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (inverse_TK,) = ctx.saved_tensors
        return sum_token_slots(grad_RD, inverse_TK, fused=grad_RD.device.type == "cpu"), None, None


def sum_token_slots(grad_RD: torch.Tensor, inverse_TK: torch.Tensor, fused: bool) -> torch.Tensor:
    """``out[t] = sum_k grad[inverse[t, k]]``: one ``embedding_bag`` (``fused``, CPU) or a gather and a sum."""
    grad_RD = grad_RD.contiguous()
    if fused:
        return F.embedding_bag(inverse_TK, grad_RD, mode="sum")
    T, K = inverse_TK.shape
    return grad_RD.index_select(0, inverse_TK.reshape(-1)).view(T, K, -1).sum(1)


class WeightedBagSum(torch.autograd.Function):
    """Dropless combine on CPU: ``out[t] = sum_k w[t, k] * y[inverse[t, k]]``.

    Forward: one fused gather-multiply-sum (``embedding_bag`` with per-sample
    weights) into [T, D], with no [T*K, D] intermediate in slot order. Backward:
    one gather ``g = dy[token_R]`` in row order; the weight gradient is the row-wise
    dot ``<y_r, g_r>`` taken back to slot order, and the rows' gradient is ``g``
    scaled by each row's weight in place. fp32 only (``embedding_bag`` wants the
    weights in the rows' dtype; other dtypes keep the fp32 einsum).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        y_RD: torch.Tensor,
        weight_TK: torch.Tensor,
        inverse_TK: torch.Tensor,
        token_R: torch.Tensor,
        order_R: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(y_RD, weight_TK, inverse_TK, token_R, order_R)
        return F.embedding_bag(inverse_TK, y_RD, per_sample_weights=weight_TK, mode="sum")

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, grad_TD: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        y_RD, weight_TK, inverse_TK, token_R, order_R = ctx.saved_tensors
        g_RD = grad_TD.contiguous().index_select(0, token_R)
        grad_w = None
        if ctx.needs_input_grad[1]:
            dot_R = torch.bmm(y_RD.unsqueeze(1), g_RD.unsqueeze(2)).view(-1)
            grad_w = dot_R.index_select(0, inverse_TK.reshape(-1)).view_as(weight_TK)
        grad_y = (
            g_RD.mul_(weight_TK.reshape(-1).index_select(0, order_R).unsqueeze(1)) if ctx.needs_input_grad[0] else None
        )
        return grad_y, grad_w, None, None, None


class LocalDispatcher:
    """Single process: one stable sort of the assignments by expert, then gathers.

    Dropless (``slots_per_token`` given): rows are a permutation of the T*K slots,
    so dispatch and combine are gathers both ways (forward and backward), the
    combine a weighted sum over each token's K slots (fused into one
    ``embedding_bag`` on CPU in fp32). With dropped assignments: one gather and
    one scatter-add.
    """

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
    ) -> tuple[torch.Tensor, torch.Tensor, LocalHandle]:
        T = x_TD.shape[0]
        order_A = expert_idx_A.argsort(stable=True)
        counts_E = torch.zeros(self.num_local_experts, dtype=torch.long, device=x_TD.device)
        counts_E.scatter_add_(0, expert_idx_A, torch.ones_like(expert_idx_A))  # no host sync (bincount has one)
        if slots_per_token is not None:
            K = slots_per_token
            inverse_A = torch.empty_like(order_A).scatter_(
                0, order_A, torch.arange(order_A.numel(), device=x_TD.device)
            )
            token_R = order_A // K  # slots are token-major: slot a belongs to token a // K
            rows_RD = GatherTokens.apply(x_TD, token_R, inverse_A.view(T, K))
            return rows_RD, counts_E, LocalHandle(token_R, weight_A.view(T, K), T, inverse_A, order_A)
        token_idx_R = token_idx_A[order_A]
        return x_TD[token_idx_R], counts_E, LocalHandle(token_idx_R, weight_A[order_A], T)

    def combine(self, y_RD: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        if handle.inverse_R is not None:
            assert handle.order_R is not None and handle.token_idx_R is not None
            T, K = handle.weight_R.shape
            if y_RD.device.type == "cpu" and y_RD.dtype == handle.weight_R.dtype == torch.float32:
                return WeightedBagSum.apply(
                    y_RD.contiguous(), handle.weight_R, handle.inverse_R.view(T, K), handle.token_idx_R, handle.order_R
                )
            y_TKD = PermuteRows.apply(y_RD, handle.inverse_R, handle.order_R).view(T, K, -1)
            return torch.einsum("tk,tkd->td", handle.weight_R.float(), y_TKD.float())
        weighted_RD = y_RD.float() * handle.weight_R.unsqueeze(-1)
        out_TD = weighted_RD.new_zeros(handle.num_tokens, y_RD.shape[-1])
        return out_TD.index_add_(0, handle.token_idx_R, weighted_RD)


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
    weight_R: torch.Tensor
    """Combine weight of each expert row (differentiable)."""
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
    live there (DeepSeek-V2, arXiv 2405.04434, sec. 2.2.3: with device-limited
    routing a token's communication is bounded by M devices). One small
    all-to-all exchanges the row and assignment counts; then the hidden rows
    (x dtype) and the metadata (row index within the chunk, local expert id,
    fp32 weight) travel with uneven ``all_to_all_single``.

    Receiver: expands each received row into one row per (token, local expert)
    it was sent for, stably sorted by local expert (deterministic order:
    expert, then source rank, then the sender's order); the experts run on the
    expert-contiguous segments. :meth:`combine` applies the weights, sums each
    received row's expert outputs (partial combine), returns ONE row per
    (token, rank) by the reverse all-to-all, and the sender sums the returned
    rows per token. Autograd runs back through both exchanges.

    Counted per forward (:attr:`last`): rows sent to other ranks (``r_s``), rows
    received from other ranks (``r_r``), assignments sent to other ranks
    (``a_s``); ``bytes = (r_s + r_r) * D * itemsize(x) + a_s * META_BYTES`` — the
    dispatch payload, its metadata, and the combine rows this rank returns.

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
        self.last: CommStats | None = None

    # ------------------------------------------------------------------ guardrail
    def _recv_budget_keep(
        self, dest_A: torch.Tensor, weight_A: torch.Tensor, send_assign_P: torch.Tensor
    ) -> torch.Tensor | None:
        """Keep mask over the assignments under the receive budget (``None`` = all kept)."""
        import torch.distributed as dist

        recv_total = send_assign_P.clone()
        dist.all_reduce(recv_total, group=self.group)  # expert rows each EP rank would receive
        total = int(recv_total.sum())
        budget = int(self.max_recv_factor * total / self.ep_size)  # type: ignore[operator]
        recv = recv_total.tolist()
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
    def dispatch(
        self,
        x_TD: torch.Tensor,
        token_idx_A: torch.Tensor,
        expert_idx_A: torch.Tensor,
        weight_A: torch.Tensor,
        slots_per_token: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, AllToAllHandle]:
        ep, E, dev = self.ep_size, self.num_local_experts, x_TD.device
        T, D = x_TD.shape
        dest_A = expert_idx_A // E
        send_assign_P = torch.bincount(dest_A, minlength=ep)

        keep_A = None
        dropped = torch.zeros((), device=dev)
        if self.max_recv_factor is not None:
            keep_A = self._recv_budget_keep(dest_A, weight_A, send_assign_P)
            if keep_A is not None:
                dropped = (~keep_A).sum().float()
                token_idx_A, expert_idx_A, weight_A = token_idx_A[keep_A], expert_idx_A[keep_A], weight_A[keep_A]
                dest_A = dest_A[keep_A]
                send_assign_P = torch.bincount(dest_A, minlength=ep)

        # (token, destination) rows, sorted by destination then token: one row per token and rank.
        A = token_idx_A.numel()
        per_row = torch.arange(A, device=dev) if not self.dedup else token_idx_A
        span = A if not self.dedup else T
        keys_P, row_of_A = torch.unique(dest_A * max(span, 1) + per_row, sorted=True, return_inverse=True)
        dest_P = keys_P // max(span, 1)
        token_P = keys_P % max(span, 1) if self.dedup else token_idx_A[keys_P % max(span, 1)]
        send_rows_P = torch.bincount(dest_P, minlength=ep)

        # Metadata in row order: the row within its destination chunk, the destination's local expert, the weight.
        order_A = row_of_A.argsort(stable=True)
        row_start_P = send_rows_P.cumsum(0) - send_rows_P
        dest_sorted = dest_A[order_A]
        meta_A2 = torch.stack(
            [row_of_A[order_A] - row_start_P[dest_sorted], expert_idx_A[order_A] - dest_sorted * E], dim=1
        )
        w_send_A = weight_A[order_A].float()

        # Count exchange: [rows, assignments] for every pair of ranks.
        counts_P2 = _all_to_all(torch.stack([send_rows_P, send_assign_P], dim=1), [1] * ep, [1] * ep, self.group)
        host = torch.cat([counts_P2.reshape(-1), send_rows_P, send_assign_P]).tolist()
        recv_rows, recv_assign = host[0 : 2 * ep : 2], host[1 : 2 * ep : 2]
        send_rows, send_assign = host[2 * ep : 3 * ep], host[3 * ep :]

        rows_recv_QD = all_to_all(x_TD[token_P], recv_rows, send_rows, self.group)
        meta_recv = _all_to_all(meta_A2, recv_assign, send_assign, self.group)
        w_recv = all_to_all(w_send_A, recv_assign, send_assign, self.group)

        # Receiver: expand each row to its local experts, stably sorted by local expert.
        src_start = torch.tensor(recv_rows, device=dev).cumsum(0) - torch.tensor(recv_rows, device=dev)
        src_of_a = torch.repeat_interleave(torch.arange(ep, device=dev), torch.tensor(recv_assign, device=dev))
        row_idx = meta_recv[:, 0] + src_start[src_of_a]
        local_e = meta_recv[:, 1]
        order_R = local_e.argsort(stable=True)
        row_idx_R = row_idx[order_R]
        counts_E = torch.bincount(local_e, minlength=E)

        k = self.ep_rank
        itemsize = x_TD.element_size()
        r_s = sum(send_rows) - send_rows[k]
        r_r = sum(recv_rows) - recv_rows[k]
        a_s = sum(send_assign) - send_assign[k]
        recv_W = torch.zeros(self.world_size, device=dev)
        recv_W[self.rank] = float(sum(recv_assign))
        self.last = CommStats(
            rows_sent=torch.tensor(float(r_s), device=dev),
            bytes_sent=torch.tensor(float((r_s + r_r) * D * itemsize + a_s * META_BYTES), device=dev),
            rows_local=torch.tensor(float(send_rows[k]), device=dev),
            rows_total=torch.tensor(float(sum(send_rows)), device=dev),
            recv_rows_W=recv_W,
            dropped=dropped,
            keep_A=keep_A,
        )
        handle = AllToAllHandle(
            row_idx_R=row_idx_R,
            weight_R=w_recv[order_R],
            num_recv=sum(recv_rows),
            token_idx_P=token_P,
            num_tokens=T,
            send_splits=send_rows,
            recv_splits=recv_rows,
        )
        return rows_recv_QD[row_idx_R], counts_E, handle

    def combine(self, y_RD: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        """Weight and sum each received row's expert outputs, return one row per (token, rank), sum per token."""
        weighted_RD = y_RD.float() * handle.weight_R.unsqueeze(-1)
        partial_QD = weighted_RD.new_zeros(handle.num_recv, y_RD.shape[-1]).index_add_(0, handle.row_idx_R, weighted_RD)
        back_PD = all_to_all(partial_QD.to(y_RD.dtype), handle.send_splits, handle.recv_splits, self.group)
        out_TD = weighted_RD.new_zeros(handle.num_tokens, y_RD.shape[-1])
        return out_TD.index_add_(0, handle.token_idx_P, back_PD.float())


def kept_after_dispatch(keep_TK: torch.Tensor, keep_A: torch.Tensor | None) -> torch.Tensor:
    """``keep_TK`` with the assignments a dispatcher dropped (``keep_A`` over the kept ones) turned off."""
    if keep_A is None:
        return keep_TK
    flat = keep_TK.reshape(-1).clone()
    idx = flat.nonzero().squeeze(1)
    flat[idx[~keep_A]] = False
    return flat.view_as(keep_TK)
