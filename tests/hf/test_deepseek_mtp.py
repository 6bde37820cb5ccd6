"""DeepSeek-V3's multi-token prediction layer (``model.layers.{n_layers}.*``: enorm, hnorm, eh_proj,
shared_head, a decoder layer) in and out of transformers folders (moetrain.hf.deepseek_mtp): import with MTP,
export with MTP equals the source tensor for tensor, and the imported MTP loss equals a transcription from
the source's tensors under their checkpoint names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetrain.hf.lazy import lazy_tensors
from moetrain.hf.mapping import ExportError
from moetrain.model.mtp import mtp_loss
from moetrain.tools.export import export, export_hf, import_hf, load_checkpoint_model
from tests.hf.test_deepseek import VOCAB, tiny_deepseek, train_imported_three_steps
from tests.hf.test_transformers_interop import needs

pytestmark = pytest.mark.parity

H = "model.layers.3."  # tiny_deepseek has 3 layers: MTP depth 1 is layer 3


def source_with_mtp(folder):  # type: ignore[no-untyped-def]
    """A tiny random DeepSeek-V3 folder with one MTP layer as DeepSeek-V3's checkpoints store it (per-expert
    linears, copies of the embedding and head); returns the transformers model, the MTP decoder layer and the
    MTP tensors under their checkpoint names."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    hf = tiny_deepseek(3)
    torch.manual_seed(1)
    layer = DeepseekV3DecoderLayer(hf.config, layer_idx=3).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
        layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    D = hf.config.hidden_size
    mtp = {H + k: v.detach().clone() for k, v in layer.state_dict().items()}
    for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        mtp[H + name] = 1 + 0.1 * torch.randn(D)
    mtp[H + "eh_proj.weight"] = 0.1 * torch.randn(D, 2 * D)
    mtp[H + "embed_tokens.weight"] = hf.model.embed_tokens.weight.detach().clone()
    mtp[H + "shared_head.head.weight"] = hf.lm_head.weight.detach().clone()
    hf.config.num_nextn_predict_layers = 1
    hf.save_pretrained(str(folder), state_dict={**hf.state_dict(), **mtp})
    return hf, layer, mtp


def test_import_with_mtp_then_export_with_mtp_equals_the_source_tensor_for_tensor(tmp_path):
    """Catches an MTP tensor dropped or renamed either way, eh_proj's halves not swapped back, the embedding
    and head copies not written, num_nextn_predict_layers not set, or the MTP block's loss-free bias lost."""
    needs("transformers", "safetensors")
    source_with_mtp(tmp_path / "hf")
    model, cfg, _ = load_checkpoint_model(import_hf(tmp_path / "hf", tmp_path / "imported", seq_len=64))
    assert cfg.model.mtp_depth == 1
    export_hf(model, cfg, tmp_path / "back", with_mtp=True)
    src, back = lazy_tensors(tmp_path / "hf"), lazy_tensors(tmp_path / "back")
    assert src is not None and back is not None
    assert any(k.startswith(H + "mlp.experts.0.") for k in src)  # the published per-expert layout
    assert set(src) == set(back)
    for name in src:
        assert torch.equal(src[name], back[name]), name
    import transformers

    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "back")).num_nextn_predict_layers == 1


