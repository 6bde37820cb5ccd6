"""Multi-head Latent Attention (moetrain.model.mla): DeepSeek-V2's eq. 9-19 transcribed, the latent generation
cache, document masking, activation checkpointing, regional compile, YaRN, the cost formulas."""

from __future__ import annotations

import math

import pytest
import torch

from moetrain.config import ConfigError, ModelConfig, MoEConfig, RopeScalingConfig, TrainConfig, validate
from moetrain.model import build_model
from moetrain.model.mla import (
    MLA,
    attention_score_flops,
    kv_numbers_per_token,
    model_rope_tables,
    set_absorbed_decode,
    softmax_scale,
)
from moetrain.tools.generate import generate

pytestmark = pytest.mark.parity

V = 64


def mla_cfg(**kw) -> ModelConfig:  # type: ignore[no-untyped-def]
    base = dict(dim=32, n_layers=3, n_heads=4, ffn_hidden_size=48, first_k_dense=1, attention="mla")
    base.update(kv_lora_rank=12, q_lora_rank=10, qk_rope_head_dim=8, qk_nope_head_dim=6, v_head_dim=10)
    return ModelConfig(**{**base, **kw})


def model(**kw):  # type: ignore[no-untyped-def]
    return build_model(mla_cfg(**kw), MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16), V, 48, seed=0)


def rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_complex(x: torch.Tensor, t: int, theta: float) -> torch.Tensor:
    """RoPE of one vector at position t as a complex product of its pairs (Su et al. 2021, eq. 34)."""
    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.view_as_complex(x.double().reshape(-1, 2).contiguous()) * torch.polar(torch.ones_like(freq), t * freq)
    return torch.view_as_real(z).reshape(d).to(x.dtype)


