"""Selection rules: hand-computed examples for every strategy, and hypothesis properties over random scores."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from moetrain.config import MoEConfig, RouterConfig
from moetrain.moe import MoELayer
from moetrain.moe.capacity import capacity_keep, device_capacity_keep
from moetrain.moe.routing import (
    RouteSpec,
    expert_choice_capacity,
    hash_experts,
    route_expert_choice,
    route_hash,
    route_noisy_topk,
    route_topk,
    route_topk_softmax,
    topk_experts,
)
from moetrain.moe.strategies import STRATEGIES

pytestmark = pytest.mark.unit


def logits_of(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is ``probs``."""
    return torch.tensor(probs).log()


# ---------------------------------------------------------------- hand-computed


def test_softmax_topk_hand_computed_raw_normalised_and_scaled():
    logits = logits_of([[0.1, 0.2, 0.3, 0.4]])
    r = route_topk(logits, RouteSpec(num_experts=4, top_k=2))
    assert r.expert_idx_TK.tolist() == [[3, 2]]
    torch.testing.assert_close(r.weight_TK, torch.tensor([[0.4, 0.3]]))
    r = route_topk(logits, RouteSpec(num_experts=4, top_k=2, normalize=True, scaling_factor=2.0))
    torch.testing.assert_close(r.weight_TK, torch.tensor([[2 * 4 / 7, 2 * 3 / 7]]))


def test_mixtral_topk_then_softmax_hand_computed_and_equal_to_renormalised_softmax():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    r = route_topk_softmax(logits, RouteSpec(num_experts=4, top_k=2))
    assert r.expert_idx_TK.tolist() == [[1, 2]]
    e = math.exp(1.0)  # softmax([3, 2]) = [e, 1] / (e + 1)
    torch.testing.assert_close(r.weight_TK, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))

    x = torch.randn(64, 8, requires_grad=True)
    a = route_topk_softmax(x, RouteSpec(num_experts=8, top_k=3))
    b = route_topk(x, RouteSpec(num_experts=8, top_k=3, normalize=True))
    assert torch.equal(a.expert_idx_TK, b.expert_idx_TK)
    torch.testing.assert_close(a.weight_TK, b.weight_TK)
    g = torch.randn(64, 3)
    (ga,) = torch.autograd.grad(a.weight_TK, x, g)
    (gb,) = torch.autograd.grad(b.weight_TK, x, g)
    torch.testing.assert_close(ga, gb)


def test_sigmoid_with_bias_chooses_by_s_plus_b_and_weighs_by_normalised_s():
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0]])
    s = logits.sigmoid()
    bias = torch.tensor([0.0, 0.0, 1.0, 0.0])  # lifts expert 2 above expert 1
    r = route_topk(logits, RouteSpec(num_experts=4, top_k=2, score_fn="sigmoid", scaling_factor=2.5), bias_N=bias)
    assert r.expert_idx_TK.tolist() == [[2, 3]]
    expected = torch.stack([s[0, 2], s[0, 3]]) / (s[0, 2] + s[0, 3]) * 2.5
    torch.testing.assert_close(r.weight_TK, expected.unsqueeze(0))
    torch.testing.assert_close(r.scores_TN, s)  # the bias never enters the scores either


def test_group_limited_hand_computed_max_and_topk_sum_differ():
    # 4 groups of 2 experts; M = 2 groups.
    s = torch.tensor([[0.9, 0.0, 0.5, 0.5, 0.6, 0.1, 0.0, 0.0]])
    # DeepSeek-V2: groups scored by their best expert [0.9, 0.5, 0.6, 0] -> groups {0, 2}
    assert sorted(topk_experts(s, 2, 4, 2, "max")[0].tolist()) == [0, 4]
    assert sorted(topk_experts(s, 4, 4, 2, "max")[0].tolist()) == [0, 1, 4, 5]
    # DeepSeek-V3: sum of the top K/M = 2 [0.9, 1.0, 0.7, 0] -> groups {0, 1}
    assert sorted(topk_experts(s, 4, 4, 2, "topk_sum")[0].tolist()) == [0, 1, 2, 3]
    # no limit: plain top-4
    assert sorted(topk_experts(s, 4)[0].tolist()) == [0, 2, 3, 4]