def test_folder_without_mtp_layers_imports_with_mtp_off(tmp_path):
    """Catches an import that trusts num_nextn_predict_layers (1 by default) when the folder has no layer 3."""
    needs("transformers", "safetensors")
    tiny_deepseek(3).save_pretrained(str(tmp_path / "hf"))
    _, cfg, _ = load_checkpoint_model(import_hf(tmp_path / "hf", tmp_path / "imported", seq_len=64))
    assert cfg.model.mtp_depth == 0


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_imported_mtp_loss_equals_a_transcription_from_the_source_tensors(tmp_path):
    """DeepSeek-V3 eq. 21-24 on the checkpoint's own tensors: h^0 from transformers' model (its final norm's
    input), eh_proj over [enorm(Emb(t_{i+1})); hnorm(h_i)] (vLLM's order), transformers' decoder layer, the
    shared head. Catches the halves of eh_proj mapped unswapped, enorm and hnorm exchanged, or the MTP block's
    weights (attention, experts, bias) mapped wrongly."""
    needs("transformers", "safetensors")
    hf, layer, mtp = source_with_mtp(tmp_path / "hf")
    model, _, _ = load_checkpoint_model(import_hf(tmp_path / "hf", tmp_path / "imported", seq_len=64))
    tokens = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(3))
    inputs, B, T = tokens[:, :-1], tokens.shape[0], tokens.shape[1] - 1
    model.train()
    with torch.no_grad():
        out = model(inputs)
        got = mtp_loss(out.mtp_logits, tokens[:, 1:], out.mtp_lambda)[1][0]

        captured = {}
        hook = hf.model.norm.register_forward_pre_hook(lambda mod, args: captured.setdefault("h", args[0]))
        hf(inputs)
        hook.remove()
        eps = hf.config.rms_norm_eps
        e = rms(mtp[H + "embed_tokens.weight"][inputs[:, 1:]], mtp[H + "enorm.weight"], eps)
        h = rms(captured["h"][:, : T - 1], mtp[H + "hnorm.weight"], eps)
        x = torch.cat([e, h], -1) @ mtp[H + "eh_proj.weight"].T
        pos = torch.arange(T - 1)[None]
        y = layer(x, attention_mask=None, position_ids=pos, position_embeddings=hf.model.rotary_emb(x, pos))
        y = y[0] if isinstance(y, tuple) else y
        logits = rms(y, mtp[H + "shared_head.norm.weight"], eps) @ mtp[H + "shared_head.head.weight"].T
        want = F.cross_entropy(logits.flatten(0, 1), tokens[:, 2:].flatten(), reduction="sum") / (B * T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("copy", r"^model\.layers\.3\.embed_tokens\.weight: differs from model\.embed_tokens\.weight"),
        ("missing", r"^model\.layers\.3\.self_attn\.o_proj\.weight: missing; the multi-token prediction layer"),
        ("extra", r"^model\.layers\.3\.mystery\.weight: not a tensor of DeepSeek-V3's multi-token prediction"),
    ],
)
def test_mtp_that_does_not_map_is_one_line(tmp_path, damage, message):
    """An MTP layer whose embedding copy differs from the main embedding (moetrain shares it), that lacks a
    tensor, or that holds one the map does not know (it would be dropped silently), and --with-mtp for a
    model without MTP modules, are refused naming the key before anything is written."""
    needs("transformers", "safetensors")
    hf = tiny_deepseek(3)
    _, _, mtp = source_with_mtp(tmp_path / "hf")
    if damage == "copy":
        mtp[H + "embed_tokens.weight"] = mtp[H + "embed_tokens.weight"] + 1.0
    elif damage == "missing":
        del mtp[H + "self_attn.o_proj.weight"]
    else:
        mtp[H + "mystery.weight"] = torch.ones(3)
    hf.config.num_nextn_predict_layers = 1
    hf.save_pretrained(str(tmp_path / "bad"), state_dict={**hf.state_dict(), **mtp})
    with pytest.raises(ExportError, match=message) as e:
        import_hf(tmp_path / "bad", tmp_path / "imported_bad", seq_len=64)
    assert "\n" not in str(e.value) and not (tmp_path / "imported_bad").exists()


def test_with_mtp_that_cannot_be_written_is_refused_before_anything_is_written(tmp_path):
    """--with-mtp for a model without MTP modules, or with --hf none (no hf/ folder to hold them): one line
    naming why, and no OUT_DIR (catches a refusal that comes after model.safetensors is written)."""
    needs("transformers", "safetensors")
    tiny_deepseek(3).save_pretrained(str(tmp_path / "plain"))
    plain = import_hf(tmp_path / "plain", tmp_path / "imported", seq_len=64)
    with pytest.raises(ExportError, match=r"^model\.mtp_depth=0: --with-mtp"):
        export(plain, tmp_path / "out", with_mtp=True)
    source_with_mtp(tmp_path / "hf")
    with_mtp = import_hf(tmp_path / "hf", tmp_path / "imported_mtp", seq_len=64)
    with pytest.raises(ExportError, match=r"^--with-mtp writes the MTP layers into hf/, which --hf none"):
        export(with_mtp, tmp_path / "out", hf="none", with_mtp=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_import_with_mtp_train_three_steps_export_with_mtp_holds_the_trained_mtp_layer(tmp_path):
    """The continued-pretraining path with the MTP layer: the imported config trains it (model.mtp_depth=1,
    train/mtp_loss_1 logged), and moetrain-export --with-mtp writes the trained tensors (catches MTP left out
    of the imported config.yaml, or an export that writes the source's MTP layer back)."""
    needs("transformers", "safetensors", "tokenizers")
    import json

    from moetrain.hf.deepseek_mtp import mtp_to_hf_state
    from moetrain.hf.tokenizer import save_tokenizer
    from moetrain.tools.export import main as export_main

    _, _, source = source_with_mtp(tmp_path / "hf")
    save_tokenizer("byte", tmp_path / "hf")
    ckpt = import_hf(tmp_path / "hf", tmp_path / "imported", seq_len=32)
    train_imported_three_steps(ckpt, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/mtp_loss_1" in r] == [1, 2, 3]
    assert export_main([str(tmp_path / "run"), str(tmp_path / "out"), "--with-mtp"]) == 0
    model, _, _ = load_checkpoint_model(tmp_path / "run")
    trained = mtp_to_hf_state(model)
    written = lazy_tensors(tmp_path / "out" / "hf")
    assert written is not None
    assert not torch.equal(trained[H + "self_attn.o_proj.weight"], source[H + "self_attn.o_proj.weight"])
    for name in (H + "self_attn.o_proj.weight", H + "eh_proj.weight", H + "mlp.gate.e_score_correction_bias"):
        assert torch.equal(written[name], trained[name]), name
