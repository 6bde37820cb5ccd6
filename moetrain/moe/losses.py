"""The auxiliary balance losses by name, each entry saying its metric key, coefficient and scope.

The MoE layer (scope ``layer``), the model (scope ``model``) and config validation loop over
:data:`BALANCE_LOSSES`; none of them names a loss. Adding a loss is its pure function (in
``moe/balance.py``, citing the paper), its coefficient key in ``BalanceConfig`` and one line here
(docs/architecture.md, "Add a balance loss").

Shape suffixes: B sequences, S sequence, T = B*S tokens, N routed experts, K slots per token,
G device groups, L MoE layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, Protocol

import torch

from moetrain.moe.balance import (
    comm_balance_loss,
    device_balance_loss,
    expert_balance_loss,
    importance_loss,
    pooled_expert_balance_loss,
    router_z_loss,
    sequence_balance_loss,
    smooth_load_loss,
)
from moetrain.moe.routing import Routing


@dataclass(frozen=True, kw_only=True)
class LayerInputs:
    """What one MoE layer's forward offers a ``layer``-scope loss."""

    routing: Routing
    selected_TK: torch.Tensor
    """Slots the router chose, before capacity dropping (bool)."""
    scores_TN: torch.Tensor
    """Affinities normalised to sum to 1 per token (sigmoid ones renormalised, DeepSeek-V3 eq. 19)."""
    mean_scores_N: torch.Tensor
    """P_i, the mean of :attr:`scores_TN` over tokens (differentiable)."""
    counts_N: torch.Tensor
    """f-type selections per expert: this micro-batch's, or the step's global ones (``balance.scope``)."""
    num_tokens: int | torch.Tensor
    """The tokens :attr:`counts_N` were counted over."""
    sent_G: torch.Tensor | None
    """f-type tokens sent to each device group (``None`` with one group)."""
    batch: int
    seq_len: int
    top_k: int
    num_groups: int
    topk_groups: int | None
    """M, the groups a token may use (``router.topk_groups``; ``None`` = no limit)."""


class LayerStats(Protocol):
    """What a ``model``-scope loss reads of each MoE layer's statistics (:class:`~moetrain.moe.layer.MoEStats`)."""

    sel_counts_N: torch.Tensor | None
    mean_scores_N: torch.Tensor | None
    num_tokens: int


def _expert(x: LayerInputs) -> torch.Tensor:
    return expert_balance_loss(x.counts_N, x.mean_scores_N, x.num_tokens, x.top_k)


def _device(x: LayerInputs) -> torch.Tensor | None:
    if x.num_groups <= 1:
        return None
    return device_balance_loss(x.counts_N, x.mean_scores_N, x.num_tokens, x.top_k, x.num_groups)


def _comm(x: LayerInputs) -> torch.Tensor | None:
    if x.sent_G is None:
        return None
    m = x.topk_groups or min(x.top_k, x.num_groups)
    return comm_balance_loss(x.sent_G, x.mean_scores_N, x.num_tokens, m)


def _seq(x: LayerInputs) -> torch.Tensor:
    B, S, N = x.batch, x.seq_len, x.mean_scores_N.numel()
    idx_TK = x.routing.expert_idx_TK
    sel_TN = torch.zeros(B * S, N, device=idx_TK.device).scatter_add_(1, idx_TK, x.selected_TK.float())
    counts_BN = sel_TN.view(B, S, N).sum(dim=1)
    return sequence_balance_loss(counts_BN, x.scores_TN.view(B, S, N), x.top_k)


def _z(x: LayerInputs) -> torch.Tensor:
    return router_z_loss(x.routing.logits_TN)


def _importance(x: LayerInputs) -> torch.Tensor:
    r = x.routing
    T, N = r.logits_TN.shape
    gates_TN = torch.zeros(T, N, device=r.expert_idx_TK.device).scatter_add(
        1, r.expert_idx_TK, r.weight_TK * x.selected_TK.to(r.weight_TK.dtype)
    )
    return importance_loss(gates_TN)


def _load(x: LayerInputs) -> torch.Tensor | None:
    r = x.routing
    if r.noise_TN is None or r.noise_scale_TN is None:  # training only
        return None
    return smooth_load_loss(r.logits_TN, r.logits_TN + r.noise_TN, r.noise_scale_TN, x.top_k)


