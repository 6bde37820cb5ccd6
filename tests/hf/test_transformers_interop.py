"""transformers interop: Qwen2-MoE (gated shared expert) and Qwen3-MoE both ways, the import -> train -> resume ->
export round trip through the CLI, tokenizer files, and DeepSeek-V2/V3 routing reproduced by transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moetrain.config import TrainConfig
from moetrain.model.transformer import build_model
from moetrain.tools.export import export, export_hf, import_hf, load_checkpoint_model
from moetrain.train.checkpoint import CheckpointError, check_arch
from tests.conftest import tiny_train_config, write_corpus

REPO = Path(__file__).resolve().parents[2]
ROPE_THETA, NORM_EPS = 500.0, 1e-3
"""The tiny transformers models' RoPE base and RMSNorm epsilon (non-default, so the mappings must carry them)."""


def needs(*modules: str) -> None:
    """Skip only this test when an optional package is missing (CI installs every extra)."""
    for name in modules:
        pytest.importorskip(name)


def randomize(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Every parameter redrawn (non-zero gates, non-unit norms), seeded."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()


def tiny_hf(arch: str, tie: bool = False):  # type: ignore[no-untyped-def]
    """A tiny random transformers Qwen2-MoE / Qwen3-MoE (GQA, dense layer 0)."""
    import transformers

    common = dict(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[0],
        max_position_embeddings=32,
        tie_word_embeddings=tie,
        norm_topk_prob=True,
        # not the library defaults (10000, 1e-6): a mapping that drops either changes the logits
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        rms_norm_eps=NORM_EPS,
    )
    if arch == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(**common, shared_expert_intermediate_size=16, qkv_bias=False)
        return randomize(transformers.Qwen2MoeForCausalLM(cfg))
    return randomize(transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**common)))


def logits_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.unit
def test_new_model_options_are_off_by_default_and_add_no_parameters():
    """Default runs build exactly the tensors they built before (no gate, no q/k norms)."""
    cfg = TrainConfig()
    assert cfg.moe.shared_expert_gate is False and cfg.model.qk_norm is False
    model = build_model(cfg.model, cfg.moe, 320, 64, seed=0)
    assert not any("shared_gate" in k or "q_norm" in k or "k_norm" in k for k in model.state_dict())


@pytest.mark.unit
def test_shared_expert_gate_scales_the_shared_output_by_a_sigmoid():
    cfg = TrainConfig()
    cfg.moe.shared_expert_gate = True
    model = build_model(cfg.model, cfg.moe, 320, 16, seed=0)
    layer = model.blocks[1].ffn
    x = torch.randn(5, cfg.model.dim)
    ref = torch.sigmoid(x @ layer.shared_gate.weight.T) * layer.shared(x)
    torch.testing.assert_close(layer._shared_work(x).run(), ref)


