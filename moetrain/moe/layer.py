"""The MoE FFN layer: router -> capacity -> dispatch -> grouped experts -> combine (+ shared).

Shape suffixes: B batch, S sequence, T = B*S tokens, D model dim, N routed
experts, K chosen per token, A kept assignments, R rows at this rank's experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config import MoEConfig
from moetrain.model.layers import SwiGLU
from moetrain.moe.balance import expert_balance_loss, router_z_loss
from moetrain.moe.dispatch import Dispatcher, LocalDispatcher
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.routing import STRATEGIES, RouteSpec, Routing, capacity, capacity_keep


@dataclass
class MoEStats:
    """What one MoE layer reports for one forward (one micro-batch on one rank)."""

    load_N: torch.Tensor
    """Kept (token, expert) assignments per expert (float, detached)."""
    aux_loss: torch.Tensor
    """Sum of the enabled weighted balance losses (differentiable scalar)."""
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """Each enabled weighted loss, detached, by name."""
    num_selected: torch.Tensor | None = None
    """Assignments chosen by the router, before capacity dropping."""
    num_dropped: torch.Tensor | None = None
    """Assignments dropped by capacity."""
    devices_per_token: torch.Tensor | None = None
    """Mean number of distinct device groups a token's kept assignments reach."""
    num_tokens: int = 0


class Router(nn.Module):
    """fp32 linear router plus the loss-free balancing bias (a buffer, never trained)."""

    def __init__(self, dim: int, cfg: MoEConfig, num_groups: int) -> None:
        super().__init__()
        r = cfg.router
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim))
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        self.bias_update_rate = r.bias_update_rate
        self.spec = RouteSpec(
            num_experts=cfg.num_experts,
            top_k=cfg.top_k,
            score_fn=r.score_fn,
            normalize=r.norm_topk_prob,
            scaling_factor=r.scaling_factor,
            num_groups=num_groups,
            topk_groups=r.topk_groups,
            group_score=r.group_score,
        )
        self.route_fn = STRATEGIES[r.strategy]

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TN = F.linear(x_TD.float(), self.weight.float())
        bias = self.expert_bias if self.bias_update_rate > 0 else None
        return self.route_fn(logits_TN, self.spec, bias_N=bias, token_ids_T=token_ids_T)

    @torch.no_grad()
    def update_bias(self, load_N: torch.Tensor) -> None:
        """b_i += u * sign(mean_j c_j - c_i) (Wang et al. 2024, Algorithm 1).

        ``load_N`` must be the step's load summed over all data-parallel ranks and
        micro-batches, so every rank applies the same update.
        """
        if self.bias_update_rate > 0:
            load = load_N.to(self.expert_bias.device, torch.float32)
            self.expert_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))


class MoELayer(nn.Module):
    """Routed experts (sharded by the dispatcher under EP) plus optional shared experts."""

    def __init__(self, dim: int, cfg: MoEConfig, num_groups: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.num_groups = num_groups
        self.router = Router(dim, cfg, num_groups)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.expert_hidden_size)
        shared_hidden = (cfg.shared_hidden_size or cfg.expert_hidden_size) * cfg.num_shared_experts
        self.shared = SwiGLU(dim, shared_hidden) if cfg.num_shared_experts > 0 else None
        self.dispatcher: Dispatcher = LocalDispatcher(cfg.num_experts)

    def forward(self, x_BSD: torch.Tensor, token_ids_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        T = x_TD.shape[0]
        token_ids_T = token_ids_BS.reshape(-1) if token_ids_BS is not None else None
        r = self.router(x_TD, token_ids_T)

        # Capacity: drop the lowest-affinity assignments of over-full experts.
        cap_factor = self.cfg.router.capacity_factor if self.training else self.cfg.router.eval_capacity_factor
        selected_TK = r.keep_TK
        keep_TK = selected_TK
        if cap_factor is not None:
            cap = capacity(T, self.num_experts, self.top_k, cap_factor)
            priority_TK = r.scores_TN.gather(1, r.expert_idx_TK)
            keep_TK = capacity_keep(r.expert_idx_TK, priority_TK, selected_TK, self.num_experts, cap)

        # Flat kept assignments (token-major), dispatched, computed, combined.
        K = r.expert_idx_TK.shape[1]
        keep_A = keep_TK.reshape(-1)
        token_idx_A = torch.arange(T, device=x_TD.device).repeat_interleave(K)[keep_A]
        expert_idx_A = r.expert_idx_TK.reshape(-1)[keep_A]
        weight_A = r.weight_TK.reshape(-1)[keep_A]
        rows_RD, counts_E, handle = self.dispatcher.dispatch(x_TD, token_idx_A, expert_idx_A, weight_A)
        y_TD = self.dispatcher.combine(self.experts(rows_RD, counts_E), handle).to(x_TD.dtype)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)

        stats = self._stats(r, selected_TK, keep_TK, expert_idx_A, T)
        return y_TD.view(B, S, D), stats

    def _stats(
        self, r: Routing, selected_TK: torch.Tensor, keep_TK: torch.Tensor, expert_idx_A: torch.Tensor, T: int
    ) -> MoEStats:
        b = self.cfg.balance
        N = self.num_experts
        load_N = torch.bincount(expert_idx_A, minlength=N).float()
        sel_counts_N = torch.zeros(N, device=load_N.device).index_add_(
            0, r.expert_idx_TK.reshape(-1), selected_TK.reshape(-1).float()
        )
        losses: dict[str, torch.Tensor] = {}
        if b.expert_coef > 0:
            # P_i from affinities that sum to 1 per token (sigmoid ones renormalised, DeepSeek-V3 eq. 19).
            s_TN = r.scores_TN
            if self.cfg.router.score_fn == "sigmoid":
                s_TN = s_TN / s_TN.sum(dim=-1, keepdim=True)
            losses["expert"] = b.expert_coef * expert_balance_loss(sel_counts_N, s_TN.mean(0), T, self.top_k)
        if b.z_loss_coef > 0:
            losses["z"] = b.z_loss_coef * router_z_loss(r.logits_TN)
        aux = sum(losses.values(), torch.zeros((), device=load_N.device))
        num_selected = selected_TK.sum()
        stats = MoEStats(
            load_N=load_N,
            aux_loss=aux,
            losses={k: v.detach() for k, v in losses.items()},
            num_selected=num_selected.float(),
            num_dropped=(num_selected - keep_TK.sum()).float(),
            num_tokens=T,
        )
        if self.num_groups > 1:
            group_TK = r.expert_idx_TK // (N // self.num_groups)
            hits_TG = torch.zeros(T, self.num_groups, dtype=torch.long, device=group_TK.device)
            hits_TG.scatter_add_(1, group_TK, keep_TK.long())
            stats.devices_per_token = (hits_TG > 0).sum(dim=1).float().mean()
        return stats