def _pooled_expert(layers: Sequence[LayerStats], top_k: int) -> torch.Tensor:
    counts_LN = torch.stack([s.sel_counts_N for s in layers])  # type: ignore[misc]
    scores_LN = torch.stack([s.mean_scores_N for s in layers])  # type: ignore[misc]
    return pooled_expert_balance_loss(counts_LN, scores_LN, layers[0].num_tokens, top_k)


def _always(b: Any) -> bool:
    return True


@dataclass(frozen=True)
class BalanceLoss:
    """One auxiliary balance loss: weighted by ``moe.balance.<coef>``, off at 0."""

    key: str
    """Its name: ``MoEStats.losses[key]``, logged as ``moe/layer_{i}/loss/{key}`` (``layer`` scope)."""
    coef: str
    """Its coefficient, a key of ``moe.balance``."""
    scope: str
    """``layer``: each MoE layer's, from its own routing (``compute(LayerInputs)``); ``model``: pooled over one
    forward's MoE layers (``compute(layers, top_k)``), added to the aux loss, logged with it only."""
    compute: Callable[..., torch.Tensor | None]
    """The unweighted loss; ``None`` where it does not apply to this forward (one group, no noise drawn)."""
    _: KW_ONLY
    applies: Callable[[Any], bool] = _always
    """Whether the ``moe.balance`` section selects it (besides a coefficient > 0)."""
    needs_groups: bool = False
    """Needs 2+ device groups (``router.num_groups`` or ``parallel.ep``)."""
    needs_noise: bool = False
    """Needs a strategy that draws noise (:attr:`~moetrain.moe.strategies.RoutingStrategy.noise`)."""
    needs_spare_expert: bool = False
    """Needs ``moe.top_k < moe.num_experts`` (a (K+1)-th expert)."""


def _per_layer(b: Any) -> bool:
    return b.expert_form == "per_layer"


def _pooled(b: Any) -> bool:
    return b.expert_form == "transformers"


BALANCE_LOSSES: tuple[BalanceLoss, ...] = (
    BalanceLoss("expert", "expert_coef", "layer", _expert, applies=_per_layer),
    BalanceLoss("device", "device_coef", "layer", _device, needs_groups=True),
    BalanceLoss("comm", "comm_coef", "layer", _comm, needs_groups=True),
    BalanceLoss("seq", "seq_coef", "layer", _seq),
    BalanceLoss("z", "z_loss_coef", "layer", _z),
    BalanceLoss("importance", "importance_coef", "layer", _importance),
    BalanceLoss("load", "load_coef", "layer", _load, needs_noise=True, needs_spare_expert=True),
    BalanceLoss("expert", "expert_coef", "model", _pooled_expert, applies=_pooled),
)
"""Every balance loss, in the order the layer sums them."""


def coefficient_keys() -> list[str]:
    """The ``moe.balance`` coefficient keys, each once, in registry order."""
    return list(dict.fromkeys(loss.coef for loss in BALANCE_LOSSES))


def enabled(balance: Any, scope: str) -> list[tuple[BalanceLoss, float]]:
    """The losses of ``scope`` the ``moe.balance`` section turns on, with their coefficients."""
    out = []
    for loss in BALANCE_LOSSES:
        coef = getattr(balance, loss.coef)
        if loss.scope == scope and coef > 0 and loss.applies(balance):
            out.append((loss, coef))
    return out


def layer_losses(balance: Any, x: LayerInputs) -> dict[str, torch.Tensor]:
    """Each enabled weighted ``layer``-scope loss of one MoE layer's forward, by key."""
    losses: dict[str, torch.Tensor] = {}
    for loss, coef in enabled(balance, "layer"):
        value = loss.compute(x)
        if value is not None:
            losses[loss.key] = coef * value
    return losses


def model_loss(balance: Any, layers: Sequence[LayerStats], top_k: int) -> torch.Tensor | None:
    """The sum of the enabled weighted ``model``-scope losses over one forward's MoE layers (``None``: none)."""
    total: torch.Tensor | None = None
    for loss, coef in enabled(balance, "model") if layers else ():
        value = loss.compute(layers, top_k)
        if value is not None:
            total = coef * value if total is None else total + coef * value
    return total
