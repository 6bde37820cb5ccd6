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
