"""The router of an MoE layer, and the one reading of its capacity factors.

Shape suffixes: T tokens, D model dim, N routed experts.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.moe.routing import ROUTER_DTYPES, RouteSpec, Routing, hash_experts
from moetrain.moe.strategies import STRATEGIES

if TYPE_CHECKING:
    from moetrain.config import MoEConfig, RouterConfig


class CapacityFactors(NamedTuple):
    """The capacity factors in force in one mode (training or evaluation)."""

    route: float | None
    """Expert choice's c, each expert taking k = ceil(T c / N) tokens (Zhou et al. 2022's k = n c / e; ``None`` =
    ``top_k``): exact by construction, inside the routing. ``None`` for token choice."""
    drop: float | None
    """Token choice's per-expert capacity factor f, C = ceil(f T K / N) (GShard; Switch eq. 3), applied after
    the routing by the MoE layer; ``None`` = dropless (and always for expert choice)."""


def capacity_factors(rc: RouterConfig, training: bool) -> CapacityFactors:
    """The one reading of ``router.capacity_factor`` / ``router.eval_capacity_factor``.

    Token choice: ``capacity_factor`` in training, ``eval_capacity_factor`` at evaluation (unset: dropless).
    Variable K (expert choice): ``capacity_factor`` as c, at evaluation ``eval_capacity_factor`` when set, else
    the same c.
    """
    if STRATEGIES[rc.strategy].variable_k:
        c = rc.eval_capacity_factor if not training and rc.eval_capacity_factor is not None else rc.capacity_factor
        return CapacityFactors(route=c, drop=None)
    return CapacityFactors(route=None, drop=rc.capacity_factor if training else rc.eval_capacity_factor)


class Router(nn.Module):
    """Linear router with fp32 logits, the loss-free balancing bias (a buffer, never trained) and,
    for a strategy that draws noise (``noisy_topk``) only, the trainable noise projection W_noise.

    The GEMMs run outside autocast in ``moe.router.dtype`` (:data:`~moetrain.moe.routing.ROUTER_DTYPES`): fp32 by default, so the
    routing is the fp32 model's whatever the compute dtype (it follows torch's fp32 matmul precision, exact
    unless ``torch.set_float32_matmul_precision`` allows TF32); ``bf16`` runs them on bf16 operands and upcasts
    the bf16 logits."""

    def __init__(self, dim: int, cfg: MoEConfig, num_groups: int, vocab_size: int | None = None) -> None:
        super().__init__()
        r = cfg.router
        self.strategy = STRATEGIES[r.strategy]
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim))
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        self.hash_table: torch.Tensor | None
        if self.strategy.token_ids and r.hash_table == "balanced":
            if vocab_size is None:
                raise ValueError("router.hash_table=balanced needs the vocabulary size")
            # The random hash until the corpus frequencies are known (moetrain.model.apply.apply_balanced_hash);
            # saved with the model, so a checkpoint routes as it was trained.
            ids = torch.arange(vocab_size)
            self.register_buffer("hash_table", hash_experts(ids, cfg.num_experts, cfg.top_k, r.hash_seed))
        else:
            self.hash_table = None
        if self.strategy.noise:
            # W_noise of Shazeer et al. 2017's eq. 4, zero-initialised in their appendix A; init_weights re-draws it.
            self.noise_weight: nn.Parameter | None = nn.Parameter(torch.zeros(cfg.num_experts, dim))
        else:
            self.register_parameter("noise_weight", None)
        self.noise_std = r.noise_std
        self.gemm_dtype = ROUTER_DTYPES[r.dtype]
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
            capacity_factor=capacity_factors(r, training=True).route,
            hash_seed=r.hash_seed,
        )
        self.eval_spec = replace(self.spec, capacity_factor=capacity_factors(r, training=False).route)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            xg_TD = x_TD.to(self.gemm_dtype)
            logits_TN = F.linear(xg_TD, self.weight.to(self.gemm_dtype)).float()
            noise_TN = scale_TN = None
            if self.noise_weight is not None and self.training:
                # StandardNormal() * Softplus(x W_noise) (Shazeer et al. 2017, eq. 4), training only.
                noise_logits_TN = F.linear(xg_TD, self.noise_weight.to(self.gemm_dtype)).float()
                scale_TN = F.softplus(noise_logits_TN) * self.noise_std
                noise_TN = torch.randn_like(logits_TN) * scale_TN
        spec = self.spec if self.training else self.eval_spec
        r = self.strategy.route(logits_TN, spec, **self._needs(token_ids_T, noise_TN))
        return r if noise_TN is None else replace(r, noise_TN=noise_TN, noise_scale_TN=scale_TN)

    def _needs(self, token_ids_T: torch.Tensor | None, noise_TN: torch.Tensor | None) -> dict[str, Any]:
        """What the strategy's rule is given, as its :class:`~moetrain.moe.strategies.RoutingStrategy` says."""
        s = self.strategy
        needs: dict[str, Any] = {}
        if s.uses_bias:
            needs["bias_N"] = self.expert_bias if self.bias_update_rate > 0 else None
        if s.noise:
            needs["noise_TN"] = noise_TN
        if s.token_ids:
            needs["token_ids_T"], needs["hash_table_VK"] = token_ids_T, self.hash_table
        return needs

    @torch.no_grad()
    def update_bias(self, load_N: torch.Tensor) -> None:
        """b_i += u * sign(mean_j c_j - c_i) (Wang et al. 2024, Algorithm 1).

        ``load_N`` must be the step's load summed over all data-parallel ranks and
        micro-batches, so every rank applies the same update.
        """
        if self.bias_update_rate > 0:
            load = load_N.to(self.expert_bias.device, torch.float32)
            self.expert_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))
