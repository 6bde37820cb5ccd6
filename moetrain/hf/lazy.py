"""A ``transformers`` folder's safetensors read tensor by tensor (``moetrain-export --from-hf``).

One ``model.safetensors``, or the shards that ``model.safetensors.index.json``'s ``weight_map`` names: a
read-only mapping from tensor name to tensor that reads a tensor from its shard (memory-mapped by
``safetensors``) only when the name mapping asks for it, in fp32. The import maps every tensor once into
moetrain's names and assigns them to a model built on the meta device, so the whole model is in memory once,
not as a ``transformers`` model and a moetrain model side by side. Used when the folder's tensors are exactly
those (names and shapes) of the ``transformers`` model its ``config.json`` builds (:func:`matches_model`);
experts may be fused or one tensor per expert (``gate_proj`` / ``up_proj`` / ``down_proj``, or Mixtral's
``block_sparse_moe.experts.{e}.w1`` / ``w3`` / ``w2``: the published layouts, which ``save_pretrained`` writes).
Other folders (damaged ones ``from_pretrained`` reports on) go through ``from_pretrained``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from moetrain.hf.mapping import ExportError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class LazyTensors(Mapping[str, torch.Tensor]):
    """Tensor name -> fp32 tensor, read from its safetensors file on access (module docstring)."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self._handles: dict[Path, Any] = {}

    def _open(self, key: str) -> Any:
        from safetensors import safe_open

        path = self.files[key]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._open(key).get_tensor(key)
        return t.float() if t.is_floating_point() else t

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, read from the file's header only."""
        return tuple(self._open(key).get_slice(key).get_shape())

    def __contains__(self, key: object) -> bool:
        return key in self.files  # from the index or header: no tensor read

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def lazy_tensors(folder: Path) -> LazyTensors | None:
    """The folder's tensors by name (sharded with an index, or one file); ``None`` without safetensors.
    :class:`ExportError` naming the file for an index that is not JSON or names a shard that is not there."""
    from safetensors import safe_open

    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ExportError(f"{index}: not a safetensors index (a JSON object with a weight_map): {e}") from None
        files = {name: folder / shard for name, shard in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise ExportError(f"{index}: names the shard {path.name}, which is not in {folder}")
        return LazyTensors(files)
    if (folder / SINGLE).is_file():
        with safe_open(str(folder / SINGLE), framework="pt") as f:
            return LazyTensors(dict.fromkeys(f.keys(), folder / SINGLE))
    return None


PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
"""One expert's linear in the per-expert layout ``save_pretrained`` writes (transformers fuses them on load):
``gate_proj`` / ``up_proj`` / ``down_proj``, or Mixtral's ``w1`` / ``w3`` / ``w2`` under ``block_sparse_moe``."""
ROLE = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


def _loaded_name(key: str) -> str:
    """The name a folder's tensor loads under: Mixtral's ``block_sparse_moe`` is transformers 5's ``mlp``."""
    return key.replace(".block_sparse_moe.", ".mlp.")


def _fused_shapes(tensors: LazyTensors) -> dict[str, tuple[int, ...]]:
    """The folder's tensor shapes under the names they load as, per-expert linears as the fused ``gate_up_proj``
    ``[N, 2F, D]`` and ``down_proj`` ``[N, D, F]`` (an expert missing, of another shape or named in another
    style than expert 0: a shape that matches none)."""
    shapes: dict[str, tuple[int, ...]] = {}
    experts: dict[str, dict[int, dict[str, tuple[int, ...]]]] = {}
    for key in tensors:
        m = PER_EXPERT.match(key)
        if m is None:
            shapes[_loaded_name(key)] = tensors.shape(key)
        else:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = tensors.shape(key)
    for prefix, by_index in experts.items():
        n, first = len(by_index), by_index.get(0, {})
        whole = sorted(by_index) == list(range(n)) and all(e == first and len(e) == 3 for e in by_index.values())
        roles = {ROLE[name]: shape for name, shape in first.items()}
        whole = whole and len(roles) == 3
        gate, down = roles.get("gate", (0, 0)), roles.get("down", (0, 0))
        fused = _loaded_name(prefix)
        shapes[fused + ".gate_up_proj"] = (n, 2 * gate[0], gate[1]) if whole else (-1,)
        shapes[fused + ".down_proj"] = (n, down[0], down[1]) if whole else (-1,)
    return shapes


LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def matches_model(tensors: LazyTensors, skeleton: torch.nn.Module) -> bool:
    """Whether the folder holds exactly the tensors (names and shapes) of ``skeleton`` (a meta-device
    ``transformers`` model of its config; experts fused or per expert; a tied LM head may be absent), DeepSeek-V3's
    multi-token prediction layers (``model.layers.{i}`` from ``num_hidden_layers`` on, which transformers
    ignores and :mod:`moetrain.hf.deepseek_mtp` maps) aside."""
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if bool(getattr(skeleton.config, "tie_word_embeddings", False)) and "lm_head.weight" not in tensors:
        want.pop("lm_head.weight", None)
    have = _fused_shapes(tensors)
    if skeleton.config.model_type == "deepseek_v3":
        n = skeleton.config.num_hidden_layers
        have = {k: s for k, s in have.items() if not ((m := LAYER.match(k)) and int(m.group(1)) >= n)}
    return have == want


def read_lazily(hf_path: Path) -> tuple[Any, Any, dict[str, torch.Tensor]] | None:
    """(transformers config, moetrain config, moetrain state) of a folder whose safetensors match its model
    exactly, read tensor by tensor; ``None`` when the folder must go through ``from_pretrained``."""
    import transformers

    from moetrain.hf.convert import ARCHS, from_hf_state, hf_class

    tensors = lazy_tensors(hf_path)
    if tensors is None:
        return None
    hf_cfg = transformers.AutoConfig.from_pretrained(str(hf_path))
    if hf_cfg.model_type not in ARCHS:
        return None
    with torch.device("meta"):
        skeleton = hf_class(hf_cfg.model_type)(hf_cfg)
    if not matches_model(tensors, skeleton):
        return None
    cfg, state = from_hf_state(tensors, hf_cfg)
    return hf_cfg, cfg, state


def assigned_model(cfg: Any, state: dict[str, torch.Tensor]) -> Any:
    """The moetrain model of ``cfg`` holding ``state``'s tensors themselves: built on the meta device and
    assigned (no random initialisation, no copy), the RoPE tables computed and a tied head tied again."""
    from moetrain.config import resolve_num_groups
    from moetrain.model.mla import model_rope_tables
    from moetrain.model.transformer import Transformer

    m, seq_len = cfg.model, cfg.data.seq_len
    with torch.device("meta"):
        model = Transformer(m, cfg.moe, m.vocab_size, seq_len, resolve_num_groups(cfg.moe, 1), skip_init=True)
    model.load_state_dict(state, strict=True, assign=True)
    model.rope_cos, model.rope_sin = model_rope_tables(m, seq_len)
    if m.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model
