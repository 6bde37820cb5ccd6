"""Paper conventions that change what a published recipe does: the drop order of capacity, the
transformers / Mixtral balance-loss form, Shazeer et al.'s smooth load loss and zero-initialised gates.

Each test checks against an independent, literal reading of the paper (or of the reference
implementation), on hand-computed examples where that is short.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moetrain.moe.capacity import capacity_keep, drop_priority

pytestmark = pytest.mark.unit


def gshard_position_keep(expert_idx_TK: torch.Tensor, num_experts: int, cap: int) -> torch.Tensor:
    """GShard Algorithm 1, literally: a loop over the tokens' first choices fills the counters c_e, then a loop
    over their second choices continues the same counters; an assignment is kept while c_e < C."""
    T, K = expert_idx_TK.shape
    keep = torch.zeros(T, K, dtype=torch.bool)
    filled = [0] * num_experts
    for k in range(K):
        for t in range(T):
            e = int(expert_idx_TK[t, k])
            keep[t, k] = filled[e] < cap
            filled[e] += 1
    return keep


def test_position_policy_is_gshard_order_and_score_policy_keeps_the_best():
    # Expert 0 is wanted by tokens 0..3: token 1 as second choice with the highest affinity.
    idx = torch.tensor([[0, 1], [2, 0], [0, 2], [0, 1]])
    scores = torch.tensor(
        [[0.5, 0.3, 0.2], [0.45, 0.05, 0.5], [0.3, 0.1, 0.6], [0.25, 0.7, 0.05]]
    )  # s[t, e]; token 1's affinity to expert 0 (0.45) is the 2nd highest of expert 0's four
    ones = torch.ones(4, 2, dtype=torch.bool)
    by_pos = capacity_keep(idx, drop_priority(scores, idx, "position"), ones, 3, cap=2)
    # position: first choices of expert 0 are tokens 0, 2, 3 (in token order): tokens 0 and 2 fit; token 1's
    # second choice and token 3's first choice overflow.
    assert by_pos[:, 0].tolist() == [True, True, True, False] and by_pos[1, 1].item() is False
    assert torch.equal(by_pos, gshard_position_keep(idx, 3, 2))
    by_score = capacity_keep(idx, drop_priority(scores, idx, "score"), ones, 3, cap=2)
    # score: expert 0 keeps its two highest affinities, 0.5 (token 0) and 0.45 (token 1's second choice).
    assert by_score[0, 0] and by_score[1, 1] and not by_score[2, 0] and not by_score[3, 0]


@pytest.mark.parametrize("seed", range(5))
def test_position_policy_equals_gshard_algorithm_on_random_routings(seed):
    g = torch.Generator().manual_seed(seed)
    T, N, K = 37, 5, 2
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(T)])
    scores = torch.rand(T, N, generator=g)
    for cap in (1, 4, 9, 15):
        got = capacity_keep(idx, drop_priority(scores, idx, "position"), torch.ones(T, K, dtype=torch.bool), N, cap)
        assert torch.equal(got, gshard_position_keep(idx, N, cap)), cap


def test_switch_and_gshard_presets_drop_by_position_and_the_layer_uses_the_policy():
    from pathlib import Path

    from omegaconf import OmegaConf

    from moetrain.config import MoEConfig, RouterConfig
    from moetrain.moe import MoELayer

    root = Path(__file__).resolve().parents[2] / "configs" / "moe"
    for name in ("switch", "gshard"):
        assert OmegaConf.load(root / f"{name}.yaml").router.drop_policy == "position", name
    for name in ("default", "deepseek_v2", "mixtral"):
        assert "drop_policy" not in OmegaConf.load(root / f"{name}.yaml").router, name  # score, the default
    # A Switch-like layer (top-1, capacity 1 token per expert): position keeps each expert's first token.
    torch.manual_seed(0)
    layer = MoELayer(8, MoEConfig(num_experts=2, top_k=1, expert_hidden_size=8, num_shared_experts=0,
                                  router=RouterConfig(capacity_factor=0.25, drop_policy="position")))  # fmt: skip
    layer.train()
    x = torch.randn(1, 8, 8)
    r = layer.router(x.view(-1, 8))
    keep, _ = layer._drop(r, None)
    for e in range(2):
        mine = (r.expert_idx_TK[:, 0] == e).nonzero().flatten().tolist()
        kept = [t for t in mine if keep[t, 0]]
        assert kept == mine[:1], (e, mine, kept)


def _preset(name: str):
    from pathlib import Path

    from omegaconf import OmegaConf

    from moetrain.config import MoEConfig

    root = Path(__file__).resolve().parents[2] / "configs" / "moe"
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MoEConfig), OmegaConf.load(root / f"{name}.yaml")))


def _capture_routings(model):
    """Record each MoE layer's Routing as its router returns it."""
    seen = {}
    for i, layer in model.moe_layers().items():
        inner = layer.router.forward

        def fwd(*a, _inner=inner, _i=i, **k):
            seen[_i] = _inner(*a, **k)
            return seen[_i]

        layer.router.forward = fwd
    return seen


