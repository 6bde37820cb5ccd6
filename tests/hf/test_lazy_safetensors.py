"""moetrain-export --from-hf reads a sharded safetensors folder (index file) tensor by tensor, without building
a transformers model, with the source's logits; a damaged index is one line naming the file."""

from __future__ import annotations

import json

import pytest
import torch

from moetrain.hf.lazy import lazy_tensors
from moetrain.hf.mapping import ExportError
from moetrain.tools.export import export_hf, import_hf, load_checkpoint_model
from tests.hf.test_deepseek import tiny_deepseek
from tests.hf.test_transformers_interop import logits_of, needs, randomize

pytestmark = pytest.mark.parity


def _no_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("from_pretrained was called: the import built a whole transformers model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_sharded_folder_imports_lazily_with_the_sources_logits(tmp_path, monkeypatch):
    """Catches an import that loads the folder as a transformers model (a second copy of every weight) or
    misses the shards an index names."""
    needs("transformers", "safetensors")
    hf = tiny_deepseek(3)
    hf.save_pretrained(str(tmp_path / "hf"), max_shard_size="100KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    _no_from_pretrained(monkeypatch)
    model, _, _ = load_checkpoint_model(import_hf(tmp_path / "hf", tmp_path / "imported", seq_len=64))
    tokens = torch.randint(0, 320, (2, 40))
    diff = (logits_of(model, tokens) - logits_of(hf, tokens)).abs().max().item()
    assert diff < 1e-5, f"imported logits differ by {diff}"


def tiny_mixtral():  # type: ignore[no-untyped-def]
    """A tiny random transformers Mixtral (GQA, every layer MoE)."""
    import transformers

    cfg = transformers.MixtralConfig(
        vocab_size=320, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        rms_norm_eps=1e-3, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )  # fmt: skip
    return randomize(transformers.MixtralForCausalLM(cfg))


def test_sharded_mixtral_imports_lazily_from_its_per_expert_layout_and_exports_back(tmp_path, monkeypatch):
    """transformers 5 holds Mixtral's experts fused (mlp.experts.gate_up_proj) and saves the published
    per-expert layout (block_sparse_moe.experts.{e}.w1 / w3 / w2, block_sparse_moe.gate). Catches a lazy reader
    that does not recognise that layout (the import falls back to from_pretrained: refused here), w1 / w3
    (gate / up) or w2 mapped wrongly (the logits differ), or an export that changes a tensor."""
    needs("transformers", "safetensors")
    hf = tiny_mixtral()
    hf.save_pretrained(str(tmp_path / "hf"), max_shard_size="20KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2 and "model.layers.1.block_sparse_moe.experts.3.w2.weight" in index
    _no_from_pretrained(monkeypatch)
    model, cfg, _ = load_checkpoint_model(import_hf(tmp_path / "hf", tmp_path / "imported", seq_len=64))
    tokens = torch.randint(0, 320, (2, 40))
    diff = (logits_of(model, tokens) - logits_of(hf, tokens)).abs().max().item()
    assert diff < 1e-5, f"imported logits differ by {diff}"
    assert export_hf(model, cfg, tmp_path / "back") == "mixtral"
    src, back = lazy_tensors(tmp_path / "hf"), lazy_tensors(tmp_path / "back")
    assert src is not None and back is not None and set(src) == set(back)
    for name in src:
        assert torch.equal(src[name], back[name]), name


@pytest.mark.parametrize("damage", ["garbled", "missing_shard"])
def test_damaged_index_is_one_line_naming_the_file(tmp_path, damage):
    needs("transformers", "safetensors")
    tiny_deepseek(2).save_pretrained(str(tmp_path / "hf"), max_shard_size="100KB")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    if damage == "garbled":
        index.write_text("{not json")
        message = r"model\.safetensors\.index\.json: not a safetensors index"
    else:
        shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
        shard.unlink()
        message = rf"names the shard {shard.name}, which is not in"
    with pytest.raises(ExportError, match=message) as e:
        import_hf(tmp_path / "hf", tmp_path / "imported")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "imported").exists()
