"""Reading back what ``moetrain-export`` writes (for the tests; the package only writes it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moetrain.config import TrainConfig, from_dict
from moetrain.model import Transformer, build_model


def load_safetensors_model(out_dir: str | Path) -> tuple[Transformer, TrainConfig]:
    """Rebuild a model written by :func:`export_safetensors` (no pickle: safetensors + JSON)."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    cfg = from_dict(config["moetrain"])
    model = build_model(cfg.model, cfg.moe, int(config["vocab_size"]), cfg.data.seq_len, ep=cfg.parallel.ep)
    state = load_file(str(out_dir / "model.safetensors"))
    if cfg.model.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg


def whole_state(flat: dict[str, torch.Tensor], model: Transformer) -> dict[str, torch.Tensor]:
    """``model``'s state dict from ``flat`` (name -> tensor, the routed experts one row per global expert,
    ``<name>.<g>``): the experts re-stacked in global order."""
    state = dict(flat)
    for name, t in model.state_dict().items():
        if name not in state:
            state[name] = torch.stack([state.pop(f"{name}.{g}") for g in range(t.shape[0])])
    return state


def assert_export_equals_one_process(ckpt: Path, flat: dict[str, torch.Tensor], tmp: Path) -> dict[str, Any]:
    """``moetrain-export`` of ``ckpt`` equals, tensor for tensor (every safetensors file: the moetrain one, and the
    transformers folder when transformers is installed and the model maps), the export of a one-process weights checkpoint of a model holding ``flat``
    (:func:`whole_state`) put in by ``load_state_dict``, not through the checkpoint reader. Returns what the
    export of ``ckpt`` wrote."""
    import importlib.util

    from safetensors.torch import load_file

    from moetrain.tools.export import export
    from moetrain.train.checkpoint import read_meta
    from moetrain.train.checkpoint.native import publish_weights

    meta = read_meta(ckpt)
    cfg = from_dict(meta["config"])
    vocab, groups = int(meta["arch"]["vocab_size"]), meta["arch"].get("num_groups")
    model = build_model(cfg.model, cfg.moe, vocab, cfg.data.seq_len, num_groups=groups)
    model.load_state_dict(whole_state(flat, model), strict=True)
    ref = publish_weights(model, cfg, tmp / "one_process", {})
    hf = "auto" if importlib.util.find_spec("transformers") is not None else "none"
    got, want = export(ckpt, tmp / "from_ckpt", hf=hf), export(ref, tmp / "from_one_process", hf=hf)
    assert (got.get("hf") is None, got.get("arch")) == (want.get("hf") is None, want.get("arch"))
    a_dir, b_dir = tmp / "from_ckpt", tmp / "from_one_process"
    files = sorted(str(f.relative_to(b_dir)) for f in b_dir.rglob("*.safetensors"))
    assert files == sorted(str(f.relative_to(a_dir)) for f in a_dir.rglob("*.safetensors"))
    assert "model.safetensors" in files
    for rel in files:
        a, b = load_file(str(a_dir / rel)), load_file(str(b_dir / rel))
        assert a.keys() == b.keys(), rel
        for key, value in b.items():
            assert torch.equal(a[key], value), f"{rel}: {key} differs"
    return got
