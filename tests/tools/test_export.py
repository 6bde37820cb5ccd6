"""Export: consolidated safetensors, transformers Mixtral / Qwen2-MoE with equal logits, import back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moetrain.config import TrainConfig
from moetrain.tools.export import (
    ExportError,
    export,
    hf_architecture,
    import_hf,
    load_checkpoint_model,
    main,
    permute_heads,
)
from moetrain.train.trainer import Trainer
from tests.conftest import tiny_train_config
from tests.helpers.exported import load_safetensors_model


def needs(*modules: str) -> None:
    """Skip this test (only this one) when an optional package it uses is missing; CI installs every extra,
    so there such a skip fails the run (tests/conftest.py)."""
    for name in modules:
        pytest.importorskip(name)


def mixtral_config(tmp_path: Path, tie: bool = False) -> TrainConfig:
    cfg = tiny_train_config(tmp_path, max_steps=2)
    cfg.model.first_k_dense = 0
    cfg.model.tie_embeddings = tie
    cfg.moe.num_shared_experts = 0
    cfg.moe.router.norm_topk_prob = True
    cfg.checkpoint.every = 0
    cfg.optim.lr = 1e-2  # move the weights away from their init
    cfg.model.rope_theta, cfg.model.norm_eps = 500.0, 1e-3  # not the defaults: the export must carry them
    return cfg


def trained_checkpoint(cfg: TrainConfig, run_dir: Path) -> Path:
    Trainer(cfg, run_dir).fit()
    return run_dir / "checkpoints" / "step_000002"


def moetrain_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits


@pytest.mark.unit
def test_rope_permutation_maps_interleaved_pairs_to_halves():
    """moetrain's interleaved RoPE on q equals rotate_half RoPE on the permuted q (per head)."""
    from moetrain.model.layers import apply_rope, rope_tables

    head_dim, n_heads, S = 8, 2, 5
    cos, sin = rope_tables(head_dim, S, 10000.0)
    w = torch.randn(n_heads * head_dim, 16)
    x = torch.randn(1, S, 16)
    q = (x @ w.T).view(1, S, n_heads, head_dim).transpose(1, 2)
    ref = apply_rope(q, cos, sin)
    qp = (x @ permute_heads(w, n_heads).T).view(1, S, n_heads, head_dim).transpose(1, 2)
    c, s_ = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    half = head_dim // 2
    rotated = torch.cat([-qp[..., half:], qp[..., :half]], -1)
    hf = qp * c + rotated * s_
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    torch.testing.assert_close(hf, ref[..., perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(permute_heads(permute_heads(w, n_heads), n_heads, inverse=True), w)


@pytest.mark.parity
@pytest.mark.parametrize(("tie", "strategy"), [(False, "topk"), (True, "topk_softmax")])
def test_mixtral_export_gives_the_same_logits_in_transformers(tmp_path, tie, strategy):
    needs("transformers", "safetensors")
    cfg = mixtral_config(tmp_path, tie)
    cfg.moe.router.strategy = strategy  # configs/moe/mixtral.yaml uses topk_softmax
    ckpt = trained_checkpoint(cfg, tmp_path / "run")
    assert main([str(tmp_path / "run"), str(tmp_path / "out")]) == 0  # a run dir: its newest checkpoint

    model, _, meta = load_checkpoint_model(ckpt)
    assert meta["step"] == 2
    tokens = torch.randint(0, model.vocab_size, (2, cfg.data.seq_len))
    ref = moetrain_logits(model, tokens)

    hf_cfg = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert hf_cfg["model_type"] == "mixtral" and hf_cfg["tie_word_embeddings"] is tie
    torch.testing.assert_close(hf_logits(tmp_path / "out" / "hf", tokens), ref, rtol=1e-4, atol=1e-5)

    again, _ = load_safetensors_model(tmp_path / "out")
    assert torch.equal(moetrain_logits(again, tokens), ref)
    moe_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert moe_cfg["moetrain"]["moe"]["num_experts"] == 4


@pytest.mark.parity
def test_qwen2_moe_export_with_shared_expert_and_dense_layer(tmp_path):
    needs("transformers", "safetensors")
    cfg = tiny_train_config(tmp_path, max_steps=2)  # first layer dense, one shared expert, no renormalisation
    cfg.checkpoint.every = 0
    cfg.optim.lr = 1e-2
    assert cfg.model.first_k_dense == 1 and cfg.moe.num_shared_experts == 1
    ckpt = trained_checkpoint(cfg, tmp_path / "run")
    written = export(ckpt, tmp_path / "out")
    assert written["arch"] == "qwen2_moe"
    model, _, _ = load_checkpoint_model(ckpt)
    tokens = torch.randint(0, model.vocab_size, (2, cfg.data.seq_len))
    torch.testing.assert_close(
        hf_logits(tmp_path / "out" / "hf", tokens), moetrain_logits(model, tokens), rtol=1e-4, atol=1e-5
    )


@pytest.mark.unit
def test_unmappable_models_are_refused_with_one_line(tmp_path, capsys):
    cfg = mixtral_config(tmp_path)
    cfg.moe.router.score_fn = "sigmoid"
    with pytest.raises(ExportError, match=r"moe.router.score_fn='sigmoid'"):
        hf_architecture(cfg)
    cfg = mixtral_config(tmp_path)
    cfg.moe.router.scaling_factor = 2.5
    with pytest.raises(ExportError, match=r"moe\.router\.scaling_factor"):
        hf_architecture(cfg)
    cfg = mixtral_config(tmp_path)
    cfg.moe.router.norm_topk_prob = False
    with pytest.raises(ExportError, match="norm_topk_prob"):
        hf_architecture(cfg)
    cfg = mixtral_config(tmp_path)
    cfg.moe.router.strategy = "hash"
    with pytest.raises(ExportError, match="strategy='hash'"):
        hf_architecture(cfg)
    assert main([str(tmp_path / "no_such_ckpt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such checkpoint" in err


@pytest.mark.parity
def test_import_transformers_mixtral_and_continue_training(tmp_path):
    """A transformers Mixtral (GQA) folder -> a moetrain checkpoint with equal logits that a run resumes from."""
    needs("transformers", "safetensors")
    import transformers

    hf_cfg = transformers.MixtralConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    hf.save_pretrained(str(tmp_path / "hf"))
    ckpt = import_hf(tmp_path / "hf", tmp_path / "imported", seq_len=32)
    model, cfg, _ = load_checkpoint_model(ckpt)
    tokens = torch.randint(0, 320, (2, 32))
    with torch.no_grad():
        ref = hf(tokens).logits
    torch.testing.assert_close(moetrain_logits(model, tokens), ref, rtol=1e-4, atol=1e-5)
    assert hf_architecture(cfg, model) == "mixtral"

    # Continue pretraining from the imported weights.
    run = tiny_train_config(tmp_path, max_steps=1)
    run.model, run.moe = cfg.model, cfg.moe
    run.trainer.resume = str(ckpt)
    run.checkpoint.enabled = False
    trainer = Trainer(run, tmp_path / "cont")
    trainer.checkpointer.resume()
    assert trainer.step == 0
    torch.testing.assert_close(moetrain_logits(trainer.model.eval(), tokens), ref, rtol=1e-4, atol=1e-5)
