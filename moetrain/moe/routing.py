"""Routing: pure functions from router logits to chosen experts and combine weights.

Shape suffixes: T tokens, N routed experts, K experts chosen per token,
G device groups, A flat (token, expert) assignments.

A routing decision for T tokens is a :class:`Routing`: ``expert_idx_TK`` and
``weight_TK`` (K slots per token) plus ``keep_TK`` (False where capacity dropped
the assignment). Strategies where a token may take a variable number of experts
(expert choice) use K = N with ``keep_TK`` marking the chosen ones, so every
later stage (capacity, dispatch, statistics) sees one representation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Routing of T tokens to experts."""

    expert_idx_TK: torch.Tensor
    """Chosen expert of each slot (long)."""
    weight_TK: torch.Tensor
    """Combine weight g of each slot (fp32, differentiable w.r.t. the router)."""
    keep_TK: torch.Tensor
    """False for slots dropped by capacity (or unused slots of variable-K strategies)."""
    scores_TN: torch.Tensor
    """Affinities s_{i,t} (softmax or sigmoid of the logits, without any bias), fp32."""
    logits_TN: torch.Tensor
    """Raw router logits x W_r, fp32 (for the z-loss)."""
    selected_TK: torch.Tensor | None = None
    """Slots chosen before capacity dropping (for f_i counts); ``None`` = all K slots."""


def affinities(logits_TN: torch.Tensor, score_fn: str) -> torch.Tensor:
    """s = softmax(x W_r) (GShard; DeepSeek-V2 eq. 9) or sigmoid(x W_r) (DeepSeek-V3 eq. 15)."""
    if score_fn == "softmax":
        return logits_TN.softmax(dim=-1)
    if score_fn == "sigmoid":
        return logits_TN.sigmoid()
    raise ValueError(f"unknown score_fn {score_fn!r}")