def transcription(attn: MLA, h: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """DeepSeek-V2 eq. 9-19 written out token by token and head by head, from the module's matrices."""
    H, dn, dr, dv, dc = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    W_DKV, W_KR = attn.wkv_a.weight[:dc], attn.wkv_a.weight[dc:]
    W_UKV = attn.wkv_b.weight.view(H, dn + dv, dc)
    W_UK, W_UV = W_UKV[:, :dn], W_UKV[:, dn:]
    W_UQR = attn.wq_b.weight.view(H, dn + dr, -1)
    W_UQ, W_QR = W_UQR[:, :dn], W_UQR[:, dn:]
    S = h.shape[0]
    q, k, v = [], [], []
    for t in range(S):
        c_KV = rms(W_DKV @ h[t], attn.kv_norm.weight)  # eq. 9 (with the latent norm)
        k_R = rope_complex(W_KR @ h[t], t, cfg.rope_theta)  # eq. 14: one RoPE key for every head
        c_Q = rms(attn.wq_a.weight @ h[t], attn.q_norm.weight)  # eq. 12
        q.append([torch.cat([W_UQ[i] @ c_Q, rope_complex(W_QR[i] @ c_Q, t, cfg.rope_theta)]) for i in range(H)])
        k.append([torch.cat([W_UK[i] @ c_KV, k_R]) for i in range(H)])  # eq. 10, 16
        v.append([W_UV[i] @ c_KV for i in range(H)])  # eq. 11
    out = []
    for t in range(S):
        heads = []
        for i in range(H):
            scores = torch.stack([q[t][i] @ k[j][i] for j in range(t + 1)]) / math.sqrt(dn + dr)
            heads.append((torch.softmax(scores, 0)[:, None] * torch.stack([v[j][i] for j in range(t + 1)])).sum(0))
        out.append(attn.wo.weight @ torch.cat(heads))  # eq. 18-19
    return torch.stack(out)


def test_mla_equals_a_transcription_of_eq_9_to_19_in_values_and_gradients():
    """Catches a swapped nope/rope split, a per-head RoPE key, a missing latent norm, a wrong softmax scale or
    value width: the module against the paper's equations written out per token and head."""
    cfg = mla_cfg()
    torch.manual_seed(0)
    attn = MLA(cfg)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    h = torch.randn(7, cfg.dim, requires_grad=True)
    cos, sin = model_rope_tables(cfg, 16)
    ours = attn(h[None], cos, sin)[0]
    ref = transcription(attn, h, cfg)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(ours)
    g_ours = torch.autograd.grad((ours * w).sum(), [h, *attn.parameters()])
    g_ref = torch.autograd.grad((ref * w).sum(), [h, *attn.parameters()])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("q_lora", [None, 10])
def test_latent_cache_generation_equals_full_recompute_and_holds_dc_plus_dr_numbers(q_lora):
    """Catches a cache that stores expanded keys/values, forgets RoPE on cached keys or masks decoding wrongly:
    logits position by position and sampled tokens equal the uncached forward, and each layer's cache holds
    kv_lora_rank + qk_rope_head_dim numbers per token."""
    net = model(q_lora_rank=q_lora).eval()
    x = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        full = net(x).logits
        caches = net.new_kv_caches(2)
        prefill = net(x[:, :7], caches, 0).logits
        steps = torch.cat([net(x[:, i : i + 1], caches, i).logits for i in range(7, 15)], dim=1)
        chunk = net(x[:, 15:20], caches, 15).logits
    for got, want in ((prefill, full[:, :7]), (steps, full[:, 7:15]), (chunk, full[:, 15:20])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    per_token = sum(b.numel() for b in caches[0].buffers()) // (2 * 48)
    assert per_token == 12 + 8 == kv_numbers_per_token(net.cfg)
    prompt = torch.randint(0, V, (2, 5))
    for kw in ({"temperature": 0.0}, {"temperature": 0.9, "top_k": 10, "seed": 3}):
        assert torch.equal(
            generate(net, prompt, 20, use_cache=True, **kw), generate(net, prompt, 20, **kw, use_cache=False)
        )


@pytest.mark.parametrize("q_lora", [None, 10])
def test_absorbed_decode_equals_the_expanded_decode_and_the_full_recompute(q_lora, monkeypatch):
    """DeepSeek-V2 sec. 2.1.2's absorbed decode (W^UK into the query, W^UV after the weighted sum) is what the
    cached decode steps run by default, and it gives the logits of the expanded decode and of the whole prefix
    recomputed (fp32), and the same tokens. Catches W^UK / W^UV taken from the wrong rows of wkv_b, the
    RoPE part or the (YaRN) softmax scale left out of the latent-space scores, a decode mask off by one, or
    the absorbed path not being the default (the call count)."""
    r = RopeScalingConfig(type="yarn", factor=4.0, original_max_seq_len=16, mscale=0.7, mscale_all_dim=1.0)
    net = model(q_lora_rank=q_lora, rope_scaling=r).eval()
    x = torch.randint(0, V, (2, 24))
    calls: list[int] = []
    inner = MLA.absorbed
    monkeypatch.setattr(MLA, "absorbed", lambda self, *a: calls.append(1) or inner(self, *a))

    def decode(absorbed: bool) -> torch.Tensor:
        set_absorbed_decode(net, absorbed)
        caches = net.new_kv_caches(2)
        with torch.no_grad():
            net(x[:, :7], caches, 0)
            steps = [net(x[:, i : i + 1], caches, i).logits for i in range(7, 19)]
            return torch.cat([*steps, net(x[:, 19:24], caches, 19).logits], dim=1)

    expanded = decode(False)
    assert calls == []
    absorbed = decode(True)
    assert len(calls) == 13 * 3  # every decode step (12 tokens, one chunk) of every layer
    torch.testing.assert_close(absorbed, expanded, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(absorbed, net(x).logits[:, 7:], rtol=1e-5, atol=1e-5)
    set_absorbed_decode(net, True)
    prompt = torch.randint(0, V, (2, 5))
    assert torch.equal(generate(net, prompt, 18, temperature=0.0), generate(net, prompt, 18, 0.0, use_cache=False))


def test_document_masking_equals_each_document_alone():
    """Catches attention leaking across documents or RoPE positions not restarting in MLA's shared key."""
    net = model().eval()
    a, b = torch.randint(0, V, (1, 9)), torch.randint(0, V, (1, 7))
    doc = torch.tensor([[0] * 9 + [1] * 7])
    with torch.no_grad():
        packed = net(torch.cat([a, b], 1), doc_ids_BS=doc).logits
        torch.testing.assert_close(packed[:, :9], net(a).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[:, 9:], net(b).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wrap", ["checkpoint", "compile"])
def test_activation_checkpointing_and_regional_compile_keep_every_gradient(wrap):
    """Catches an MLA forward that breaks the fullgraph regional compile (a graph break is an error) or that
    recomputes differently under activation checkpointing."""
    from moetrain.model.apply import apply_activation_checkpointing, apply_compile

    x = torch.randint(0, V, (2, 16))
    results = []
    for wrapped in (False, True):
        net = model()
        if wrapped:
            apply_activation_checkpointing(net) if wrap == "checkpoint" else apply_compile(net, backend="aot_eager")
        out = net(x)
        loss = out.logits.square().mean() + out.aux_loss
        results.append(
            (
                loss.detach(),
                dict(zip([n for n, _ in net.named_parameters()], torch.autograd.grad(loss, list(net.parameters())))),
            )
        )
    (ref_loss, ref), (loss, grads) = results
    tol = 0.0 if wrap == "checkpoint" else 1e-5
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=tol * 10, atol=tol / 10, msg=name)


def test_yarn_scale_and_tables_follow_deepseek_v3():
    """Catches the YaRN mscale applied once instead of squared, or to the wrong key: DeepSeek-V3's softmax
    scale is mscale(s, mscale_all_dim)^2 / sqrt(d_h + d_h^R); with mscale = mscale_all_dim the RoPE tables are
    unscaled (attention factor 1) and the highest frequency is not interpolated."""
    r = RopeScalingConfig(type="yarn", factor=40.0, original_max_seq_len=4096, mscale=1.0, mscale_all_dim=1.0)
    cfg = ModelConfig(attention="mla", qk_nope_head_dim=128, qk_rope_head_dim=64, rope_scaling=r)
    m = 0.1 * math.log(40.0) + 1.0
    assert softmax_scale(cfg) == pytest.approx(m * m / math.sqrt(192))
    cos, sin = model_rope_tables(cfg, 8)
    assert cos.shape == (8, 32)
    torch.testing.assert_close(cos[1, 0], torch.tensor(math.cos(1.0)))  # pair 0: frequency 1, extrapolated
    torch.testing.assert_close(cos.pow(2) + sin.pow(2), torch.ones(8, 32))


def test_config_errors_name_the_key():
    """Bad MLA keys fail before anything is built, one line naming the key."""
    for kw, key in (
        ({"attention": "mqa"}, "model.attention"),
        ({"attention": "mla", "qk_rope_head_dim": 7}, "model.qk_rope_head_dim"),
        ({"attention": "mla", "kv_lora_rank": 0}, "model.kv_lora_rank"),
        ({"rope_scaling": RopeScalingConfig(type="yarn", factor=4.0)}, "model.rope_scaling.type"),
    ):
        cfg = TrainConfig(model=ModelConfig(**kw))
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
            validate(cfg)
        assert "\n" not in str(e.value)


def test_cost_formulas_reduce_to_gqa_and_count_mla_widths():
    """Catches the planner counting MLA's attention FLOPs and KV cache as GQA's."""
    gqa = ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4)
    assert attention_score_flops(gqa, 128) == 12 * 4 * 256 * 128
    assert kv_numbers_per_token(gqa) == 2 * 4 * 32
    mla = mla_cfg()
    assert attention_score_flops(mla, 128) == 6 * 3 * 128 * 4 * (6 + 8 + 10)
    assert kv_numbers_per_token(mla) == 12 + 8


def test_checkpoint_architecture_names_a_changed_mla_width_and_ignores_it_for_gqa(tmp_path):
    """Catches a resume that loads MLA weights of another latent width (a state-dict error instead of one line
    naming the key), or a GQA run refused over an MLA width it does not build."""
    from types import SimpleNamespace

    from moetrain.train.checkpoint import CheckpointError, arch_of, check_arch

    built = SimpleNamespace(vocab_size=V, num_groups=1)
    saved, run = TrainConfig(model=mla_cfg()), TrainConfig(model=mla_cfg(kv_lora_rank=16))
    with pytest.raises(CheckpointError, match=r"model\.kv_lora_rank=12 in the checkpoint but 16 in this run"):
        check_arch(tmp_path, {"arch": arch_of(saved, built)}, arch_of(run, built))
    gqa_saved, gqa_run = TrainConfig(), TrainConfig(model=ModelConfig(kv_lora_rank=16))
    check_arch(tmp_path, {"arch": arch_of(gqa_saved, built)}, arch_of(gqa_run, built))
