"""Auxiliary load-balancing losses as pure functions (coefficients applied by the caller).

Shape suffixes: T tokens, N routed experts, K experts chosen per token.
"""

from __future__ import annotations

import torch


def expert_balance_loss(
    counts_N: torch.Tensor, mean_scores_N: torch.Tensor, num_tokens: int, top_k: int
) -> torch.Tensor:
    """sum_i f_i P_i, the expert-level balance loss without its coefficient.

    DeepSeek-V2 (arXiv 2405.04434) eq. 12-14: f_i = N / (K T) sum_t 1(token t
    selects expert i), P_i = (1/T) sum_t s_{i,t}. With K = 1, alpha times this is
    the Switch Transformer loss alpha * N * sum_i frac_i P_i (Fedus et al. 2021,
    eq. 4-6): f_i here already carries the factor N. Its minimum, at uniform
    routing, is 1 (so the weighted loss equals its coefficient).

    ``counts_N`` are selection counts (not differentiable); ``mean_scores_N`` is
    P (differentiable). Pass counts summed over a larger batch to get the
    global-batch variant (Qiu et al. 2025).
    """
    n = counts_N.numel()
    f_N = counts_N.detach().float() * (n / (top_k * num_tokens))
    return (f_N * mean_scores_N).sum()


def router_z_loss(logits_TN: torch.Tensor) -> torch.Tensor:
    """(1/T) sum_t (logsumexp_j x_{t,j})^2 (ST-MoE, Zoph et al. 2022, eq. 5)."""
    return torch.logsumexp(logits_TN.float(), dim=-1).square().mean()
