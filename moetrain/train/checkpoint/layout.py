"""Checkpoint directory layout: names, ``meta.json``, checksums, atomic publish and pruning.

Layout of ``checkpoint.dir`` (default ``RUN_DIR/checkpoints``)::

    step_000100/            a complete checkpoint (published by a rename)
        meta.json           step, tokens, loader position, LR schedule, resolved config, file checksums
        ...                 the engine's files (DCP shards, or DeepSpeed's)
    step_000200.tmp/        a save in progress (or interrupted): never loaded

Publishing is atomic: all ranks write into ``step_N.tmp``, meet at a barrier,
hash a share of the files each (SHA-256), then rank 0 writes ``meta.json`` (with
every file's size and hash) and renames the directory to ``step_N``. A
directory counts as a checkpoint only under the final name *and* with
``meta.json``, so a save interrupted at any point is never picked up.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

FORMAT_VERSION = 2
"""2 adds ``files`` (size and SHA-256 of every file); format 1 checkpoints still load, unverified."""
READABLE_FORMATS = (1, 2)
META_FILE = "meta.json"
CKPT_RE = re.compile(r"^step_(\d{6,})$")


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
        raise CheckpointError(f"{path}: unreadable ({one_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: not a moetrain checkpoint of format {READABLE_FORMATS[-1]} or older")
    validate_meta(path, meta)
    named = CKPT_RE.match(ckpt.name)
    if named and int(named[1]) != meta["step"]:  # resuming it would retrain steps, pruning would drop a newer one
        raise CheckpointError(
            f"{path}: step={meta['step']}, but its directory is {ckpt.name} (step {int(named[1])}); "
            "the checkpoint was moved or edited: resume another one"
        )
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
    pp = meta.get("pp", 1)  # the pipeline size, for the record (checkpoints before it have none)
    if not isinstance(pp, int) or isinstance(pp, bool) or pp < 1:
        raise CheckpointError(f"{path}: field 'pp' must be a JSON int >= 1, not {pp!r}")
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


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def agree(error: str | None, group: Any, distributed: bool, kind: type[Exception] = CheckpointError) -> None:
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
    agree(verify_share(ckpt, meta, rank, world_size), group, distributed)


def write_meta_and_publish(tmp: Path, final: Path, meta: dict[str, Any]) -> None:
    """Rank 0's half of a publish: ``meta.json`` written and fsynced in the staging dir, then the rename."""
    staged = tmp / (META_FILE + ".tmp")
    with open(staged, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    staged.replace(tmp / META_FILE)
    tmp.replace(final)


def prune(ckpt_dir: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` complete checkpoints (0 keeps all); each is renamed away first,
    so a half-removed one is never a checkpoint."""
    if keep <= 0:
        return
    for _, path in complete_checkpoints(ckpt_dir)[:-keep]:
        doomed = path.with_name(path.name + ".deleting")
        path.replace(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


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