def test_mixtral_preset_aux_loss_is_transformers_load_balancing_loss_exactly():
    """moe=mixtral reproduces what a transformers Mixtral run adds to its loss: router_aux_loss_coef x
    load_balancing_loss_func(all layers' router logits), value and gradient w.r.t. every router weight."""
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from moetrain.config import ModelConfig
    from moetrain.model import build_model

    moe = _preset("mixtral")
    moe.expert_hidden_size = 16
    assert moe.balance.expert_form == "transformers" and moe.balance.expert_coef == 0.02
    m = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden_size=48, first_k_dense=0)
    model = build_model(m, moe, 64, 16, seed=0)
    with torch.no_grad():  # routing far from uniform, so the pooled and per-layer forms differ
        for layer in model.moe_layers().values():
            layer.router.weight.mul_(40)
    seen = _capture_routings(model)
    out = model(torch.randint(0, 64, (2, 16)))
    theirs = 0.02 * load_balancing_loss_func(tuple(seen[i].logits_TN for i in sorted(seen)), moe.num_experts, moe.top_k)
    torch.testing.assert_close(out.aux_loss, theirs, rtol=1e-6, atol=1e-8)
    routers = [layer.router.weight for layer in model.moe_layers().values()]
    got = torch.autograd.grad(out.aux_loss, routers, retain_graph=True)
    want = torch.autograd.grad(theirs, routers)
    for a, b in zip(got, want):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    # The per-layer form is a different number here: K x pooled != the mean of the per-layer losses.
    per_layer = sum(float(expert_loss(s).detach()) for s in out.moe_stats.values())
    assert abs(per_layer * moe.top_k / len(out.moe_stats) - float(theirs.detach()) / 0.02) > 1e-3


def expert_loss(s) -> torch.Tensor:
    from moetrain.moe.balance import expert_balance_loss

    return expert_balance_loss(s.sel_counts_N, s.mean_scores_N, s.num_tokens, 2)


def test_transformers_form_at_uniform_routing_is_k_and_per_layer_is_one():
    from moetrain.moe.balance import expert_balance_loss, pooled_expert_balance_loss

    L, N, K, T = 3, 4, 2, 8
    counts = torch.full((L, N), T * K / N)
    p = torch.full((L, N), 1.0 / N)
    torch.testing.assert_close(pooled_expert_balance_loss(counts, p, T, K), torch.tensor(float(K)))
    torch.testing.assert_close(expert_balance_loss(counts[0], p[0], T, K), torch.tensor(1.0))


def smooth_load_reference(clean, noisy, scale, k):
    """Shazeer et al. 2017 eq. 8-11 one (token, expert) at a time: kth_excluding(H, k, i) by removing i."""
    T, N = clean.shape
    load = []
    for i in range(N):
        total = clean.new_zeros(())
        for t in range(T):
            others = torch.cat([noisy[t, :i], noisy[t, i + 1 :]])
            kth = others.topk(k).values[-1]
            z = (clean[t, i] - kth) / scale[t, i]
            total = total + torch.distributions.Normal(0.0, 1.0).cdf(z)
        load.append(total)
    load = torch.stack(load)
    return load.var(unbiased=False) / (load.mean() ** 2 + 1e-10)


