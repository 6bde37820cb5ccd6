"""Routed experts as stacked weights, run over expert-contiguous token segments.

Shape suffixes: R rows (token copies in expert-sorted order), D model dim,
E local experts, F expert hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


class GroupedExperts(nn.Module):
    """E SwiGLU experts, y_e = (silu(x W1_e) * (x W3_e)) W2_e, stored as stacked tensors.

    ``w13_EDF2`` holds W1 and W3 side by side so each expert does one up-projection
    GEMM. The forward takes rows already grouped by expert and the row count of
    each expert: a grouped GEMM over contiguous segments, with no mask over all
    tokens and no capacity padding.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.w13 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if _grouped_mm_ok(x_RD):
            offs = counts_E.cumsum(0).to(torch.int32)
            h = torch._grouped_mm(x_RD, self.w13.to(x_RD.dtype), offs=offs)
            h1, h3 = h.chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(h1) * h3, self.w2.to(x_RD.dtype), offs=offs)
        out = []
        for e, x_e in enumerate(x_RD.split(counts_E.tolist())):
            if x_e.shape[0] == 0:
                continue
            h1, h3 = (x_e @ self.w13[e]).chunk(2, dim=-1)
            out.append((F.silu(h1) * h3) @ self.w2[e])
        return torch.cat(out) if out else x_RD.new_zeros(0, self.dim)
