"""Sharded, atomic, resharding checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of ``checkpoint.dir`` (default ``RUN_DIR/checkpoints``)::

    step_000100/            a complete checkpoint (published by a rename)
        .metadata           DCP index (tensor shapes, which file holds which bytes)
        __0_0.distcp ...    tensor data, one file per writing rank
        meta.json           step, tokens, loader position, LR schedule, resolved config, file checksums
    step_000200.tmp/        a save in progress (or interrupted): never loaded

What is saved, all as flat ``name -> tensor`` entries (DCP deduplicates the
replicated ones, so every entry is written once):

* ``model.<name>``: the model's ``state_dict()`` (loss-free biases included),
  except that the stacked routed experts ``...experts.w13`` ``[E, D, 2F]`` and
  ``...experts.w2`` ``[E, F, D]`` are split into one entry per expert under its
  *global* index (``model.<prefix>.w13.<g>``). The rank holding experts
  ``[expert_offset, expert_offset + E)`` writes exactly those, so the checkpoint
  is the same whatever the expert-parallel size and any EP size can load it.
* ``optim.<param>.<state>``: AdamW's ``step``, ``exp_avg``, ``exp_avg_sq`` of
  every parameter, re-indexed per global expert the same way.
* ``rng.rank<r>.*``: every rank's torch CPU (and CUDA) generator, Python
  ``random`` and NumPy global states.

Publishing is atomic: all ranks write into ``step_N.tmp``, meet at a barrier,
hash a share of the files each (SHA-256), then rank 0 writes ``meta.json`` (with
every file's size and hash) and renames the directory to ``step_N``. A
directory counts as a checkpoint only under the final name *and* with
``meta.json``, so a save interrupted at any point is never picked up. A save
whose weights are not all finite is refused (:class:`NonFiniteError`), so no
published checkpoint holds NaN/inf weights and pruning never removes the
newest finite one.

Loading never unpickles arbitrary objects: tensor data is read by DCP with
``torch.load(weights_only=True)``, and the DCP index (a pickle) is read with an
unpickler that only admits DCP's metadata classes, torch dtypes and sizes. The
checkpoint is checked first: ``meta.json``'s fields and types, every file's
size and SHA-256 against ``meta.json`` (the ranks split the hashing), then the
model (architecture, every key, every shape) before anything is copied, and is
read into fresh tensors first: a bad checkpoint raises :class:`CheckpointError`
with one line naming the file and the mismatch, and leaves the model and
optimizer untouched.

Test hooks (fault injection; never set them in real runs):

* ``MOETRAIN_FAULT_AT_STEP=N``: after step N (and its checkpoint, if any) is
  done, rank ``MOETRAIN_FAULT_RANK`` (default: the last rank) dies with
  ``os._exit(17)``.
* ``MOETRAIN_FAULT_DURING_SAVE=N``: during the save of step N, that rank dies
  after its tensor data is written but before the checkpoint is published.

Both fire only in the first attempt of a ``torchrun`` job
(``TORCHELASTIC_RESTART_COUNT`` unset or 0), so the restarted job can finish.
``MOETRAIN_FAULTS`` holds more faults for later attempts too: a comma-separated
list of ``ATTEMPT:KIND:STEP:RANK`` with KIND ``after_step`` or ``during_save``
(e.g. ``0:during_save:4:1,1:after_step:3:0``: the first attempt's rank 1 dies
while saving step 4, the restarted job's rank 0 after its first step, step 3).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from moetrain.config import TrainConfig, to_dict
from moetrain.train.guards import NonFiniteError, all_finite

if TYPE_CHECKING:
    from moetrain.train.trainer import Trainer

FORMAT_VERSION = 2
"""2 adds ``files`` (size and SHA-256 of every file); format 1 checkpoints still load, unverified."""
READABLE_FORMATS = (1, 2)
META_FILE = "meta.json"
CKPT_RE = re.compile(r"^step_(\d{6,})$")
FAULT_EXIT_CODE = 17

# DCP warns on every single-process save/load that it assumes one process; that is the intent here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

ARCH_KEYS = (
    ("model", "dim"),
    ("model", "n_layers"),
    ("model", "n_heads"),
    ("model", "n_kv_heads"),
    ("model", "ffn_hidden_size"),
    ("model", "first_k_dense"),
    ("model", "moe_every"),
    ("model", "tie_embeddings"),
    ("moe", "num_experts"),
    ("moe", "expert_hidden_size"),
    ("moe", "num_shared_experts"),
    ("moe", "shared_hidden_size"),
)
"""Config keys that fix the model's tensors: a checkpoint must agree on all of them."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, unreadable or does not fit the model (one-line message)."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def complete_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Published checkpoints ``(step, path)`` in ``ckpt_dir``, oldest first (``.tmp`` ones never count)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = CKPT_RE.match(child.name)
        if m and child.is_dir() and (child / META_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``ckpt_dir``, or ``None``."""
    found = complete_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a directory of checkpoints (its newest complete one)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint")
    if (p / META_FILE).is_file():
        if p.name.endswith(".tmp"):
            raise CheckpointError(f"{p}: an unpublished (interrupted) save, not a checkpoint")
        return p
    if p.is_dir() and (p / ".metadata").exists():
        raise CheckpointError(f"{p / META_FILE}: missing; the save of this checkpoint did not complete")
    latest = latest_checkpoint(p) or latest_checkpoint(p / "checkpoints")
    if latest is None:
        raise CheckpointError(f"{p}: no complete checkpoint (step_NNNNNN with {META_FILE}) in this directory")
    return latest


def read_meta(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's ``meta.json`` (JSON only: nothing is executed)."""
    path = ckpt / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the save of this checkpoint did not complete") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({_one_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: not a moetrain checkpoint of format {READABLE_FORMATS[-1]} or older")
    validate_meta(path, meta)
    return meta