def group_limited_mask(
    sel_TN: torch.Tensor, num_groups: int, topk_groups: int, group_score: str, top_k: int
) -> torch.Tensor:
    """Experts a token may use under device-limited routing, as a bool mask [T, N].

    DeepSeek-V2 (arXiv 2405.04434, sec. 2.2.3): each token first selects the M
    devices whose best expert affinity is highest (``group_score="max"``), then
    top-K among the experts on those devices. DeepSeek-V3 (arXiv 2412.19437, sec.
    2.1.2, node-limited) scores a group by the sum of its top K/M affinities
    (``group_score="topk_sum"``, computed on s + b).
    """
    T, N = sel_TN.shape
    grouped_TGE = sel_TN.view(T, num_groups, N // num_groups)
    if group_score == "max":
        group_TG = grouped_TGE.amax(dim=-1)
    elif group_score == "topk_sum":
        per_group = max(1, top_k // topk_groups)
        group_TG = grouped_TGE.topk(per_group, dim=-1).values.sum(dim=-1)
    else:
        raise ValueError(f"unknown group_score {group_score!r}")
    top_groups_TM = group_TG.topk(topk_groups, dim=-1).indices
    allowed_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, top_groups_TM, True)
    return allowed_TG.repeat_interleave(N // num_groups, dim=1)


def topk_experts(
    sel_TN: torch.Tensor,
    top_k: int,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    group_score: str = "max",
) -> torch.Tensor:
    """Indices [T, K] of the K highest selection scores, optionally group-limited.

    ``sel_TN`` is what selection ranks: s (GShard, DeepSeek-V2) or s + b
    (loss-free balancing; DeepSeek-V3 eq. 16). Ties break towards the lower index.
    """
    if topk_groups is not None and num_groups is not None and topk_groups < num_groups:
        allowed = group_limited_mask(sel_TN, num_groups, topk_groups, group_score, top_k)
        sel_TN = sel_TN.masked_fill(~allowed, float("-inf"))
    return sel_TN.topk(top_k, dim=-1, sorted=True).indices


def gate_weights(scores_TN: torch.Tensor, idx_TK: torch.Tensor, normalize: bool, scaling_factor: float) -> torch.Tensor:
    """g_{i,t} = s_{i,t} for the chosen experts (DeepSeek-V2 eq. 8), optionally
    renormalised over the K chosen (Mixtral's softmax over the top-K logits is the
    same thing; DeepSeek-V3 eq. 13 for sigmoid), times the routed scaling factor."""
    w_TK = scores_TN.gather(1, idx_TK)
    if normalize:
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return w_TK * scaling_factor


def capacity(num_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
    """Per-expert capacity C = ceil(factor * T * K / N) (GShard; Switch eq. 3 with K = 1)."""
    return int(-(-factor * num_tokens * top_k // num_experts))


def capacity_keep(
    expert_idx_TK: torch.Tensor, priority_TK: torch.Tensor, keep_TK: torch.Tensor, num_experts: int, cap: int
) -> torch.Tensor:
    """Keep at most ``cap`` assignments per expert, dropping the lowest-priority ones.

    One sort over the A = T*K assignments (by expert, then by descending
    priority); an assignment's rank within its expert is its position minus the
    expert's segment start. Memory O(T*K), no T x N x C tensor.
    """
    e_A = expert_idx_TK.reshape(-1)
    p_A = priority_TK.detach().reshape(-1).float().masked_fill(~keep_TK.reshape(-1), float("-inf"))
    # Sort by priority descending, then stably by expert: experts contiguous, best first.
    order = p_A.argsort(descending=True, stable=True)
    order = order[e_A[order].argsort(stable=True)]
    counts_N = torch.bincount(e_A, minlength=num_experts)
    starts_N = counts_N.cumsum(0) - counts_N
    rank_sorted = torch.arange(e_A.numel(), device=e_A.device) - starts_N[e_A[order]]
    rank_A = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    return keep_TK & (rank_A < cap).view_as(keep_TK)


@dataclass(frozen=True)
class RouteSpec:
    """A router's resolved settings (from ``RouterConfig`` and the MoE/parallel sizes)."""

    num_experts: int
    top_k: int
    score_fn: str = "softmax"
    normalize: bool = False
    scaling_factor: float = 1.0
    num_groups: int | None = None
    topk_groups: int | None = None
    group_score: str = "max"


def route_topk(
    logits_TN: torch.Tensor,
    spec: RouteSpec,
    bias_N: torch.Tensor | None = None,
    token_ids_T: torch.Tensor | None = None,
) -> Routing:
    """Token-choice top-K routing.

    s = score_fn(logits); choose TopK(s + b) (b = loss-free bias, Wang et al. 2024,
    eq. 3; DeepSeek-V3 eq. 16), restricted to the top-M groups when
    ``spec.topk_groups`` is set (DeepSeek-V2 device-limited routing); weights come
    from s only, so the bias never enters the weights or the gradient. Sigmoid
    scores are always renormalised over the chosen experts (DeepSeek-V3 eq. 13).
    """
    scores_TN = affinities(logits_TN, spec.score_fn)
    sel_TN = scores_TN.detach()
    if bias_N is not None:
        sel_TN = sel_TN + bias_N.detach().to(sel_TN.dtype)
    idx_TK = topk_experts(sel_TN, spec.top_k, spec.num_groups, spec.topk_groups, spec.group_score)
    normalize = spec.normalize or spec.score_fn == "sigmoid"
    w_TK = gate_weights(scores_TN, idx_TK, normalize, spec.scaling_factor)
    keep_TK = torch.ones_like(idx_TK, dtype=torch.bool)
    return Routing(idx_TK, w_TK, keep_TK, scores_TN, logits_TN)


RouteFn = Callable[..., Routing]

STRATEGIES: dict[str, RouteFn] = {
    "topk": route_topk,
}
"""Selection rules by name (``moe.router.strategy``); the Router looks one up at build time."""
