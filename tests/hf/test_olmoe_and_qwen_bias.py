"""transformers' OlmoeForCausalLM (q/k norms over all heads) and Qwen2-MoE with q/k/v biases (Qwen1.5-MoE) both
ways, exact: import with the source's logits, export back tensor for tensor; what does not map is one line
naming the key."""

from __future__ import annotations

import pytest
import torch

from moetrain.hf.convert import from_hf_state
from moetrain.hf.mapping import ExportError
from moetrain.tools.export import export_hf, import_hf, load_checkpoint_model
from tests.hf.test_transformers_interop import NORM_EPS, ROPE_THETA, logits_of, needs, randomize

pytestmark = pytest.mark.parity

VOCAB = 320


def tiny(arch: str, **kw):  # type: ignore[no-untyped-def]
    """A tiny random OLMoE or Qwen2-MoE with q/k/v biases (GQA, non-default RoPE base and norm epsilon)."""
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        rms_norm_eps=NORM_EPS,
    )
    if arch == "olmoe":
        return randomize(transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**common, intermediate_size=16, **kw)))
    cfg = transformers.Qwen2MoeConfig(
        **common,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        mlp_only_layers=[0],
        qkv_bias=True,
        **kw,
    )
    return randomize(transformers.Qwen2MoeForCausalLM(cfg))


@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe"])
def test_import_equals_the_source_and_export_returns_it_tensor_for_tensor(tmp_path, arch):
    """Catches OLMoE's whole-width q/k norms applied per head or not permuted like the q/k rows, and Qwen's
    q/k biases not permuted (or the v bias dropped)."""
    needs("transformers", "safetensors")
    hf = tiny(arch)
    hf.save_pretrained(str(tmp_path / "hf"))
    model, cfg, _ = load_checkpoint_model(import_hf(tmp_path / "hf", tmp_path / "imported", seq_len=32))
    if arch == "olmoe":
        assert cfg.model.qk_norm and cfg.model.qk_norm_scope == "all" and cfg.moe.num_shared_experts == 0
    else:
        assert cfg.model.attention_bias and not cfg.model.qk_norm
    tokens = torch.randint(0, VOCAB, (2, 32))
    ref = logits_of(hf, tokens)
    diff = (logits_of(model, tokens) - ref).abs().max().item()
    assert diff < 1e-5, f"imported logits differ by {diff}"
    assert export_hf(model, cfg, tmp_path / "back") == arch
    import transformers

    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32).eval()
    source, back = hf.state_dict(), again.state_dict()
    assert source.keys() == back.keys()
    for name, t in source.items():
        assert torch.equal(back[name], t), name


@pytest.mark.parametrize(
    ("arch", "kw", "message"),
    [
        ("olmoe", {"clip_qkv": 8.0}, r"^clip_qkv=8\.0: "),
        ("olmoe", {"attention_bias": True}, r"^attention_bias=True: "),
    ],
)
def test_what_does_not_map_is_refused_naming_the_key(arch, kw, message):
    needs("transformers")
    hf = tiny(arch, **kw)
    with pytest.raises(ExportError, match=message):
        from_hf_state(hf.state_dict(), hf.config)


def test_attention_bias_starts_at_zero_and_maps_only_onto_qwen2_moe(tmp_path):
    """New biases are zero at init (a biased model starts as the unbiased one); without shared experts there is
    no transformers architecture with q/k/v biases only, refused naming model.attention_bias."""
    from moetrain.hf.convert import hf_architecture
    from moetrain.model import build_model
    from tests.conftest import tiny_train_config

    cfg = tiny_train_config(tmp_path)
    cfg.model.attention_bias = True
    cfg.moe.router.norm_topk_prob = True
    model = build_model(cfg.model, cfg.moe, VOCAB, 32, seed=0)
    biases = {n: p for n, p in model.named_parameters() if n.endswith(".bias")}
    assert len(biases) == 3 * cfg.model.n_layers and all(not p.any() for p in biases.values())
    assert hf_architecture(cfg, model) == "qwen2_moe"
    cfg.moe.num_shared_experts = 0
    with pytest.raises(ExportError, match=r"^model\.attention_bias=True: "):
        hf_architecture(cfg, model)
