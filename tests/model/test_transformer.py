"""The plain Transformer: causality, shapes, init, parameter counts."""

from __future__ import annotations

import pytest
import torch

from moetrain.config import ModelConfig, MoEConfig
from moetrain.model import build_model, is_moe_layer
from moetrain.model.layers import apply_rope, rope_tables

pytestmark = pytest.mark.unit


def tiny(**moe_kw) -> tuple[ModelConfig, MoEConfig]:
    m = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden_size=48, first_k_dense=1)
    return m, MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16, **moe_kw)


def test_changing_a_future_token_leaves_past_logits_unchanged():
    m_cfg, moe_cfg = tiny()
    model = build_model(m_cfg, moe_cfg, vocab_size=64, max_seq_len=16, seed=0).eval()
    x = torch.randint(0, 64, (2, 16))
    y = x.clone()
    y[:, 10] = (y[:, 10] + 7) % 64
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_layer_pattern_first_k_dense_and_moe_every():
    cfg = ModelConfig(n_layers=6, first_k_dense=2, moe_every=2)
    assert [is_moe_layer(cfg, i) for i in range(6)] == [False, False, True, False, True, False]


def test_same_seed_same_weights_and_tied_embeddings():
    m_cfg, moe_cfg = tiny()
    a = build_model(m_cfg, moe_cfg, 64, 16, seed=3)
    b = build_model(m_cfg, moe_cfg, 64, 16, seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    m_cfg.tie_embeddings = True
    t = build_model(m_cfg, moe_cfg, 64, 16, seed=3)
    assert t.lm_head.weight is t.embed.weight


def test_param_counts_total_and_active():
    m_cfg, moe_cfg = tiny()
    model = build_model(m_cfg, moe_cfg, 64, 16, seed=0)
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params() == total
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert model.num_params(active=True) == total - expert + expert * 2 // 4


def test_rope_is_a_rotation_that_preserves_relative_dot_products():
    cos, sin = rope_tables(8, 32, 10000.0)
    q = torch.randn(1, 1, 1, 8).expand(1, 1, 32, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 32, 8)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    d1 = (rq[0, 0, 5] * rk[0, 0, 3]).sum()  # offset 2
    d2 = (rq[0, 0, 20] * rk[0, 0, 18]).sum()
    torch.testing.assert_close(d1, d2, rtol=1e-4, atol=1e-5)


@pytest.mark.parity
def test_activation_checkpointing_gives_identical_loss_and_gradients():
    from moetrain.model.apply import apply_activation_checkpointing

    m_cfg, moe_cfg = tiny()
    moe_cfg.router.strategy = "topk"
    x = torch.randint(0, 64, (2, 16))

    def loss_and_grads(model):
        out = model(x)
        loss = out.logits.float().square().mean() + out.aux_loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref = loss_and_grads(build_model(m_cfg, moe_cfg, 64, 16, seed=0))
    ckpt = apply_activation_checkpointing(build_model(m_cfg, moe_cfg, 64, 16, seed=0))
    assert [n for n, _ in ckpt.named_parameters()] == list(ref)  # names (and checkpoints) unchanged
    loss, grads = loss_and_grads(ckpt)
    assert torch.equal(loss, ref_loss)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=0, atol=0, msg=name)


@pytest.mark.parity
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_model_matches_eager_forward_and_every_gradient(backend):
    """Regional compilation (dense blocks whole, the MoE block's attention, norms, router and shared experts
    each ``fullgraph``) equals eager: logits, the balance loss and every gradient, with inductor's kernels too
    (this caught compiled graphs whose unused outputs got no tangent in the backward)."""
    from moetrain.model.apply import apply_compile

    m_cfg, moe_cfg = tiny()
    moe_cfg.num_shared_experts = 1
    x = torch.randint(0, 64, (2, 16))
    results = []
    for compile_it in (False, True):
        model = build_model(m_cfg, moe_cfg, 64, 16, seed=0)
        if compile_it:
            apply_compile(model, backend=backend)
        out = model(x)
        loss = out.logits.float().square().mean() + out.aux_loss
        names = [n for n, p in model.named_parameters()]
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((out.logits, out.aux_loss, dict(zip(names, grads))))
    (logits, aux, grads), (c_logits, c_aux, c_grads) = results
    torch.testing.assert_close(c_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_aux, aux, rtol=1e-5, atol=1e-7)
    for name, g in grads.items():
        torch.testing.assert_close(c_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
