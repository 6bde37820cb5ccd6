"""Reading back what ``moetrain-export`` writes (for the tests; the package only writes it)."""

from __future__ import annotations

import json
from pathlib import Path

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
