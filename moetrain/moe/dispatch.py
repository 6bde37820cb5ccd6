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


class Dispatcher(Protocol):
    num_local_experts: int
    expert_offset: int

    def dispatch(
        self, x_TD: torch.Tensor, token_idx_A: torch.Tensor, expert_idx_A: torch.Tensor, weight_A: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Return rows grouped by local expert [R, D], rows per local expert [E], and a handle."""
        ...

    def combine(self, y_RD: torch.Tensor, handle: Any) -> torch.Tensor:
        """Weighted sum of the expert outputs back in token order [T, D]."""
        ...


@dataclass
class LocalHandle:
    token_idx_R: torch.Tensor
    weight_R: torch.Tensor
    num_tokens: int


class LocalDispatcher:
    """Single process: one stable sort of the assignments by expert, one gather, one scatter-add."""

    def __init__(self, num_experts: int) -> None:
        self.num_local_experts = num_experts
        self.expert_offset = 0

    def dispatch(
        self, x_TD: torch.Tensor, token_idx_A: torch.Tensor, expert_idx_A: torch.Tensor, weight_A: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, LocalHandle]:
        order_A = expert_idx_A.argsort(stable=True)
        token_idx_R = token_idx_A[order_A]
        counts_E = torch.bincount(expert_idx_A, minlength=self.num_local_experts)
        return x_TD[token_idx_R], counts_E, LocalHandle(token_idx_R, weight_A[order_A], x_TD.shape[0])

    def combine(self, y_RD: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        weighted_RD = y_RD.float() * handle.weight_R.unsqueeze(-1)
        out_TD = weighted_RD.new_zeros(handle.num_tokens, y_RD.shape[-1])
        return out_TD.index_add_(0, handle.token_idx_R, weighted_RD)