@pytest.mark.parity
@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_qwen_moe_imports_and_exports_with_equal_logits(tmp_path, arch):
    """transformers -> moetrain -> transformers: logits equal both ways (Qwen2-MoE's gate non-zero), with a
    non-default ``rope_theta`` and ``rms_norm_eps`` (catches an export or import writing fixed ones)."""
    needs("transformers", "safetensors")
    hf = tiny_hf(arch)
    hf.save_pretrained(str(tmp_path / "hf"))
    ckpt = import_hf(tmp_path / "hf", tmp_path / "imported", seq_len=32)
    model, cfg, _ = load_checkpoint_model(ckpt)
    assert cfg.model.qk_norm is (arch == "qwen3_moe") and cfg.moe.shared_expert_gate is (arch == "qwen2_moe")
    assert (cfg.model.rope_theta, cfg.model.norm_eps) == (ROPE_THETA, NORM_EPS)
    tokens = torch.randint(0, 320, (2, 32))
    ref = logits_of(hf, tokens)
    torch.testing.assert_close(logits_of(model, tokens), ref, rtol=1e-4, atol=1e-5)

    assert export_hf(model, cfg, tmp_path / "back") == arch
    import transformers

    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32).eval()
    assert again.config.model_type == arch
    assert again.config.rope_parameters["rope_theta"] == ROPE_THETA and again.config.rms_norm_eps == NORM_EPS
    torch.testing.assert_close(logits_of(again, tokens), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.unit
def test_shared_hidden_size_none_and_its_value_are_the_same_architecture(tmp_path):
    """``None`` means ``expert_hidden_size``: a checkpoint written either way fits a run written the other way."""
    from types import SimpleNamespace

    from moetrain.train.checkpoint import arch_of

    model = SimpleNamespace(vocab_size=320, num_groups=1)  # what arch_of reads of a built model
    cfg = tiny_train_config(tmp_path)
    explicit = tiny_train_config(tmp_path)
    explicit.moe.shared_hidden_size = explicit.moe.expert_hidden_size
    for saved, run in ((cfg, explicit), (explicit, cfg)):
        check_arch(tmp_path, {"arch": arch_of(saved, model)}, arch_of(run, model))
    old = {"arch": {**arch_of(cfg, model), "moe.shared_hidden_size": None}}  # as older checkpoints wrote it
    check_arch(tmp_path, old, arch_of(explicit, model))
    explicit.moe.shared_hidden_size = 32
    with pytest.raises(CheckpointError, match="shared_hidden_size"):
        check_arch(tmp_path, old, arch_of(explicit, model))


@pytest.mark.unit
def test_byte_tokenizer_files_encode_to_moetrain_ids(tmp_path):
    needs("transformers", "tokenizers")
    from transformers import AutoTokenizer

    from moetrain.data.tokenizer import ByteTokenizer
    from moetrain.hf.tokenizer import save_tokenizer

    ids = save_tokenizer("byte", tmp_path)
    assert ids == {"bos_token_id": 257, "eos_token_id": 256, "pad_token_id": 258}
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "def f(x):\n    return 'héllo ✓'  # \t"
    assert tok.encode(text, add_special_tokens=False) == ByteTokenizer().encode(text).tolist()
    assert tok.decode(ByteTokenizer().encode(text).tolist()) == text
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (256, 257, 258)


def train_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m moetrain.train ARGS`` (= moetrain-train) in ``cwd``; asserts it succeeded."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "MOETRAIN_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "moetrain.train", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.e2e
def test_import_train_resume_export_round_trip_through_the_cli(tmp_path):
    """Qwen2-MoE folder with tokenizer -> import -> train from its config.yaml (--config-path) -> resume ->
    export: transformers loads the export with the trained model's logits, the tokenizer and its special ids."""
    needs("transformers", "safetensors", "tokenizers")
    from moetrain.hf.tokenizer import save_tokenizer

    tiny_hf("qwen2_moe").save_pretrained(str(tmp_path / "hf"))
    save_tokenizer("byte", tmp_path / "hf")
    ckpt = import_hf(tmp_path / "hf", tmp_path / "imported", seq_len=32)
    corpus = ",".join(write_corpus(tmp_path / "corpus"))
    common = [
        "--config-path",
        str(ckpt.parent),
        "--config-name",
        "config",
        "run_dir=run",
        "data.source=files",
        f"data.paths=[{corpus}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.val_fraction=0.25",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=4",
        "trainer.eval_every=0",
        "trainer.log_every=1",
        "trainer.progress=false",
        "logger.wandb.mode=disabled",
        "checkpoint.every=2",
    ]
    train_cli([*common, "trainer.max_steps=2"], tmp_path)
    train_cli([*common, "trainer.max_steps=3", "trainer.resume=auto"], tmp_path)  # continues at step 2
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2, 3]

    written = export(tmp_path / "run", tmp_path / "out")
    assert written["arch"] == "qwen2_moe"
    import transformers

    hf_dir = tmp_path / "out" / "hf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (257, 256, 258)
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    tokens = torch.tensor([tok.encode("def g(y):\n    return y * 2\n", add_special_tokens=False)])
    model, _, meta = load_checkpoint_model(tmp_path / "run")
    assert meta["step"] == 3
    torch.testing.assert_close(logits_of(hf, tokens), logits_of(model, tokens), rtol=1e-4, atol=1e-5)


