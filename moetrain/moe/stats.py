"""Load statistics of a routing step."""

from __future__ import annotations

import torch


def maxvio(load_N: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_i c_i - mean_i c_i) / mean_i c_i (Wang et al. 2024, eq. 4).

    0 for a perfectly balanced (or empty) load; N - 1 when one expert takes all.
    Works on the last dimension, so a [L, N] stack of layers gives [L] values.
    """
    load = load_N.float()
    mean = load.mean(dim=-1)
    return torch.where(mean > 0, (load.amax(dim=-1) - mean) / mean.clamp_min(1e-20), torch.zeros_like(mean))


def device_load(load_N: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Assignments per device group: the sum of the load of its N / G consecutive experts (last dim)."""
    return load_N.reshape(*load_N.shape[:-1], num_groups, -1).sum(dim=-1)


def router_entropy(scores_TN: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of -sum_i p_i log p_i, p = the scores normalised to sum 1 per token.

    Softmax scores are already a distribution; sigmoid scores are normalised
    first (as DeepSeek-V3 does for P_i). log N at uniform routing, 0 when each
    token puts all its mass on one expert.
    """
    p_TN = scores_TN.detach().float()
    p_TN = p_TN / p_TN.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return -(p_TN * p_TN.clamp_min(1e-30).log()).sum(dim=-1).mean()
