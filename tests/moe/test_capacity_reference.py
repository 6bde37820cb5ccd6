"""Capacity dropping against an independent rule, outputs and every gradient.

Reference (docs/routing.md, capacity): per expert, C = ceil(f T K / N) and the C
assignments with the highest affinity s_{i,t} are kept (GShard; Switch eq. 3);
then, with DeepSeek-V2 device-level dropping, each of the D device groups keeps
at most ceil(f_dev * A / D) of the A surviving assignments, again the
highest-affinity ones. Everything below is a per-token / per-expert loop written
from that rule, not from ``capacity_keep``, so a capacity off by one, dropping
by position instead of score, or dropping the wrong stage's survivors fails here
(the EP capacity parity runs the same drop code on both sides and cannot).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import MoEConfig, RouterConfig
from moetrain.moe import MoELayer

pytestmark = pytest.mark.unit

D, N, K = 8, 6, 2


def make_layer(shared: int = 1, **router) -> MoELayer:
    cfg = MoEConfig(
        num_experts=N, top_k=K, expert_hidden_size=6, num_shared_experts=shared, router=RouterConfig(**router)
    )
    layer = MoELayer(D, cfg, num_groups=router.get("num_groups") or 1)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return layer


def reference_keep(s_TN: torch.Tensor, chosen: list[list[int]], cap_factor: float | None, dev_factor: float | None,
                   groups: int) -> set[tuple[int, int]]:  # fmt: skip
    """The kept (token, expert) pairs: per-expert top-C by affinity, then per-group top-budget by affinity."""
    T = len(chosen)
    s = s_TN.detach().tolist()
    kept = {(t, e) for t in range(T) for e in chosen[t]}
    if cap_factor is not None:
        cap = math.ceil(cap_factor * T * K / N)
        survivors = set()
        for e in range(N):
            mine = sorted((t for t in range(T) if (t, e) in kept), key=lambda t: (-s[t][e], t))
            survivors |= {(t, e) for t in mine[:cap]}
        kept = survivors
    if dev_factor is not None:
        budget = math.ceil(dev_factor * len(kept) / groups)
        per = N // groups
        survivors = set()
        for d in range(groups):
            mine = sorted((a for a in kept if a[1] // per == d), key=lambda a: (-s[a[0]][a[1]], a[0]))
            survivors |= set(mine[:budget])
        kept = survivors
    return kept


def reference_forward(layer: MoELayer, x_TD: torch.Tensor, cap_factor: float | None, dev_factor: float | None):
    rc = layer.cfg.router
    logits = F.linear(x_TD, layer.router.weight)
    s = logits.softmax(-1) if rc.score_fn == "softmax" else logits.sigmoid()
    chosen = [sorted(range(N), key=lambda i: -row[i])[:K] for row in s.detach().tolist()]
    kept = reference_keep(s, chosen, cap_factor, dev_factor, layer.num_groups)
    out = []
    for t in range(x_TD.shape[0]):
        g = s[t, chosen[t]]
        if rc.norm_topk_prob or rc.score_fn == "sigmoid":
            g = g / g.sum()  # renormalised over the K chosen, before any dropping
        g = g * rc.scaling_factor
        y = torch.zeros(D)
        for e, w in zip(chosen[t], g):
            if (t, e) in kept:
                h1, h3 = (x_TD[t] @ layer.experts.w13[e]).chunk(2)
                y = y + w * ((F.silu(h1) * h3) @ layer.experts.w2[e])
        if layer.shared is not None:
            y = y + layer.shared(x_TD[t])
        out.append(y)
    return torch.stack(out), kept, chosen


CASES = {
    "cf0.5": {"capacity_factor": 0.5},
    "cf0.5_sigmoid_scaled": {"capacity_factor": 0.5, "score_fn": "sigmoid", "scaling_factor": 2.0},
    "cf0.75_normalized": {"capacity_factor": 0.75, "norm_topk_prob": True},
    "device_drop": {"num_groups": 3, "device_capacity_factor": 1.0},
    "cf1.0_then_device_drop": {"num_groups": 2, "capacity_factor": 1.0, "device_capacity_factor": 0.6},
}


@pytest.mark.parametrize("case", list(CASES))
def test_capacity_dropping_equals_independent_rule_forward_and_every_gradient(case):
    router = CASES[case]
    layer = make_layer(**router)
    layer.train()
    x = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(12)) * 1.5
    x.requires_grad_(True)
    y, stats = layer(x)
    xr = x.detach().clone().requires_grad_(True)
    ref, kept, chosen = reference_forward(
        layer, xr.view(-1, D), router.get("capacity_factor"), router.get("device_capacity_factor")
    )
    selected = sum(len(c) for c in chosen)
    assert 0 < len(kept) < selected  # dropping is active
    load = torch.zeros(N)
    for _, e in kept:
        load[e] += 1
    torch.testing.assert_close(stats.load_N, load)
    assert int(stats.num_dropped) == selected - len(kept)
    torch.testing.assert_close(y.view(-1, D), ref, rtol=1e-5, atol=1e-6)

    gout = torch.randn(y.shape, generator=torch.Generator().manual_seed(13))
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [x, *params], gout)
    ref_grads = torch.autograd.grad(ref.view_as(y), [xr, *params], gout, allow_unused=True)
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=1e-4, atol=1e-6, msg=name)


def test_capacity_rule_keeps_the_best_not_the_first_and_exactly_c():
    """A hand-made case where position and score disagree and C is not a round number."""
    layer = make_layer(shared=0, capacity_factor=0.5)
    with torch.no_grad():  # every token prefers experts 0 then 1, more strongly the later it comes
        layer.router.weight.zero_()
        layer.router.weight[0, 0], layer.router.weight[1, 0] = 2.0, 1.0
    x = torch.zeros(1, 10, D)
    x[0, :, 0] = torch.linspace(0.1, 1.0, 10)
    _, stats = layer(x)
    cap = math.ceil(0.5 * 10 * K / N)  # 2 (not 1.67 floored)
    assert stats.load_N.tolist() == [cap, cap, 0, 0, 0, 0]
    r = layer.router(x.view(-1, D))
    keep, _ = layer._drop(r, None)
    assert keep[:, 0].nonzero().flatten().tolist() == [8, 9]  # the two highest affinities, the last tokens


@pytest.mark.parametrize("router", [{"capacity_factor": 1e-6}, {"num_groups": 2, "device_capacity_factor": 0.05}])
def test_a_token_dropped_by_every_expert_outputs_exactly_its_shared_expert_path(router):
    layer = make_layer(**router)
    x = torch.randn(1, 16, D, generator=torch.Generator().manual_seed(14))
    y, _ = layer(x)
    r = layer.router(x.view(-1, D))
    all_dropped = ~layer._drop(r, None)[0].any(dim=1)
    assert all_dropped.sum() >= 4
    shared = layer.shared(x.view(-1, D))
    assert torch.equal(y.view(-1, D)[all_dropped], shared[all_dropped])
    assert not torch.equal(y.view(-1, D)[~all_dropped], shared[~all_dropped])