def test_smooth_load_loss_equals_the_paper_formula_value_and_gradients():
    from moetrain.moe.balance import smooth_load_loss

    torch.manual_seed(0)
    T, D, N, K = 6, 5, 5, 2
    x = torch.randn(T, D)
    w_g = torch.randn(N, D, requires_grad=True)
    w_noise = torch.randn(N, D, requires_grad=True)
    eps = torch.randn(T, N)
    clean = x @ w_g.t()
    scale = torch.nn.functional.softplus(x @ w_noise.t())
    noisy = clean + eps * scale
    got = smooth_load_loss(clean, noisy, scale, K)
    want = smooth_load_reference(clean, noisy, scale, K)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    g_got = torch.autograd.grad(got, [w_g, w_noise], retain_graph=True)
    g_want = torch.autograd.grad(want, [w_g, w_noise])
    for a, b in zip(g_got, g_want):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_noisy_topk_preset_adds_the_load_loss_in_training_from_zero_initialised_gates():
    from moetrain.config import ModelConfig
    from moetrain.model import build_model
    from moetrain.moe.balance import smooth_load_loss

    moe = _preset("noisy_topk")
    assert moe.router.zero_init and moe.balance.load_coef == 0.1 and moe.balance.importance_coef == 0.1
    moe.expert_hidden_size = 16
    m = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=48, first_k_dense=0)
    model = build_model(m, moe, 64, 16, seed=0)
    for layer in model.moe_layers().values():
        assert not layer.router.weight.any() and not layer.router.noise_weight.any()
    seen = _capture_routings(model)
    model.train()
    out = model(torch.randint(0, 64, (2, 16)))
    for i, s in out.moe_stats.items():
        r = seen[i]
        assert r.noise_TN is not None and len(set(r.expert_idx_TK[:, 0].tolist())) > 1  # the noise routes
        want = 0.1 * smooth_load_loss(r.logits_TN, r.logits_TN + r.noise_TN, r.noise_scale_TN, moe.top_k)
        torch.testing.assert_close(s.losses["load"], want.detach())
    model.eval()
    assert all("load" not in s.losses for s in model(torch.randint(0, 64, (2, 16))).moe_stats.values())


def test_device_level_dropping_never_drops_protected_assignments_even_past_the_budget():
    from moetrain.moe.capacity import device_capacity_keep

    # 4 experts in 2 groups, K = 1, everything on group 0: budget ceil(4 / 2) = 2.
    idx = torch.tensor([[0], [1], [0], [1]])
    prio = torch.tensor([[0.2], [0.9], [0.5], [0.1]], dtype=torch.float64)
    ones = torch.ones(4, 1, dtype=torch.bool)
    assert device_capacity_keep(idx, prio, ones, 4, 2, 1.0).flatten().tolist() == [False, True, True, False]
    prio[0, 0] = prio[3, 0] = float("inf")  # tokens 0 and 3 protected: they come first and take the budget
    assert device_capacity_keep(idx, prio, ones, 4, 2, 1.0).flatten().tolist() == [True, False, False, True]
    prio[2, 0] = float("inf")  # three protected, budget two: all three kept anyway, nothing else
    assert device_capacity_keep(idx, prio, ones, 4, 2, 1.0).flatten().tolist() == [True, False, True, True]