def deepseek_model(tmp_path: Path, version: int):  # type: ignore[no-untyped-def]
    """A tiny model routed as DeepSeek-V2 (softmax, group max) or V3 (sigmoid, top-2 sums, bias, scaling)."""
    cfg = tiny_train_config(tmp_path)
    cfg.moe.num_experts, cfg.moe.top_k = 8, 4
    r = cfg.moe.router
    r.num_groups, r.topk_groups = 4, 2
    if version == 3:
        r.score_fn, r.group_score, r.norm_topk_prob, r.scaling_factor, r.bias_update_rate = (
            "sigmoid",
            "topk_sum",
            True,
            2.5,
            1e-3,
        )
    else:
        r.scaling_factor = 1.5
    model = build_model(cfg.model, cfg.moe, 320, 32, seed=0).eval()
    with torch.no_grad():
        for layer in model.moe_layers().values():
            layer.router.weight.normal_(0, 1.0)
            layer.router.expert_bias.copy_(torch.randn(8) * 0.3)
    return model, cfg


@pytest.mark.parity
@pytest.mark.parametrize("version", [2, 3])
def test_deepseek_routing_config_makes_transformers_route_the_same(tmp_path, version):
    needs("transformers", "safetensors")
    import transformers
    from safetensors.torch import load_file

    from moetrain.hf.routing import export_routing

    model, cfg = deepseek_model(tmp_path, version)
    if version == 2:
        for layer in model.moe_layers().values():
            layer.router.expert_bias.zero_()
    arch = export_routing(model, cfg, tmp_path / "routing")
    assert arch == f"deepseek_v{version}"
    hf_cfg = transformers.AutoConfig.from_pretrained(str(tmp_path / "routing"))
    module = transformers.models.deepseek_v3 if version == 3 else transformers.models.deepseek_v2
    router_cls = getattr(
        module.modeling_deepseek_v3 if version == 3 else module.modeling_deepseek_v2, f"DeepseekV{version}TopkRouter"
    )
    tensors = load_file(str(tmp_path / "routing" / "router.safetensors"))
    x = torch.randn(64, cfg.model.dim)
    for i, layer in model.moe_layers().items():
        hf_router = router_cls(hf_cfg)
        hf_router.load_state_dict({k.split(".gate.")[1]: v for k, v in tensors.items() if f".{i}.mlp." in k})
        _, w_hf, idx_hf = hf_router(x)
        r = layer.router(x)
        order_hf, order = idx_hf.argsort(-1), r.expert_idx_TK.argsort(-1)
        assert torch.equal(idx_hf.gather(1, order_hf), r.expert_idx_TK.gather(1, order))
        torch.testing.assert_close(w_hf.gather(1, order_hf), r.weight_TK.gather(1, order))


@pytest.mark.unit
def test_deepseek_routing_that_transformers_cannot_reproduce_is_refused(tmp_path):
    from moetrain.hf.mapping import ExportError
    from moetrain.hf.routing import deepseek_routing

    _, cfg = deepseek_model(tmp_path, 3)
    cfg.moe.top_k = 6  # K / M = 3: transformers scores a group by its top 2
    with pytest.raises(ExportError, match="group_score"):
        deepseek_routing(cfg)
    _, cfg = deepseek_model(tmp_path, 2)
    cfg.moe.router.norm_topk_prob = True
    with pytest.raises(ExportError, match="norm_topk_prob"):
        deepseek_routing(cfg)
