"""The MoE layer against a per-token reference; balance loss, capacity and MaxVio on hand-computed values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import BalanceConfig, MoEConfig, RouterConfig
from moetrain.moe import MoELayer, maxvio
from moetrain.moe.balance import expert_balance_loss, router_z_loss
from moetrain.moe.capacity import capacity, capacity_keep
from moetrain.moe.routing import topk_experts

pytestmark = pytest.mark.unit


def reference_moe(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """Straightforward per-token loop: softmax, top-K, weights, each chosen expert, shared."""
    cfg = layer.cfg
    out = []
    for t in range(x_TD.shape[0]):
        logits = layer.router.weight.float() @ x_TD[t].float()
        s = logits.softmax(-1) if cfg.router.score_fn == "softmax" else logits.sigmoid()
        idx = s.topk(cfg.top_k).indices
        w = s[idx]
        if cfg.router.norm_topk_prob or cfg.router.score_fn == "sigmoid":
            w = w / w.sum()
        w = w * cfg.router.scaling_factor
        y = torch.zeros_like(x_TD[t])
        for e, g in zip(idx.tolist(), w):
            w13, w2 = layer.experts.w13[e], layer.experts.w2[e]
            h1, h3 = (x_TD[t] @ w13).chunk(2)
            y = y + g * ((F.silu(h1) * h3) @ w2)
        if layer.shared is not None:
            y = y + layer.shared(x_TD[t])
        out.append(y)
    return torch.stack(out)


def make_layer(**kw) -> MoELayer:
    router = RouterConfig(**kw.pop("router", {}))
    cfg = MoEConfig(num_experts=6, top_k=2, expert_hidden_size=12, router=router, **kw)
    layer = MoELayer(16, cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"num_shared_experts": 0},
        {"router": {"norm_topk_prob": True, "scaling_factor": 2.5}},
        {"router": {"score_fn": "sigmoid"}},
    ],
)
def test_moe_layer_equals_per_token_reference_forward_and_gradients(kw):
    layer = make_layer(**kw)
    x = torch.randn(2, 7, 16, requires_grad=True)
    y, _ = layer(x)
    xr = x.detach().clone().requires_grad_(True)
    ref = reference_moe(layer, xr.view(-1, 16)).view(2, 7, 16)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)

    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], g)
    ref_grads = torch.autograd.grad(ref, [xr, *layer.parameters()], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_expert_balance_loss_hand_computed():
    # T=4 tokens, N=2 experts, K=1: token choices [0, 0, 0, 1]
    s = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    counts = torch.tensor([3.0, 1.0])
    # f = N/(K T) * counts = [1.5, 0.5]; P = mean s = [0.65, 0.35]; sum f P = 0.975 + 0.175
    loss = expert_balance_loss(counts, s.mean(0), num_tokens=4, top_k=1)
    torch.testing.assert_close(loss, torch.tensor(1.15))


def test_expert_balance_loss_is_one_at_uniform_routing():
    T, N, K = 12, 4, 2
    s = torch.full((T, N), 1.0 / N)
    counts = torch.full((N,), T * K / N)
    torch.testing.assert_close(expert_balance_loss(counts, s.mean(0), T, K), torch.tensor(1.0))


def test_layer_reports_weighted_balance_loss_and_load():
    layer = make_layer(balance=BalanceConfig(expert_coef=0.5, z_loss_coef=0.1))
    x = torch.randn(1, 9, 16)
    _, stats = layer(x)
    r = layer.router(x.view(-1, 16))
    counts = torch.bincount(r.expert_idx_TK.flatten(), minlength=6).float()
    torch.testing.assert_close(stats.load_N, counts)
    expected = 0.5 * expert_balance_loss(counts, r.scores_TN.mean(0), 9, 2) + 0.1 * router_z_loss(r.logits_TN)
    torch.testing.assert_close(stats.aux_loss, expected)
    assert set(stats.losses) == {"expert", "z"}


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    lse = torch.tensor([torch.log(torch.tensor(2.0)), 1 + torch.log(torch.tensor(2.0))])
    torch.testing.assert_close(router_z_loss(logits), lse.square().mean())


def test_maxvio_hand_computed():
    assert maxvio(torch.tensor([2.0, 2.0, 2.0, 2.0])).item() == 0.0
    torch.testing.assert_close(maxvio(torch.tensor([1.0, 2.0, 3.0, 6.0])), torch.tensor(1.0))  # (6 - 3) / 3
    torch.testing.assert_close(maxvio(torch.tensor([8.0, 0.0, 0.0, 0.0])), torch.tensor(3.0))  # N - 1
    assert maxvio(torch.zeros(4)).item() == 0.0
    torch.testing.assert_close(maxvio(torch.tensor([[1.0, 3.0], [2.0, 2.0]])), torch.tensor([0.5, 0.0]))


def test_capacity_drops_lowest_affinity_first():
    # 5 tokens all choose expert 0 (K=1); capacity 2 keeps the two highest scores.
    idx = torch.zeros(5, 1, dtype=torch.long)
    prio = torch.tensor([[0.1], [0.9], [0.5], [0.7], [0.2]])
    keep = capacity_keep(idx, prio, torch.ones(5, 1, dtype=torch.bool), num_experts=2, cap=2)
    assert keep.flatten().tolist() == [False, True, False, True, False]
    assert capacity(num_tokens=10, num_experts=4, top_k=2, factor=1.0) == 5
    assert capacity(num_tokens=10, num_experts=4, top_k=1, factor=1.25) == 4  # ceil(3.125)


def test_dropped_assignments_pass_through_and_everything_dropped_is_finite():
    layer = make_layer(num_shared_experts=0, router={"capacity_factor": 1e-6})
    layer.train()
    x = torch.randn(1, 8, 16, requires_grad=True)
    y, stats = layer(x)
    # capacity 1 per expert: at most N assignments survive; the rest contribute 0.
    assert stats.load_N.sum().item() <= 6
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_topk_experts_group_limited_uses_at_most_m_groups():
    torch.manual_seed(1)
    s = torch.rand(50, 8)
    idx = topk_experts(s, top_k=3, num_groups=4, topk_groups=2)
    groups = idx // 2
    assert all(len(set(g.tolist())) <= 2 for g in groups)
    # the chosen groups are the two with the highest best-expert score
    best = s.view(50, 4, 2).amax(-1).topk(2).indices.sort().values
    for t in range(50):
        assert set(groups[t].tolist()) <= set(best[t].tolist())


def test_local_dispatcher_dropless_gather_path_equals_the_masked_scatter_path():
    from moetrain.moe.dispatch import LocalDispatcher

    T, K, D, N = 11, 3, 8, 5
    x = torch.randn(T, D, requires_grad=True)
    idx = torch.stack([torch.randperm(N)[:K] for _ in range(T)])
    w = torch.rand(T, K, requires_grad=True)
    token_idx = torch.arange(T).repeat_interleave(K)
    outs = []
    for slots in (K, None):
        d = LocalDispatcher(N)
        rows, counts, weight, handle, *_ = d.dispatch(
            x, token_idx, idx.reshape(-1), w.reshape(-1), slots_per_token=slots
        )
        assert counts.tolist() == torch.bincount(idx.reshape(-1), minlength=N).tolist()
        scale = torch.arange(1, rows.shape[0] + 1.0).unsqueeze(-1) / 7  # a per-row stand-in for the experts
        y = d.combine(rows * scale * weight.unsqueeze(-1), handle)
        g = torch.autograd.grad(y.square().sum(), [x, w])
        outs.append((y, *g))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
