"""The routing-strategy and balance-loss registries: each entry says what it needs, and one registry line
is all a new strategy or loss takes beyond its own function (docs/architecture.md)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moetrain.config import BalanceConfig, ConfigError, MoEConfig, RouterConfig, TrainConfig, validate
from moetrain.hf.mapping import ExportError, check_routing
from moetrain.moe import MoELayer
from moetrain.moe import losses as loss_registry
from moetrain.moe.losses import BALANCE_LOSSES, BalanceLoss, LayerInputs, coefficient_keys
from moetrain.moe.routing import RouteSpec, Routing, route_topk
from moetrain.moe.strategies import STRATEGIES, RoutingStrategy, strategies_with
from moetrain.train.metrics import MetricRecorder
from moetrain.train.moe_metrics import record_moe

pytestmark = pytest.mark.unit


def _layer(strategy: str = "topk", **balance: float) -> MoELayer:
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=8, router=RouterConfig(strategy=strategy))
    for key, value in balance.items():
        setattr(cfg.balance, key, value)
    layer = MoELayer(8, cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_each_strategy_entry_says_what_its_rule_does(name):
    """Catches an entry whose flags disagree with its rule (the router, layer, validation and export would act
    on the wrong ones): a noise projection exactly when ``noise``, K = N slots exactly when ``variable_k``,
    a token-choice selection that follows the loss-free bias exactly when ``uses_bias``, and one that follows the token ids
    (not the hidden state) exactly when ``token_ids``."""
    s = STRATEGIES[name]
    layer = _layer(name).eval()
    x_TD, ids_T = torch.randn(12, 8), torch.randint(0, 50, (12,))
    assert (layer.router.noise_weight is not None) == s.noise
    r = layer.router(x_TD, ids_T)
    assert (r.expert_idx_TK.shape[1] == 4) == s.variable_k  # N = 4 slots vs K = 2
    layer.router.bias_update_rate = 1.0
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))
    biased = layer.router(x_TD, ids_T)
    if not s.variable_k:  # a per-expert constant cannot reorder an expert's own column of tokens
        assert _same_choice(biased, r) != s.uses_bias
    assert _same_choice(layer.router(torch.randn(12, 8), ids_T), r) == s.token_ids


def _same_choice(a: Routing, b: Routing) -> bool:
    return torch.equal(a.expert_idx_TK, b.expert_idx_TK) and torch.equal(a.keep_TK, b.keep_TK)


def test_needs_reach_the_config_rules_and_the_export_by_flag_not_by_name():
    """Catches a rule still keyed on a strategy's name: validation messages name the strategies with the flag,
    and the transformers mapping refuses exactly the strategies without a ``softmax_topk`` router (and, in one
    line, a name no longer registered)."""
    assert strategies_with("noise") == "noisy_topk" and strategies_with("token_ids") == "hash"
    cfg = TrainConfig(moe=MoEConfig(router=RouterConfig(zero_init=True)))
    with pytest.raises(ConfigError, match=r"^moe.router.zero_init=True: needs router.strategy=noisy_topk"):
        validate(cfg)
    for name, s in STRATEGIES.items():
        cfg = TrainConfig(moe=MoEConfig(router=RouterConfig(strategy=name)))
        if "softmax_topk" in s.hf_routers:
            assert check_routing(cfg, None) == s.renormalised
        else:
            with pytest.raises(ExportError, match=r"^moe\.router\.strategy="):
                check_routing(cfg, None)
    gone = TrainConfig(moe=MoEConfig(router=RouterConfig(strategy="gone")))  # a checkpoint's strategy since removed
    with pytest.raises(ExportError, match=r"^moe\.router\.strategy='gone'"):
        check_routing(gone, None)


def _reversed_topk(logits_TN: torch.Tensor, spec: RouteSpec, *, bias_N: torch.Tensor | None = None) -> Routing:
    """A new rule for the test: top-K of the negated logits."""
    return route_topk(-logits_TN, spec, bias_N=bias_N)


def test_a_strategy_registered_in_one_line_validates_builds_routes_and_trains(monkeypatch):
    """Catches a strategy name compared anywhere outside the registry (validation's choice list, the router,
    capacity, the layer): one new :data:`STRATEGIES` entry is enough for a config naming it to validate and
    for the layer to route by the new rule, forward and backward."""
    monkeypatch.setitem(STRATEGIES, "reversed_topk", RoutingStrategy(_reversed_topk, variable_k=False))
    validate(TrainConfig(moe=MoEConfig(router=RouterConfig(strategy="reversed_topk"))))
    layer = _layer("reversed_topk")
    x = torch.randn(2, 6, 8, requires_grad=True)
    y, stats = layer(x)
    (y.sum() + stats.aux_loss).backward()
    want = (-(x.detach().reshape(12, 8) @ layer.router.weight.detach().T)).softmax(-1).topk(2, dim=-1).indices
    assert torch.equal(layer.router(x.detach().reshape(12, 8)).expert_idx_TK, want)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_balance_entries_cover_every_coefficient_and_name_their_keys():
    """Catches a ``moe.balance`` coefficient no entry reads (a loss that can be configured but is never
    computed) and an entry naming a key the schema lacks."""
    coefs = {f.name for f in dataclasses.fields(BalanceConfig) if f.name.endswith("_coef")}
    assert set(coefficient_keys()) == coefs
    assert {loss.scope for loss in BALANCE_LOSSES} == {"layer", "model"}
    keys = [loss.key for loss in BALANCE_LOSSES if loss.scope == "layer"]
    assert len(keys) == len(set(keys))


def _max_gate(x: LayerInputs) -> torch.Tensor:
    """A new loss for the test: the mean over tokens of the largest combine weight."""
    return x.routing.weight_TK.amax(dim=-1).mean()


def test_a_balance_loss_registered_in_one_line_is_computed_logged_and_validated(monkeypatch):
    """Catches a loss list kept anywhere but the registry (the layer's, the metrics', validation's): one new
    :data:`BALANCE_LOSSES` entry (and its coefficient) makes the layer add it, weighted, to the aux loss, the
    metrics log it under its key, and a negative coefficient fail validation naming the key."""
    entry = BalanceLoss("max_gate", "max_gate_coef", "layer", _max_gate)
    monkeypatch.setattr(loss_registry, "BALANCE_LOSSES", (*BALANCE_LOSSES, entry))
    layer = _layer(expert_coef=0.0, max_gate_coef=0.5)
    _, stats = layer(torch.randn(2, 6, 8))
    assert set(stats.losses) == {"max_gate"}
    torch.testing.assert_close(stats.aux_loss, stats.losses["max_gate"])
    rec = MetricRecorder()
    record_moe(rec, {3: stats})
    assert "moe/layer_3/loss/max_gate" in rec.values
    cfg = TrainConfig()
    cfg.moe.balance.max_gate_coef = -1.0  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"^moe.balance.max_gate_coef=-1.0: must be >= 0"):
        validate(cfg)
