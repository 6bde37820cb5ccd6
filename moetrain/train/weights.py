"""Model-only loading of any engine's checkpoint (native DCP shards or DeepSpeed's files), for export and
inference: one process, any EP or world size the checkpoint was saved with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from moetrain.train.checkpoint.entries import copy_into, model_entries
from moetrain.train.checkpoint.layout import CheckpointError, read_meta, resolve_checkpoint, verify_checkpoint
from moetrain.train.checkpoint.reading import read_entries
from moetrain.train.deepspeed.checkpoint import read_deepspeed_entries


def load_model_weights(model: nn.Module, ckpt: str | Path) -> dict[str, Any]:
    """Load a checkpoint's model weights into ``model`` (this process's experts); returns its meta.

    Works in one process on any checkpoint (any EP / world size it was saved
    with). Used by export and inference.
    """
    path = resolve_checkpoint(ckpt)
    meta = read_meta(path)
    verify_checkpoint(path, meta)
    wanted = model_entries(model)
    if meta.get("engine") == "deepspeed":
        buffers = read_deepspeed_entries(path)
        for key, t in wanted.items():
            if key not in buffers:
                raise CheckpointError(f"{path}: DeepSpeed's files hold no {key.removeprefix('model.')}")
            if buffers[key].shape != t.shape:
                raise CheckpointError(
                    f"{path}: {key.removeprefix('model.')} has shape {tuple(buffers[key].shape)}, "
                    f"the model {tuple(t.shape)}"
                )
    else:
        buffers = read_entries(path, wanted)
    copy_into(wanted, buffers)
    return meta