META_FIELDS: dict[str, type | tuple[type, ...]] = {
    "step": int,
    "arch": dict,
    "config": dict,
    "ep": int,
    "world_size": int,
}
"""Fields every ``meta.json`` has, and their JSON types."""
TRAINING_META_FIELDS: dict[str, type | tuple[type, ...]] = {
    "engine": str,
    "tokens_seen": int,
    "loader": dict,
    "scheduler": dict,
    "param_groups": list,
}
"""Fields of a training checkpoint (not of a weights-only import)."""


def validate_meta(path: Path, meta: dict[str, Any]) -> None:
    """Required fields and their types (one line naming the first bad field), before any is used."""
    fields = dict(META_FIELDS)
    if meta.get("kind") != "weights":
        fields.update(TRAINING_META_FIELDS)
    if meta["format"] >= 2:
        fields["files"] = dict
    for key, kind in fields.items():
        if key not in meta:
            raise CheckpointError(f"{path}: field {key!r} is missing")
        value = meta[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise CheckpointError(f"{path}: field {key!r} must be a JSON {names}, not {type(value).__name__}")
    if meta["step"] < 0 or meta["ep"] < 1 or meta["world_size"] < 1:
        raise CheckpointError(f"{path}: step, ep or world_size out of range")
    for rel, info in meta.get("files", {}).items():
        ok = isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)
        if not ok or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{path}: files[{rel!r}] is not a relative path with bytes and sha256")


# ----------------------------------------------------------------- checksums
def sha256_of(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_files(root: Path) -> list[str]:
    """The files of a checkpoint directory (relative, sorted), ``meta.json`` and its staging copy excluded."""
    skip = {META_FILE, META_FILE + ".tmp"}
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in skip)


def hash_share(root: Path, rank: int = 0, world_size: int = 1) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of this rank's share of the files (the i-th file goes to rank i % world_size)."""
    return {
        rel: {"bytes": (root / rel).stat().st_size, "sha256": sha256_of(root / rel)}
        for i, rel in enumerate(checkpoint_files(root))
        if i % world_size == rank
    }


def verify_share(ckpt: Path, meta: dict[str, Any], rank: int = 0, world_size: int = 1) -> str | None:
    """Check this rank's share of the files recorded in ``meta.json``; the first problem as one line, or None."""
    files = meta.get("files")
    if files is None:  # format 1: no checksums were recorded
        return None
    for i, (rel, info) in enumerate(sorted(files.items())):
        if i % world_size != rank:
            continue
        f = ckpt / rel
        if not f.is_file():
            return f"{f}: missing data file"
        size = f.stat().st_size
        if size != info["bytes"]:
            change = "truncated" if size < info["bytes"] else "grown"
            return f"{f}: {change} ({size} bytes, {info['bytes']} when saved)"
        if sha256_of(f) != info["sha256"]:
            return f"{f}: checksum mismatch (the file changed since it was saved; SHA-256 {info['sha256'][:12]}...)"
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