def test_protected_sequences_are_about_the_fraction_and_depend_on_the_sequence_alone():
    from moetrain.moe.routing import protected_sequences

    ids = torch.randint(0, 50_000, (4000, 64), generator=torch.Generator().manual_seed(0))
    prot = protected_sequences(ids, 0.1)
    assert 0.085 < prot.float().mean().item() < 0.115
    # the same sequences, split or reordered (another DP / EP layout or micro-batching): the same choice
    perm = torch.randperm(4000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(protected_sequences(ids[perm], 0.1), prot[perm])
    assert torch.equal(torch.cat([protected_sequences(c, 0.1) for c in ids.split(7)]), prot)
    assert not protected_sequences(ids, 0.0).any() and protected_sequences(ids, 1.0).all()


def test_layer_device_dropping_keeps_every_token_of_a_protected_sequence():
    from moetrain.config import MoEConfig, RouterConfig
    from moetrain.moe import MoELayer
    from moetrain.moe.routing import protected_sequences

    torch.manual_seed(0)
    router = RouterConfig(num_groups=4, device_capacity_factor=0.5, device_protect_fraction=0.3)
    layer = MoELayer(16, MoEConfig(num_experts=8, top_k=2, expert_hidden_size=8, router=router), num_groups=4)
    with torch.no_grad():
        layer.router.weight.normal_(0, 2.0)
    layer.train()
    ids = torch.randint(0, 1000, (20, 6))
    x = torch.randn(20, 6, 16)
    keep, handed = layer._drop(layer.router(x.view(-1, 16)), ids)
    assert handed is None  # one process: the groups are not the dispatcher's devices
    prot_T = protected_sequences(ids, 0.3).repeat_interleave(6)
    assert prot_T.any() and (~prot_T).any()
    assert keep[prot_T].all()  # nothing of a protected sequence is dropped
    assert not keep[~prot_T].all()  # while the others lose assignments at factor 0.5


def test_balanced_hash_table_hand_computed_and_balanced_on_zipf_frequencies():
    from moetrain.moe.routing import balanced_hash_table, hash_experts

    # most frequent first, each to the least-loaded expert (ties to the lower index)
    table = balanced_hash_table(torch.tensor([10, 1, 1, 5, 3]), num_experts=2, top_k=1)
    assert table.flatten().tolist() == [0, 1, 1, 1, 1]  # loads 10 and 10
    two = balanced_hash_table(torch.tensor([4, 3, 2, 1]), num_experts=3, top_k=2)
    assert all(len(set(row)) == 2 for row in two.tolist())  # K distinct experts per id
    # Zipf-distributed token frequencies: the balanced map's expert loads are near-even, the random hash's not
    V, N = 5000, 16
    counts = (1e6 / (torch.arange(1, V + 1).double() + 100)).round().long()  # no single id outweighs an expert

    def load(tbl):
        return torch.zeros(N, dtype=torch.long).scatter_add_(0, tbl[:, 0], counts)

    bal = load(balanced_hash_table(counts, N, 1))
    rnd = load(hash_experts(torch.arange(V), N, 1, seed=0))
    maxvio = lambda c: (c.max() / c.double().mean() - 1).item()  # noqa: E731
    assert maxvio(bal) < maxvio(rnd) / 5, (maxvio(bal), maxvio(rnd))
    assert bal.max() - bal.min() <= counts.max()  # the greedy bound: off by at most one token id's count


def test_trainer_fills_the_balanced_hash_table_from_the_training_corpus(tmp_path):
    from moetrain.moe.routing import balanced_hash_table
    from moetrain.train.trainer import Trainer
    from tests.conftest import tiny_train_config

    cfg = tiny_train_config(tmp_path, max_steps=1)
    cfg.moe.router.strategy, cfg.moe.router.hash_table, cfg.moe.top_k = "hash", "balanced", 1
    cfg.moe.balance.expert_coef = 0.0
    trainer = Trainer(cfg, tmp_path / "run")
    counts = torch.from_numpy(np.bincount(np.asarray(trainer.data.train).reshape(-1)))
    layers = list(trainer.model.moe_layers().values())
    V = layers[0].router.hash_table.shape[0]
    want = balanced_hash_table(torch.cat([counts, counts.new_zeros(V - counts.numel())]), cfg.moe.num_experts, 1)
    for layer in layers:
        assert torch.equal(layer.router.hash_table, want)
    # and the layer routes by it
    ids = torch.randint(0, V, (2, 8))
    r = layers[0].router(torch.randn(16, cfg.model.dim), ids.reshape(-1))
    assert torch.equal(r.expert_idx_TK, want[ids.reshape(-1)])
