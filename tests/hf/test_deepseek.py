"""transformers' DeepseekV2ForCausalLM / DeepseekV3ForCausalLM both ways, exact: tiny random configs (MLA with
and without q_lora_rank, YaRN, group-limited routing, V3's bias and scaling) import with the source's logits and
gradients, export back tensor for tensor, and a model trained 3 steps after import exports with its own logits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from moetrain.hf.convert import from_hf_state, hf_architecture, to_hf_state
from moetrain.hf.mapping import ExportError
from moetrain.model.transformer import build_model
from moetrain.tools.export import export, export_hf, import_hf, load_checkpoint_model
from tests.conftest import write_corpus
from tests.hf.test_transformers_interop import logits_of, needs, train_cli

pytestmark = pytest.mark.parity

VOCAB = 320
YARN = {
    "rope_type": "yarn",
    "rope_theta": 500.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "mscale": 0.7,  # not mscale_all_dim: the RoPE tables carry an attention factor != 1
    "mscale_all_dim": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
}


def tiny_deepseek(version: int, q_lora: int | None = 8, yarn: bool = False, **kw):  # type: ignore[no-untyped-def]
    """A tiny random transformers DeepSeek-V2 (group-limited greedy) or V3 (sigmoid, bias, top-2 group sums)."""
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=4,
        first_k_dense_replace=1,
        kv_lora_rank=12,
        q_lora_rank=q_lora,
        qk_rope_head_dim=8,
        qk_nope_head_dim=6,
        v_head_dim=10,
        max_position_embeddings=64,
        rms_norm_eps=1e-3,  # not the default: a mapping that drops it changes the logits
        routed_scaling_factor=1.7,
        rope_parameters=YARN if yarn else {"rope_type": "default", "rope_theta": 500.0},
    )
    common.update(kw)
    if version == 3:
        model = transformers.DeepseekV3ForCausalLM(
            transformers.DeepseekV3Config(**common, n_group=2, topk_group=2, norm_topk_prob=True)
        )
    else:
        model = transformers.DeepseekV2ForCausalLM(
            transformers.DeepseekV2Config(**common, n_group=4, topk_group=2, topk_method="group_limited_greedy")
        )
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    return model.eval()


CASES = [(2, 8, False), (2, None, True), (3, 8, True), (3, None, False)]


@pytest.mark.parametrize(("version", "q_lora", "yarn"), CASES)
def test_deepseek_import_equals_the_source_and_export_returns_it_tensor_for_tensor(tmp_path, version, q_lora, yarn):
    """Catches a wrong MLA split (nope/rope, key/value), a RoPE layout that differs from DeepSeek's, a latent
    norm epsilon or YaRN factor lost on the way, and routing keys (groups, bias, scaling) not carried."""
    needs("transformers", "safetensors")
    hf = tiny_deepseek(version, q_lora, yarn)
    hf.save_pretrained(str(tmp_path / "hf"))
    ckpt = import_hf(tmp_path / "hf", tmp_path / "imported", seq_len=64)
    model, cfg, _ = load_checkpoint_model(ckpt)
    assert cfg.model.attention == "mla" and cfg.model.q_lora_rank == q_lora
    assert cfg.model.rope_scaling.type == ("yarn" if yarn else "none")
    tokens = torch.randint(0, VOCAB, (2, 48))  # past original_max_position_embeddings: YaRN's ramp matters
    ref = logits_of(hf, tokens)
    diff = (logits_of(model, tokens) - ref).abs().max().item()
    assert diff < 1e-5, f"imported logits differ by {diff}"

    assert export_hf(model, cfg, tmp_path / "back") == f"deepseek_v{version}"
    import transformers

    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32).eval()
    source, back = hf.state_dict(), again.state_dict()
    assert source.keys() == back.keys()
    for name, t in source.items():
        assert torch.equal(back[name], t), name
    assert (logits_of(again, tokens) - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("version", [2, 3])
def test_mla_model_gradients_equal_transformers(version):
    """Catches a backward that differs from transformers' on the same weights (every parameter's gradient)."""
    needs("transformers")
    hf = tiny_deepseek(version, yarn=version == 3)
    cfg, state = from_hf_state(hf.state_dict(), hf.config)
    net = build_model(cfg.model, cfg.moe, VOCAB, 64)
    net.load_state_dict(state)
    tokens = torch.randint(0, VOCAB, (2, 24))
    w = torch.randn(2, 24, VOCAB)
    (hf(tokens).logits * w).sum().backward()
    (net(tokens).logits * w).sum().backward()
    grads = copy.deepcopy(net)
    with torch.no_grad():
        for g, p in zip(grads.parameters(), net.parameters()):
            g.copy_(p.grad)
    hf_grads = to_hf_state(grads, hf_architecture(cfg, net), set())
    for name, p in hf.named_parameters():
        torch.testing.assert_close(hf_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_what_does_not_map_is_refused_naming_the_key(tmp_path):
    """Attention biases (Qwen-style) in a DeepSeek config, and MLA with routing DeepSeek does not have."""
    needs("transformers")
    hf = tiny_deepseek(2, attention_bias=True)
    with pytest.raises(ExportError, match=r"^attention_bias=True: "):
        from_hf_state(hf.state_dict(), hf.config)
    cfg, _ = from_hf_state(tiny_deepseek(2).state_dict(), tiny_deepseek(2).config)
    cfg.moe.router.norm_topk_prob = True
    with pytest.raises(ExportError, match="norm_topk_prob"):
        hf_architecture(cfg)
    cfg.moe.router.norm_topk_prob, cfg.model.moe_every = False, 2
    with pytest.raises(ExportError, match=r"^model\.moe_every=2: "):
        hf_architecture(cfg)


def source_model(arch: str):  # type: ignore[no-untyped-def]
    """The tiny random transformers model of each architecture issue 30 imports."""
    from tests.hf.test_olmoe_and_qwen_bias import tiny

    if arch.startswith("deepseek_v"):
        return tiny_deepseek(int(arch[-1]))
    return tiny("olmoe") if arch == "olmoe" else tiny("qwen2_moe")


def train_imported_three_steps(ckpt: Path, tmp_path: Path) -> None:
    """``moetrain-train`` from an imported checkpoint's ``config.yaml`` (``--config-path``), 3 steps on a small
    corpus of files, into ``tmp_path / "run"`` (the continued-pretraining path of docs/deepseek.md)."""
    corpus = ",".join(write_corpus(tmp_path / "corpus"))
    train_cli(
        ["--config-path", str(ckpt.parent), "--config-name", "config", "run_dir=run", "data.source=files",
         f"data.paths=[{corpus}]", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.25",
         "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "trainer.eval_every=0", "trainer.log_every=1",
         "trainer.progress=false", "logger.wandb.mode=disabled", "trainer.max_steps=3"],
        tmp_path,
    )  # fmt: skip


@pytest.mark.e2e
@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2", "olmoe", "qwen2_moe"])
def test_import_train_three_steps_export_loads_in_transformers_with_the_trained_logits(tmp_path, arch):
    """transformers folder -> import -> 3 training steps -> export: transformers loads it with the trained
    model's logits (catches a trained tensor, or DeepSeek-V3's moved loss-free bias, left behind); Qwen2-MoE
    with q/k/v biases (they train too)."""
    needs("transformers", "safetensors", "tokenizers")
    from moetrain.hf.tokenizer import save_tokenizer

    source_model(arch).save_pretrained(str(tmp_path / "hf"))
    save_tokenizer("byte", tmp_path / "hf")
    ckpt = import_hf(tmp_path / "hf", tmp_path / "imported", seq_len=32)
    train_imported_three_steps(ckpt, tmp_path)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2, 3]
    written = export(tmp_path / "run", tmp_path / "out")
    assert written["arch"] == arch and "hf_routing" not in written
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(Path(written["hf"])), dtype=torch.float32).eval()
    model, _, meta = load_checkpoint_model(tmp_path / "run")
    imported = load_checkpoint_model(tmp_path / "imported" / "step_000000")[0]
    assert meta["step"] == 3
    moved = [n for n, t in model.state_dict().items() if not torch.equal(t, imported.state_dict()[n])]
    assert "blocks.1.attn.wo.weight" in moved
    if arch == "deepseek_v3":
        assert "blocks.1.ffn.router.expert_bias" in moved
    if arch == "qwen2_moe":
        assert "blocks.1.attn.wq.bias" in moved
    tokens = torch.randint(0, 256, (2, 32))
    diff = (logits_of(hf, tokens) - logits_of(model, tokens)).abs().max().item()
    assert diff < 1e-5, f"exported logits differ by {diff}"
