"""Capacity: which routed assignments are kept when an expert or a device is over its budget.

Shape suffixes: T tokens, N routed experts, K experts chosen per token, A flat
(token, expert) assignments.
"""

from __future__ import annotations

import torch


def capacity(num_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
    """Per-expert capacity C = ceil(factor * T * K / N) (GShard; Switch eq. 3 with K = 1)."""
    return int(-(-factor * num_tokens * top_k // num_experts))


DROP_POLICIES = ("score", "position")
"""Which assignments an over-capacity expert keeps (``moe.router.drop_policy``), as in Megatron-Core's
``moe_token_drop_policy`` pair: see :func:`drop_priority`."""


def drop_priority(scores_TN: torch.Tensor, expert_idx_TK: torch.Tensor, policy: str) -> torch.Tensor:
    """The priority [T, K] by which an over-capacity expert keeps assignments (highest first).

    ``score``: the affinity s_{i,t} of the assignment — the lowest-affinity ones
    are dropped first, whatever their slot (Megatron-Core's ``probs`` policy; the
    rule DeepSeek-V2 states for its device-level dropping, sec. 2.2.4).
    ``position``: the order of the papers that fill expert buffers in sequence.
    GShard (Lepikhin et al. 2020, Algorithm 1): every token's first choice is
    placed before any second choice (the second choices' positions start after
    the expert's first-choice count), each choice in token order; Switch
    Transformer (Fedus et al. 2021, sec. 2.2, K = 1): token order. So slot k of
    token t has priority ``-(k * T + t)``: slot-major, then token.
    """
    if policy == "score":
        return scores_TN.detach().gather(1, expert_idx_TK)
    if policy == "position":
        T, K = expert_idx_TK.shape
        dev = expert_idx_TK.device
        slot_major = torch.arange(K, device=dev).unsqueeze(0) * T + torch.arange(T, device=dev).unsqueeze(1)
        return -slot_major.to(torch.float64)
    raise ValueError(f"unknown drop policy {policy!r}: one of {DROP_POLICIES}")


def capacity_keep(
    expert_idx_TK: torch.Tensor, priority_TK: torch.Tensor, keep_TK: torch.Tensor, num_experts: int, cap: int
) -> torch.Tensor:
    """Keep at most ``cap`` assignments per expert, dropping the lowest-priority ones (:func:`drop_priority`).

    One sort over the A = T*K assignments (by expert, then by descending
    priority, ties in slot order); an assignment's rank within its expert is its
    position minus the expert's segment start. Memory O(T*K), no T x N x C tensor.
    Priorities are compared in float64, exact for fp32 affinities and for
    positions up to 2^53.
    """
    e_A = expert_idx_TK.reshape(-1)
    p_A = priority_TK.detach().reshape(-1).double().masked_fill(~keep_TK.reshape(-1), float("-inf"))
    rank_A = rank_within_segment(e_A, p_A, num_experts)
    return keep_TK & (rank_A < cap).view_as(keep_TK)


def rank_within_segment(segment_A: torch.Tensor, priority_A: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Each element's rank among the elements of its segment, by descending priority (ties in index order).

    One stable sort by priority descending, then one stable sort by segment:
    segments contiguous, best first; an element's rank is its position minus its
    segment's start. ``segment_A`` must lie in ``[0, num_segments)``. Used for
    capacity (segments = experts or devices) and for the receive budget of the
    all-to-all dispatcher (segments = destination ranks).
    """
    order = priority_A.argsort(descending=True, stable=True)
    order = order[segment_A[order].argsort(stable=True)]
    counts_S = torch.zeros(num_segments, dtype=torch.long, device=segment_A.device).scatter_add_(
        0, segment_A, torch.ones_like(segment_A)
    )
    starts_S = counts_S.cumsum(0) - counts_S
    rank_sorted = torch.arange(segment_A.numel(), device=segment_A.device) - starts_S[segment_A[order]]
    return torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)


def device_capacity_keep(
    expert_idx_TK: torch.Tensor,
    priority_TK: torch.Tensor,
    keep_TK: torch.Tensor,
    num_experts: int,
    num_groups: int,
    factor: float,
) -> torch.Tensor:
    """DeepSeek-V2 device-level token dropping (arXiv 2405.04434, sec. 2.2.4).

    Each device (group of ``num_experts / num_groups`` consecutive experts) gets
    the budget of ``factor`` times its average share, ceil(factor * A / D) with A
    the kept assignments entering this stage (the paper uses factor 1.0); on an
    over-budget device the assignments with the lowest affinity are dropped
    until it fits. Dropped assignments contribute nothing: the token keeps only
    its residual (and shared experts) for that slot. Assignments with priority
    +inf (the tokens of protected sequences, :func:`~moetrain.moe.routing.protected_sequences`) come
    first and are never dropped, even past the budget. On one process the devices
    are the ``num_groups`` groups of one batch; under expert parallelism with one
    device per EP rank the budget is per receiving device over all senders
    (``AllToAllDispatcher``, the same rule on the same global order).
    """
    group_TK = expert_idx_TK // (num_experts // num_groups)
    budget = device_budget(factor, int(keep_TK.sum()), num_groups)
    kept_TK = capacity_keep(group_TK, priority_TK, keep_TK, num_groups, int(budget))
    return kept_TK | (keep_TK & torch.isposinf(priority_TK))  # protected (+inf) assignments are never dropped


def device_budget(factor: float, num_assignments: int | torch.Tensor, num_groups: int) -> int | torch.Tensor:
    """ceil(factor * A / D), the per-device budget of DeepSeek-V2's device-level dropping (a tensor stays one:
    no host read)."""
    if isinstance(num_assignments, torch.Tensor):
        return -torch.div(-factor * num_assignments.double(), num_groups, rounding_mode="floor")
    return int(-(-factor * num_assignments // num_groups))