def test_noisy_topk_hand_computed():
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    noise = torch.tensor([[0.0, 3.0, 0.0, 0.0]])
    r = route_noisy_topk(logits, RouteSpec(num_experts=4, top_k=2), noise_TN=noise)
    assert r.expert_idx_TK.tolist() == [[1, 0]]
    e2 = math.exp(2.0)  # softmax([3, 1])
    torch.testing.assert_close(r.weight_TK, torch.tensor([[e2 / (e2 + 1), 1 / (e2 + 1)]]))
    torch.testing.assert_close(r.logits_TN, logits)  # z-loss sees the clean logits
    r0 = route_noisy_topk(logits, RouteSpec(num_experts=4, top_k=2))  # evaluation: no noise
    assert r0.expert_idx_TK[0, 0].item() == 0


def test_noisy_router_has_a_trainable_noise_projection_and_noise_only_in_training():
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=8, router=RouterConfig(strategy="noisy_topk"))
    layer = MoELayer(8, cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    assert MoELayer(8, MoEConfig(num_experts=4, top_k=2, expert_hidden_size=8)).router.noise_weight is None
    x = torch.randn(32, 8)
    layer.train()
    a, b = layer.router(x), layer.router(x)
    assert not torch.equal(a.weight_TK, b.weight_TK)
    a.weight_TK.sum().backward()
    assert layer.router.noise_weight.grad is not None and layer.router.noise_weight.grad.abs().sum() > 0
    layer.eval()
    a, b = layer.router(x), layer.router(x)
    assert torch.equal(a.weight_TK, b.weight_TK) and torch.equal(a.expert_idx_TK, b.expert_idx_TK)


def test_expert_choice_hand_computed():
    # T = 4 tokens, N = 2 experts, c = 1 -> each expert takes k = ceil(4 * 1 / 2) = 2 tokens.
    s = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    r = route_expert_choice(s.log(), RouteSpec(num_experts=2, top_k=1, capacity_factor=1.0))
    assert r.expert_idx_TK.tolist() == [[0, 1]] * 4
    # expert 0 takes tokens 0 and 1, expert 1 tokens 3 and 2: one expert each
    assert r.keep_TK.tolist() == [[True, False], [True, False], [False, True], [False, True]]
    torch.testing.assert_close(r.weight_TK, s)
    # c = 0.5 -> k = 1: tokens 1 and 2 get no expert at all
    r = route_expert_choice(s.log(), RouteSpec(num_experts=2, top_k=1, capacity_factor=0.5))
    assert r.keep_TK.tolist() == [[True, False], [False, False], [False, False], [False, True]]
    assert expert_choice_capacity(10, 4, 2.0) == 5 and expert_choice_capacity(3, 2, 10.0) == 3


def test_expert_choice_layer_runs_with_exact_capacity_and_docstring_warns_non_causal():
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=8, router=RouterConfig(strategy="expert_choice"))
    layer = MoELayer(8, cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    y, stats = layer(torch.randn(2, 5, 8))
    assert torch.isfinite(y).all()
    assert stats.load_N.tolist() == [5.0] * 4  # k = ceil(10 * 2 / 4)
    assert "not causal" in (route_expert_choice.__doc__ or "").lower()


def test_hash_routing_is_a_fixed_function_of_the_token_id():
    ids = torch.tensor([5, 7, 5, 1000, 7])
    r = route_hash(torch.zeros(5, 8), RouteSpec(num_experts=8, top_k=1, hash_seed=3), token_ids_T=ids)
    e = r.expert_idx_TK[:, 0].tolist()
    assert e[0] == e[2] and e[1] == e[4]
    torch.testing.assert_close(r.weight_TK, torch.ones(5, 1))
    # independent of the router logits and of the batch around it
    r2 = route_hash(torch.randn(2, 8), RouteSpec(num_experts=8, top_k=1, hash_seed=3), token_ids_T=ids[:2])
    assert r2.expert_idx_TK[:, 0].tolist() == e[:2]
    many = torch.arange(20000)
    assert not torch.equal(hash_experts(many, 8, 1, 0), hash_experts(many, 8, 1, 1))
    counts = torch.bincount(hash_experts(many, 8, 1, 0)[:, 0], minlength=8).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.05  # a random map: near-uniform over ids
    two = hash_experts(many, 8, 2, 0)
    assert (two[:, 0] != two[:, 1]).all()
    torch.testing.assert_close(
        route_hash(torch.zeros(5, 8), RouteSpec(8, 2), token_ids_T=ids).weight_TK, torch.full((5, 2), 0.5)
    )


def test_hash_routing_without_token_ids_fails_clearly():
    with pytest.raises(ValueError, match="token ids"):
        route_hash(torch.zeros(3, 4), RouteSpec(4, 1))


def test_device_level_dropping_hand_computed():
    # 4 experts in 2 groups; 4 tokens, K = 1, all on group 0 (experts 0, 1): budget ceil(1.0 * 4 / 2) = 2
    idx = torch.tensor([[0], [1], [0], [3]])
    prio = torch.tensor([[0.2], [0.9], [0.5], [0.1]])
    keep = device_capacity_keep(idx, prio, torch.ones(4, 1, dtype=torch.bool), 4, 2, 1.0)
    assert keep.flatten().tolist() == [False, True, True, True]
    none = device_capacity_keep(idx, prio, torch.zeros(4, 1, dtype=torch.bool), 4, 2, 1.0)
    assert not none.any()
    assert not capacity_keep(idx, prio, torch.zeros(4, 1, dtype=torch.bool), 4, 0).any()


def test_device_and_expert_dropping_everything_dropped_is_finite():
    router = RouterConfig(capacity_factor=1e-6, num_groups=2, device_capacity_factor=1e-6)
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=8, num_shared_experts=0, router=router)
    layer = MoELayer(8, cfg, num_groups=2)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    layer.train()
    x = torch.randn(2, 8, 8, requires_grad=True)
    y, stats = layer(x)
    assert stats.load_N.sum().item() <= 2  # one assignment per device survives
    assert stats.num_dropped.item() == stats.num_selected.item() - stats.load_N.sum().item()
    assert torch.isfinite(y).all()
    (y.sum() + stats.aux_loss).backward()
    assert torch.isfinite(x.grad).all()
    layer.eval()  # device-level dropping is a training-time rule
    _, stats = layer(x)
    assert stats.num_dropped.item() == 0