# --------------------------------------------------------------- safe DCP index
class _SafeUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` index: only DCP metadata classes, torch dtypes/sizes and paths."""

    _MODULES: ClassVar[tuple[str, ...]] = ("torch.distributed.checkpoint.metadata",)
    _GLOBALS: ClassVar[set[tuple[str, str]]] = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module in self._MODULES or (module, name) in self._GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.memory_format):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint index")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with a restricted unpickler for the index (tensors already load weights-only)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(str(self.path)) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _SafeUnpickler(io.BytesIO(f.read())).load()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing") from None
        except Exception as e:  # truncated / corrupt / hostile pickle
            raise CheckpointError(f"{path}: unreadable checkpoint index ({_one_line(e)})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not a DCP checkpoint index")
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ------------------------------------------------------------------ state maps
@dataclass
class ExpertLayout:
    """Which global experts a stacked expert module holds on this rank."""

    offset: int
    num_local: int
    num_global: int


def expert_modules(model: nn.Module) -> dict[str, ExpertLayout]:
    """Module prefix -> layout of every routed-expert module (stacked ``w13`` / ``w2`` on dim 0).

    Under expert parallelism ``apply_expert_parallel`` keeps only the local experts
    and sets ``expert_offset`` (global index of local expert 0) and
    ``num_global_experts``; unsharded modules default to offset 0 and all experts.
    """
    from moetrain.moe.experts import GroupedExperts

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, GroupedExperts):
            local = mod.w13.shape[0]
            out[name] = ExpertLayout(
                int(getattr(mod, "expert_offset", 0)), local, int(getattr(mod, "num_global_experts", local))
            )
    return out


def _expert_param_names(layouts: dict[str, ExpertLayout]) -> dict[str, ExpertLayout]:
    return {f"{prefix}.{w}": lay for prefix, lay in layouts.items() for w in ("w13", "w2")}


def model_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model state as checkpoint entries: experts split per global index (views, no copies)."""
    experts = _expert_param_names(expert_modules(model))
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        lay = experts.get(name)
        if lay is None:
            out[f"model.{name}"] = t
        else:
            for e in range(lay.num_local):
                out[f"model.{name}.{lay.offset + e}"] = t[e]
    return out


def _owns_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _fresh_adamw_state(p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
    """What ``torch.optim.AdamW`` creates on a parameter's first step (step 0, zero moments).

    Saving this for a parameter that has no state yet is exact: AdamW's first
    update of such a state equals its update of an absent one.
    """
    state = {
        "step": torch.zeros((), dtype=torch.float32),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }
    if group.get("amsgrad"):
        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def _named_params(model: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    out: dict[int, tuple[str, nn.Parameter]] = {}
    for name, p in model.named_parameters():
        out.setdefault(id(p), (name, p))
    return out


def optimizer_entries(
    model: nn.Module, optimizer: torch.optim.Optimizer, materialize: bool = True
) -> dict[str, torch.Tensor]:
    """Optimizer state per parameter name, expert tensors split per global expert.

    ``materialize`` fills parameters without state with AdamW's initial state
    (so every rank and every EP size sees the same set of keys).
    """
    experts = _expert_param_names(expert_modules(model))
    names = _named_params(model)
    out: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)][0]
            state = optimizer.state.get(p) or (_fresh_adamw_state(p, group) if materialize else {})
            lay = experts.get(name)
            for key, val in state.items():
                if not torch.is_tensor(val):
                    continue
                if lay is None:
                    out[f"optim.{name}.{key}"] = val
                else:
                    for e in range(lay.num_local):
                        per_expert = val[e] if val.dim() > 0 and val.shape[0] == lay.num_local else val
                        out[f"optim.{name}.{lay.offset + e}.{key}"] = per_expert
    return out


def rng_entries(rank: int) -> dict[str, torch.Tensor]:
    """This rank's generator states as tensors (no pickled objects)."""
    p = f"rng.rank{rank}"
    version, internal, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out = {
        f"{p}.torch": torch.get_rng_state(),
        f"{p}.python": torch.tensor([version, *internal], dtype=torch.int64),
        f"{p}.python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        f"{p}.numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        f"{p}.numpy_extra": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out[f"{p}.cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng(entries: dict[str, torch.Tensor], rank: int) -> None:
    p = f"rng.rank{rank}"
    torch.set_rng_state(entries[f"{p}.torch"])
    py = entries[f"{p}.python"].tolist()
    has_gauss, gauss = entries[f"{p}.python_gauss"].tolist()
    random.setstate((int(py[0]), tuple(int(v) for v in py[1:]), gauss if has_gauss else None))
    pos, np_has_gauss, np_gauss = entries[f"{p}.numpy_extra"].tolist()
    np.random.set_state(
        ("MT19937", entries[f"{p}.numpy"].numpy().astype(np.uint32), int(pos), int(np_has_gauss), np_gauss)
    )
    if f"{p}.cuda" in entries and torch.cuda.is_available():
        torch.cuda.set_rng_state(entries[f"{p}.cuda"])


# ------------------------------------------------------------------ validation
def arch_of(cfg: TrainConfig, vocab_size: int) -> dict[str, Any]:
    arch = {f"{sec}.{key}": getattr(getattr(cfg, sec), key) for sec, key in ARCH_KEYS}
    arch["vocab_size"] = vocab_size
    return arch


def check_arch(ckpt: Path, meta: dict[str, Any], arch: dict[str, Any]) -> None:
    """Raise on the first architecture key where the checkpoint and this run differ."""
    saved = meta.get("arch", {})
    for key, value in arch.items():
        if key in saved and saved[key] != value:
            raise CheckpointError(
                f"{ckpt / META_FILE}: {key}={saved[key]!r} in the checkpoint but {value!r} in this run"
            )


def check_engine(ckpt: Path, meta: dict[str, Any], engine: str) -> None:
    """A checkpoint is resumed by the engine that wrote it (their files differ)."""
    saved = meta.get("engine", "native")
    if saved != engine:
        raise CheckpointError(
            f"{ckpt}: written by engine={saved}; resume it with engine={saved} (this run has engine={engine})"
        )


RESUME_FREE_KEYS = (
    "run_dir",
    "trainer.max_steps",
    "trainer.micro_batch_size",
    "trainer.log_every",
    "trainer.eval_every",
    "trainer.eval_at_start",
    "trainer.device",
    "trainer.peak_tflops",
    "trainer.progress",
    "trainer.num_threads",
    "trainer.activation_checkpointing",
    "trainer.compile",
    "trainer.resume",
    "trainer.resume_allow_changes",
    "trainer.nonfinite",
    "trainer.nonfinite_max_skips",
    "data.cache_dir",
    "data.num_proc",
    "data.shard_tokens",
    "engine.zero_stage",
    "engine.reduce_bucket_size",
    "engine.overlap_comm",
    "logger",
    "parallel",
    "checkpoint",
)
"""Keys (or sections) a resume may change freely: length, cadence, memory, speed and logging, not what is
trained (``trainer.micro_batch_size`` splits the same global batch; ``parallel`` reshards)."""


def flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{dotted key: value}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _covered(key: str, names: tuple[str, ...] | list[str]) -> bool:
    return any(key == n or key.startswith(f"{n}.") for n in names)


def config_changes(saved: dict[str, Any], new: dict[str, Any], allowed: list[str]) -> list[str]:
    """``key: saved -> new`` for each key that differs, except the free and the ``allowed`` ones
    (keys only one side knows, from another moetrain version, are not compared)."""
    a, b = flat_config(saved), flat_config(new)
    return [
        f"{key}: {a[key]!r} -> {b[key]!r}"
        for key in sorted(a.keys() & b.keys())
        if a[key] != b[key] and not _covered(key, RESUME_FREE_KEYS) and not _covered(key, allowed)
    ]


def check_resume_config(ckpt: Path, meta: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse to resume with a config that differs from the checkpoint's beyond the free and allowed keys."""
    if meta.get("kind") == "weights":  # an import: its config only fixes the architecture (checked on load)
        return
    changes = config_changes(meta["config"], to_dict(cfg), cfg.trainer.resume_allow_changes)
    if changes:
        keys = ",".join(c.split(":")[0] for c in changes)
        raise CheckpointError(
            f"{ckpt}: this run's config differs from the checkpoint's ({'; '.join(changes)}); "
            f"to resume with it anyway set trainer.resume_allow_changes=[{keys}], or use another run_dir"
        )


def resume_target(cfg: TrainConfig, ckpt_dir: Path) -> Path | None:
    """The checkpoint ``trainer.resume`` names (``None``: start afresh), its ``meta.json``, engine and config
    checked against this run's; raises :class:`CheckpointError` with one line."""
    choice = cfg.trainer.resume
    if choice == "none":
        return None
    path = latest_checkpoint(ckpt_dir) if choice == "auto" else resolve_checkpoint(choice)
    if path is None:
        return None
    meta = read_meta(path)
    check_engine(path, meta, cfg.engine.name)
    check_resume_config(path, meta, cfg)
    return path


def check_entries(ckpt: Path, metadata: Metadata, wanted: dict[str, torch.Tensor]) -> None:
    """Every wanted entry exists with the same shape, and every data file is long enough."""
    index = metadata.state_dict_metadata
    for key, t in wanted.items():
        md = index.get(key)
        if md is None:
            raise CheckpointError(f"{ckpt / '.metadata'}: no entry {key!r} (the checkpoint was saved by another model)")
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{ckpt / '.metadata'}: entry {key!r} is not a tensor")
        if tuple(md.size) != tuple(t.shape):
            raise CheckpointError(
                f"{ckpt / '.metadata'}: {key} has shape {tuple(md.size)} in the checkpoint, "
                f"{tuple(t.shape)} in this run"
            )
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = str(info.relative_path)
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, length in sorted(need.items()):
        f = ckpt / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing data file")
        size = f.stat().st_size
        if size < length:
            raise CheckpointError(f"{f}: truncated ({size} bytes, the index needs {length})")


def _agree(error: str | None, group: Any, distributed: bool, kind: type[Exception] = CheckpointError) -> None:
    """Raise the first rank's error on every rank (so no rank enters a collective alone)."""
    if distributed:
        errors: list[str | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, error, group=group)
        error = next((e for e in errors if e), None)
    if error:
        raise kind(error)


def verify_checkpoint(
    ckpt: Path, meta: dict[str, Any], rank: int = 0, world_size: int = 1, group: Any = None, distributed: bool = False
) -> None:
    """Every file's size and SHA-256 against ``meta.json``, the ranks hashing a share each; the same
    :class:`CheckpointError` on every rank if any file differs."""
    _agree(verify_share(ckpt, meta, rank, world_size), group, distributed)


def _empty_like(entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, dtype=v.dtype, device="cpu") for k, v in entries.items()}


def read_entries(
    ckpt: Path,
    wanted: dict[str, torch.Tensor],
    optional: tuple[str, ...] = (),
    group: Any = None,
    distributed: bool = False,
) -> dict[str, torch.Tensor]:
    """Validate and read ``wanted`` (plus any ``optional`` keys present) into fresh CPU tensors.

    Raises :class:`CheckpointError` on every rank if any rank finds a problem;
    nothing of the caller's is touched.
    """
    reader = SafeFileSystemReader(str(ckpt))
    error = None
    buffers: dict[str, torch.Tensor] = {}
    try:
        metadata = reader.read_metadata()
        check_entries(ckpt, metadata, wanted)
        buffers = _empty_like(wanted)
        for key in optional:
            md = metadata.state_dict_metadata.get(key)
            if isinstance(md, TensorStorageMetadata):
                buffers[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    except CheckpointError as e:
        error = str(e)
    _agree(error, group, distributed)
    try:
        dcp.load(buffers, storage_reader=reader, process_group=group, no_dist=not distributed)
    except Exception as e:
        raise CheckpointError(f"{ckpt}: cannot read tensor data ({_one_line(e)})") from None
    return buffers


# ---------------------------------------------------------- model-only loading
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
    _copy_into(wanted, buffers)
    return meta


DS_MODULE_FILE = "mp_rank_00_model_states.pt"
DS_EXPERT_FILES = "layer_*_expert_*_mp_rank_00_model_states.pt"
DS_EXPERT_KEY = re.compile(r"^(?P<module>.+)\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<e>\d+)\.(?P<name>\w+)$")


def _torch_load_tensors(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the save of this checkpoint did not complete") from None
    except Exception as e:  # any unpickling failure is one line
        raise CheckpointError(f"{path}: unreadable ({_one_line(e)})") from None


def read_deepspeed_entries(path: Path) -> dict[str, torch.Tensor]:
    """The weights of an ``engine=deepspeed`` checkpoint as :func:`model_entries` names (experts by global index).

    Non-expert weights come from DeepSpeed's module file, each expert from its
    ``layer_L_expert_E`` file (``moetrain.parallel.deepspeed_moe`` names them
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


@torch.no_grad()
def _copy_into(targets: dict[str, torch.Tensor], sources: dict[str, torch.Tensor]) -> None:
    for key, t in targets.items():
        t.copy_(sources[key])


# -------------------------------------------------------------------- manager
def _fault_armed() -> bool:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") in ("", "0")


def _fault_rank(world_size: int) -> int:
    return int(os.environ.get("MOETRAIN_FAULT_RANK", world_size - 1))


def _env_step(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _planned_fault(kind: str, step: int, rank: int) -> bool:
    """Whether ``MOETRAIN_FAULTS`` plans a ``kind`` fault at ``step`` on ``rank`` in this torchrun attempt."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") or "0"
    for item in filter(None, os.environ.get("MOETRAIN_FAULTS", "").split(",")):
        a, k, s, r = item.split(":")
        if (a, k, int(s), int(r)) == (attempt, kind, step, rank):
            return True
    return False


class Checkpointer:
    """Saves and restores a :class:`~moetrain.train.trainer.Trainer`'s complete state."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        cfg = trainer.cfg.checkpoint
        self.cfg = cfg
        self.dir = Path(cfg.dir) if cfg.dir else trainer.run_dir / "checkpoints"
        self.pc = trainer.pc
        self.distributed = self.pc.distributed and dist.is_initialized()
        # A dedicated gloo group: async saves run collectives from a background
        # thread and must not interleave with the training collectives.
        self.group = dist.new_group(backend="gloo") if self.distributed else None
        # Another one for the per-step stop-signal vote, which may run while an async save uses `group`.
        self.control_group = dist.new_group(backend="gloo") if self.distributed else None
        self._pending: tuple[Future, Path, Path, dict[str, Any]] | None = None
        self.resumed_from: Path | None = None
        self.last_saved_step: int | None = None

    # ----------------------------------------------------------------- save
    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def state_entries(self) -> dict[str, torch.Tensor]:
        """Everything to save; per-expert slices are copied (a view would write its whole storage)."""
        tr = self.trainer
        entries = {
            **model_entries(tr.model),
            **optimizer_entries(tr.model, tr.optimizer),
            **rng_entries(self.pc.rank),
        }
        return {k: v if _owns_storage(v) else v.clone() for k, v in entries.items()}

    def meta(self) -> dict[str, Any]:
        tr = self.trainer
        groups = [{k: v for k, v in g.items() if k != "params"} for g in tr.optimizer.param_groups]
        sched = {k: v for k, v in tr.scheduler.state_dict().items() if k != "lr_lambdas"}
        return {
            "format": FORMAT_VERSION,
            "engine": tr.cfg.engine.name,
            "step": tr.step,
            "tokens_seen": tr.tokens_seen,
            "world_size": self.pc.world_size,
            "ep": tr.cfg.parallel.ep,
            "loader": tr.loader.state_dict(),
            "scheduler": sched,
            "param_groups": groups,
            "arch": arch_of(tr.cfg, tr.model.vocab_size),
            "config": to_dict(tr.cfg),
            "nonfinite_skips": tr.nonfinite.skipped,
            "time": time.time(),
        }

    def check_finite(self) -> None:
        """Refuse to save non-finite weights (:class:`NonFiniteError` on every rank if any rank has one)."""
        error = None
        if not all_finite(list(self.trainer.model.state_dict().values())):
            error = (
                f"step {self.trainer.step}: the weights hold NaN or inf on rank {self.pc.rank}; "
                "this checkpoint is not written (the newest finite one is kept)"
            )
        _agree(error, self.group, self.distributed, NonFiniteError)

    def save_for_stop(self) -> Path | None:
        """A checkpoint of the current step before the run stops (none if one was just saved, or disabled)."""
        if not self.cfg.enabled:
            return None
        self.wait()
        if self.last_saved_step != self.trainer.step:
            self.save()
            self.wait()
        return self.dir / checkpoint_name(self.trainer.step)

    def save(self) -> Path:
        """Write a checkpoint of the current step (asynchronously when ``checkpoint.async_save``)."""
        self.wait()
        self.check_finite()
        self.last_saved_step = self.trainer.step
        tmp, final = self._staging_dirs()
        meta = self.meta()
        entries = self.state_entries()
        writer = FileSystemWriter(str(tmp))
        if self.cfg.async_save:  # tensors are staged (copied) now; the writing happens in a thread
            future = dcp.async_save(
                entries, storage_writer=writer, process_group=self.group, no_dist=not self.distributed
            )
            self._pending = (future, tmp, final, meta)  # type: ignore[assignment]
            return final
        dcp.save(entries, storage_writer=writer, process_group=self.group, no_dist=not self.distributed)
        self._publish(tmp, final, meta)
        return final

    def _staging_dirs(self) -> tuple[Path, Path]:
        """``(step_N.tmp, step_N)`` of the current step, both cleared by rank 0, then a barrier."""
        final = self.dir / checkpoint_name(self.trainer.step)
        tmp = self.dir / (final.name + ".tmp")
        if self.pc.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            if final.exists():  # re-saving a step (e.g. a run that ended there is extended)
                shutil.rmtree(final)
        self._barrier()
        return tmp, final

    def _restore_progress(self, meta: dict[str, Any]) -> None:
        """Step, tokens seen and the loader's position from ``meta.json``."""
        tr = self.trainer
        tr.loader.load_state_dict(meta["loader"])
        tr.step = int(meta["step"])
        tr.tokens_seen = int(meta["tokens_seen"])
        tr.nonfinite.skipped = int(meta.get("nonfinite_skips", 0))

    def wait(self) -> None:
        """Finish (and publish) an asynchronous save in flight."""
        if self._pending is None:
            return
        future, tmp, final, meta = self._pending
        self._pending = None
        result = future.result()
        if hasattr(result, "upload_completion"):  # AsyncSaveResponse
            result.upload_completion.result()
        self._publish(tmp, final, meta)

    def _publish(self, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        rank, world = self.pc.rank, self.pc.world_size
        fault = _fault_armed() and _env_step("MOETRAIN_FAULT_DURING_SAVE") == meta["step"]
        if (fault and rank == _fault_rank(world)) or _planned_fault("during_save", meta["step"], rank):
            os._exit(FAULT_EXIT_CODE)  # test hook: data written, checkpoint not yet published
        self._barrier()  # every rank's data is on disk
        share = hash_share(tmp, rank, world)  # the ranks split the hashing
        shares: list[Any] = [share]
        if self.distributed:
            shares = [None] * world
            dist.all_gather_object(shares, share, group=self.group)
        meta = {**meta, "files": {k: v for share in shares for k, v in share.items()}}
        if self.pc.is_main:
            staged = tmp / (META_FILE + ".tmp")
            with open(staged, "w") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            staged.replace(tmp / META_FILE)
            tmp.replace(final)
            self._prune()
        self._barrier()

    def _prune(self) -> None:
        keep = self.cfg.keep_last
        if keep <= 0:
            return
        for _, path in complete_checkpoints(self.dir)[:-keep]:
            doomed = path.with_name(path.name + ".deleting")  # not a checkpoint name while it is removed
            path.replace(doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def after_step(self, is_last: bool) -> None:
        """Save on schedule and at the end; then the fault-injection test hook."""
        step = self.trainer.step
        if self.cfg.enabled and ((self.cfg.every and step % self.cfg.every == 0) or is_last):
            self.save()
        if is_last:
            self.wait()
        if _fault_armed() and _env_step("MOETRAIN_FAULT_AT_STEP") == step:
            self.wait()
            if self.pc.rank == _fault_rank(self.pc.world_size):
                os._exit(FAULT_EXIT_CODE)  # test hook: a rank lost after step N
        if _planned_fault("after_step", step, self.pc.rank):
            os._exit(FAULT_EXIT_CODE)

    # --------------------------------------------------------------- resume
    def find_resume(self) -> Path | None:
        """The checkpoint ``trainer.resume`` asks for (rank 0 decides; every rank gets the same)."""
        found: str | None = None
        error: str | None = None
        if self.pc.is_main:
            try:
                target = resume_target(self.trainer.cfg, self.dir)
                found = str(target) if target else None
            except CheckpointError as e:
                error = str(e)
        box = self.pc.broadcast_object((found, error))
        found, error = box  # type: ignore[misc]
        if error:
            raise CheckpointError(error)
        return Path(found) if found else None

    def resume(self) -> int | None:
        """Restore the newest/requested checkpoint; returns its step (``None`` = fresh start)."""
        if self.pc.is_main and self.dir.is_dir():
            for stale in self.dir.glob("step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        path = self.find_resume()
        if path is None:
            if self.pc.is_main and self.trainer.cfg.trainer.resume == "auto":
                # an earlier attempt that died before its first checkpoint: its records are redone
                truncate_metrics(self.trainer.run_dir / "metrics.jsonl", -1)
            return None
        self.load(path)
        self.resumed_from = path
        if self.pc.is_main:
            print(f"moetrain: resumed from {path} at step {self.trainer.step}", flush=True)
            truncate_metrics(self.trainer.run_dir / "metrics.jsonl", self.trainer.step)
        self.pc.barrier()
        return self.trainer.step

    def load(self, path: Path) -> None:
        """Validate, read into fresh tensors, then copy into model, optimizer, scheduler, loader, RNG."""
        tr = self.trainer
        meta = read_meta(path)
        check_engine(path, meta, "native")
        check_arch(path, meta, arch_of(tr.cfg, tr.model.vocab_size))
        verify_checkpoint(path, meta, self.pc.rank, self.pc.world_size, self.group, self.distributed)
        model_t = model_entries(tr.model)
        if meta.get("kind") == "weights":  # an imported model (moetrain-export --from-hf): weights, step 0
            _copy_into(model_t, read_entries(path, model_t, (), self.group, self.distributed))
            return
        optim_t = optimizer_entries(tr.model, tr.optimizer)
        rank = self.pc.rank
        rng_keys = tuple(rng_entries(rank))
        buffers = read_entries(path, {**model_t, **optim_t}, rng_keys, self.group, self.distributed)

        _copy_into(model_t, buffers)
        self._set_optimizer(buffers)
        sched = dict(meta["scheduler"])
        sched["lr_lambdas"] = [None] * len(tr.scheduler.lr_lambdas)
        tr.scheduler.load_state_dict(sched)
        for group, saved in zip(tr.optimizer.param_groups, meta["param_groups"]):
            for key in ("lr", "initial_lr"):
                if key in saved:
                    group[key] = saved[key]
        self._restore_progress(meta)
        if all(k in buffers for k in rng_keys if not k.endswith(".cuda")):
            set_rng(buffers, rank)
        else:  # a rank the saving job did not have: a fresh stream, still a function of (seed, step, rank)
            seed = tr.cfg.trainer.seed * 1_000_003 + tr.step * 7919 + rank
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)

    @torch.no_grad()
    def _set_optimizer(self, buffers: dict[str, torch.Tensor]) -> None:
        tr = self.trainer
        experts = _expert_param_names(expert_modules(tr.model))
        names = _named_params(tr.model)
        for group in tr.optimizer.param_groups:
            for p in group["params"]:
                name = names[id(p)][0]
                lay = experts.get(name)
                state: dict[str, torch.Tensor] = {}
                for key, fresh in _fresh_adamw_state(p, group).items():
                    if lay is None:
                        src = buffers[f"optim.{name}.{key}"]
                    else:
                        parts = [buffers[f"optim.{name}.{lay.offset + e}.{key}"] for e in range(lay.num_local)]
                        src = torch.stack(parts) if fresh.dim() > 0 else parts[0]
                    state[key] = src.to(device=fresh.device, dtype=fresh.dtype).clone()
                tr.optimizer.state[p] = state


def truncate_metrics(path: Path, step: int) -> None:
    """Drop ``metrics.jsonl`` records after ``step`` (atomically), so a resumed run's file
    equals an uninterrupted run's."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record_step = json.loads(line).get("step", 0)
        except ValueError:
            continue  # a torn last line of a killed run
        if record_step <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)
