"""moetrain-export --from-hf reads a sharded safetensors folder (index file) tensor by tensor, without building
a transformers model, with the source's logits; a damaged index is one line naming the file."""

from __future__ import annotations

import json

import pytest
import torch

from moetrain.hf.mapping import ExportError
from moetrain.tools.export import import_hf, load_checkpoint_model
from tests.hf.test_deepseek import tiny_deepseek
from tests.hf.test_transformers_interop import logits_of, needs

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