def test_every_strategy_is_registered_and_runs_in_the_layer():
    assert set(STRATEGIES) == {"topk", "topk_softmax", "noisy_topk", "expert_choice", "hash"}
    for name in STRATEGIES:
        cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=8, router=RouterConfig(strategy=name))
        layer = MoELayer(8, cfg)
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.5)
        y, stats = layer(torch.randn(2, 6, 8), torch.randint(0, 50, (2, 6)))
        assert torch.isfinite(y).all() and stats.router_entropy is not None, name


# ------------------------------------------------------------------ properties

dims = st.tuples(st.integers(1, 12), st.sampled_from([(4, 2), (6, 3), (8, 4), (8, 2), (12, 4)]), st.integers(0, 10_000))


@settings(max_examples=40, deadline=None)
@given(dims, st.sampled_from(["softmax", "sigmoid"]), st.booleans(), st.floats(0.5, 4.0))
def test_property_topk_distinct_nonnegative_and_normalised(d, score_fn, normalize, scale):
    T, (N, K), seed = d
    logits = torch.randn(T, N, generator=torch.Generator().manual_seed(seed)) * 3
    bias = torch.randn(N, generator=torch.Generator().manual_seed(seed + 1)) * 0.1
    spec = RouteSpec(N, K, score_fn=score_fn, normalize=normalize, scaling_factor=scale)
    r = route_topk(logits, spec, bias_N=bias)
    assert all(len(set(row)) == K for row in r.expert_idx_TK.tolist())
    assert (r.weight_TK >= 0).all()
    if normalize or score_fn == "sigmoid":
        torch.testing.assert_close(r.weight_TK.sum(-1), torch.full((T,), scale))
    else:
        assert (r.weight_TK.sum(-1) <= scale + 1e-5).all()


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6),
    st.sampled_from([(8, 4, 2, 2), (8, 4, 1, 2), (12, 4, 3, 3), (16, 8, 3, 6), (16, 8, 4, 8)]),
    st.sampled_from(["max", "topk_sum"]),
    st.integers(0, 10_000),
)
def test_property_group_limited_at_most_m_groups_and_best_allowed_experts(T, shape, group_score, seed):
    N, G, M, K = shape
    assume(group_score == "max" or K % M == 0)
    g = torch.Generator().manual_seed(seed)
    s = torch.stack([torch.randperm(N, generator=g) for _ in range(T)]).float() / N  # distinct scores
    idx = topk_experts(s, K, G, M, group_score)
    E = N // G
    for t in range(T):
        chosen = idx[t].tolist()
        assert len(set(chosen)) == K
        groups = {e // E for e in chosen}
        assert len(groups) <= M
        # reference: score groups, take the top M, then the top K experts inside them
        per = s[t].view(G, E)
        gscore = per.amax(-1) if group_score == "max" else per.topk(K // M, -1).values.sum(-1)
        assume(len(set(gscore.tolist())) == G)  # no ties between groups
        allowed = set(gscore.topk(M).indices.tolist())
        assert groups <= allowed
        pool = [e for e in range(N) if e // E in allowed]
        best = sorted(pool, key=lambda e: -s[t, e].item())[:K]
        assert sorted(chosen) == sorted(best)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.sampled_from([2, 4, 8]), st.floats(0.25, 4.0), st.integers(0, 1000))
def test_property_expert_choice_every_expert_takes_exactly_its_capacity(T, N, c, seed):
    logits = torch.randn(T, N, generator=torch.Generator().manual_seed(seed))
    r = route_expert_choice(logits, RouteSpec(N, 1, capacity_factor=c))
    k = expert_choice_capacity(T, N, c)
    assert r.keep_TK.sum(0).tolist() == [k] * N
    assert (r.weight_TK >= 0).all()
    chosen = r.scores_TN.masked_fill(~r.keep_TK, float("inf")).amin(0)
    rejected = r.scores_TN.masked_fill(r.keep_TK, float("-inf")).amax(0)
    assert (chosen >= rejected).all()  # each expert took its best tokens


@pytest.mark.unit
@pytest.mark.parametrize(
    ("router", "balance", "key"),
    [
        ({"strategy": "nope"}, {}, "moe.router.strategy"),
        ({"device_capacity_factor": 1.0}, {}, "moe.router.device_capacity_factor"),
        ({"num_groups": 2, "device_capacity_factor": 0.0}, {}, "moe.router.device_capacity_factor"),
        ({}, {"device_coef": 0.05}, "moe.balance.device_coef"),
        ({}, {"comm_coef": 0.02}, "moe.balance.comm_coef"),
        ({"strategy": "expert_choice", "num_groups": 2, "topk_groups": 1}, {}, "moe.router.topk_groups"),
        ({"strategy": "hash", "bias_update_rate": 1e-3}, {}, "moe.router.bias_update_rate"),
        ({"noise_std": 0.0}, {}, "moe.router.noise_std"),
        ({"strategy": "topk_softmax", "score_fn": "sigmoid"}, {}, "moe.router.score_fn"),
    ],
)
def test_bad_routing_config_fails_with_one_line_naming_the_key(router, balance, key):
    from moetrain.config import BalanceConfig, ConfigError, TrainConfig, validate

    cfg = TrainConfig(moe=MoEConfig(router=RouterConfig(**router), balance=BalanceConfig(**balance)))
    with pytest.raises(ConfigError, match=f"^{key}="):
        validate(cfg)


PRESETS = [
    "default",
    "switch",
    "gshard",
    "mixtral",
    "deepseek_v2",
    "deepseek_v3",
    "loss_free",
    "expert_choice",
    "hash",
    "noisy_topk",
]


@pytest.mark.unit
@pytest.mark.parametrize("name", PRESETS)
def test_every_moe_preset_composes_validates_and_builds_a_working_layer(name):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moetrain.config import validate
    from moetrain.train.cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=[f"moe={name}"]))
    validate(cfg)
    m = cfg.moe
    groups = m.router.num_groups or 1
    layer = MoELayer(16, m, num_groups=groups)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
    y, stats = layer(torch.randn(2, 8, 16), torch.randint(0, 256, (2, 8)))
    assert torch.isfinite(y).all() and torch.isfinite(stats.aux_loss)
    if name == "deepseek_v2":
        b = m.balance
        assert (b.expert_coef, b.device_coef, b.comm_coef) == (0.003, 0.05, 0.02)
        assert (m.router.topk_groups, groups, m.num_shared_experts) == (3, 8, 2)
        assert set(stats.losses) == {"expert", "device", "comm"}
    if name == "deepseek_v3":
        assert m.router.score_fn == "sigmoid" and m.router.group_score == "topk_sum"
        assert m.router.bias_update_rate == 1e-3 and m.balance.seq_coef == 1e-4
