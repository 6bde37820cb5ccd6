"""The routing strategies by name (``moe.router.strategy``), each entry saying what the strategy needs.

The router, the MoE layer, config validation and the transformers mapping read a strategy's needs from
its :class:`RoutingStrategy` here, never from its name: adding a strategy is its routing function (in
``moe/routing.py`` or a file of its own) and one line in :data:`STRATEGIES` (docs/architecture.md, "Add a
routing strategy").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass

from moetrain.moe.routing import (
    Routing,
    route_expert_choice,
    route_hash,
    route_noisy_topk,
    route_topk,
    route_topk_softmax,
)

RouteFn = Callable[..., Routing]
"""``route(logits_TN, spec, **needs) -> Routing``; the needs as :class:`RoutingStrategy` lists them."""


@dataclass(frozen=True)
class RoutingStrategy:
    """A selection rule and what it needs from the router, the layer and the config."""

    route: RouteFn
    """The rule. Called as ``route(logits_TN, spec, bias_N=...)`` when :attr:`uses_bias`, plus ``noise_TN=``
    when :attr:`noise`, plus ``token_ids_T=`` and ``hash_table_VK=`` when :attr:`token_ids`."""
    _: KW_ONLY
    score_fns: tuple[str, ...] = ("softmax", "sigmoid")
    """The ``router.score_fn`` values it is defined with."""
    variable_k: bool = False
    """A token takes between 0 and N experts: K = N slots with ``keep_TK`` marking the chosen ones. The
    capacity factor is the rule's own c (exact by construction: no per-expert dropping after it, no
    ``eval_capacity_factor`` meaning dropless) and there is no group limit."""
    noise: bool = False
    """Draws noise in training: the router holds the noise projection W_noise (``router.zero_init`` and the
    smooth load loss need one)."""
    token_ids: bool = False
    """Routes by the input token ids (through ``router.hash_table``), not by the hidden state."""
    uses_bias: bool = True
    """The loss-free bias enters the selection (else ``router.bias_update_rate`` must be 0)."""
    renormalised: bool = False
    """Its K weights always sum to the scaling factor, whatever ``router.norm_topk_prob``."""
    hf_routers: tuple[str, ...] = ()
    """transformers' routers that choose as it does: ``softmax_topk`` (Mixtral, Qwen2-MoE, Qwen3-MoE),
    ``deepseek`` (DeepSeek-V2/V3, dropless)."""


STRATEGIES: dict[str, RoutingStrategy] = {
    "topk": RoutingStrategy(route_topk, hf_routers=("softmax_topk", "deepseek")),
    "topk_softmax": RoutingStrategy(
        route_topk_softmax, score_fns=("softmax",), renormalised=True, hf_routers=("softmax_topk",)
    ),
    "noisy_topk": RoutingStrategy(route_noisy_topk, score_fns=("softmax",), noise=True),
    "expert_choice": RoutingStrategy(route_expert_choice, score_fns=("softmax",), variable_k=True),
    "hash": RoutingStrategy(route_hash, token_ids=True, uses_bias=False),
}
"""Selection rules by name (``moe.router.strategy``); the Router looks one up at build time."""


def strategies_with(need: str) -> str:
    """The names of the strategies whose ``need`` (a :class:`RoutingStrategy` flag) is set, ``|``-joined: what
    a config error suggests (``router.strategy=noisy_topk``)."""
    return "|".join(name for name, s in STRATEGIES.items() if getattr(s, need))
