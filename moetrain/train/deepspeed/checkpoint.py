"""``engine=deepspeed`` checkpoint files: the format, defined once (saving, resuming, and reading weights).

A save writes DeepSpeed's own files (``engine.save_checkpoint`` with tag
``step_NNNNNN.tmp``: the module states, one file per (layer, global expert),
ZeRO optimizer shards) plus each rank's RNG state next to them; the manager then
publishes the directory like a native checkpoint. DeepSpeed's ZeRO shards and
expert files belong to one layout, so resuming needs the same world size,
``parallel.ep`` and ZeRO stage (the native engine reshards).

Every file is read with ``torch.load(weights_only=True)`` (DeepSpeed's own loader
unpickles with ``weights_only=False``): a file that pickles anything but tensors
and DeepSpeed's plain-data classes is refused with one line, never executed.
Reading the weights (:func:`read_deepspeed_entries`, for export) needs no
``deepspeed`` installed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from moetrain.train.checkpoint.layout import CheckpointError, one_line

DS_MODULE_FILE = "mp_rank_00_model_states.pt"
DS_EXPERT_FILES = "layer_*_expert_*_mp_rank_00_model_states.pt"
DS_EXPERT_KEY = re.compile(r"^(?P<module>.+)\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<e>\d+)\.(?P<name>\w+)$")


def _torch_load_tensors(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the save of this checkpoint did not complete") from None
    except Exception as e:  # any unpickling failure is one line
        raise CheckpointError(f"{path}: unreadable ({one_line(e)})") from None


def read_deepspeed_entries(path: Path) -> dict[str, torch.Tensor]:
    """The weights of an ``engine=deepspeed`` checkpoint as :func:`model_entries` names (experts by global index).

    Non-expert weights come from DeepSpeed's module file, each expert from its
    ``layer_L_expert_E`` file (``moetrain.train.deepspeed.moe_layers`` names them
    ``<module>.deepspeed_moe.experts.deepspeed_experts.<E>.<w13|w2>`` with the global
    index E). Read with ``weights_only=True``: nothing is executed. The weights are
    the module's (bf16 when trained in bf16; ZeRO's fp32 master copy is in the optimizer shards).
    """
    state = _torch_load_tensors(path / DS_MODULE_FILE)
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise CheckpointError(f"{path / DS_MODULE_FILE}: not a DeepSpeed model-states file")
    out = {f"model.{k}": v for k, v in state["module"].items()}
    for f in sorted(path.glob(DS_EXPERT_FILES)):
        for key, t in _torch_load_tensors(f).items():
            m = DS_EXPERT_KEY.match(key)
            if m is None:
                raise CheckpointError(f"{f}: {key} is not a moetrain expert weight")
            out[f"model.{m['module']}.{m['name']}.{int(m['e'])}"] = t
    return out


def ds_safe_globals() -> list[Any]:
    """The plain-data DeepSpeed classes its checkpoint files pickle (ZeRO optimizer states): the only
    non-torch globals the weights-only unpickler admits. Their construction runs no code of the file's."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` as DeepSpeed's checkpoint engine calls it, but ``weights_only=True``: a file that
    pickles anything else (code) is refused with one line naming it, never executed."""
    try:
        with torch.serialization.safe_globals(ds_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the save of this checkpoint did not complete") from None
    except Exception as e:
        raise CheckpointError(f"{path}: refused, not plain tensor data ({one_line(e)})") from None


def make_loading_safe(engine: Any) -> None:
    """Route every file DeepSpeed's engine loads (model, expert and ZeRO optimizer states) through
    :func:`safe_torch_load`; DeepSpeed's own loader unpickles with ``weights_only=False``."""
    engine.checkpoint_engine.load = safe_torch_load


def save_files(engine: Any, tmp: Path, rank: int) -> None:
    """DeepSpeed's files of this rank into ``tmp`` (its tag is the staging dir's name), and this rank's RNG."""
    from moetrain.train.checkpoint.entries import rng_entries

    engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False)
    torch.save(rng_entries(rank), tmp / f"rng_rank_{rank}.pt")


def check_layout(path: Path, meta: dict[str, Any], world_size: int, ep: int, zero_stage: int) -> None:
    """DeepSpeed's ZeRO and expert files fit only the layout that wrote them."""
    saved = (meta.get("world_size"), meta.get("ep"), meta.get("zero_stage"))
    now = (world_size, ep, zero_stage)
    if saved != now:
        raise CheckpointError(
            f"{path}: saved with world size {saved[0]}, parallel.ep={saved[1]}, engine.zero_stage={saved[2]}; "
            f"this run has {now[0]}, {now[1]}, {now[2]} (DeepSpeed's ZeRO and expert files need the same layout)"
        )


def load_files(engine: Any, path: Path, rank: int) -> None:
    """Model, optimizer (ZeRO shards) and LR schedule through DeepSpeed's loader made safe, then the RNG."""
    from moetrain.train.checkpoint.entries import set_rng

    make_loading_safe(engine)
    try:
        loaded, _ = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    except CheckpointError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, AssertionError) as e:
        raise CheckpointError(f"{path}: DeepSpeed could not load it ({one_line(e)})") from None
    if loaded is None:
        raise CheckpointError(f"{path}: DeepSpeed found no checkpoint files in it")
    rng_file = path / f"rng_rank_{rank}.pt"
    if not rng_file.is_file():
        raise CheckpointError(f"{rng_file}: missing; the save of this checkpoint did not complete")
    set_rng(safe_torch_load(rng_file), rank)
