"""A run directory belongs to one run: its lock, and the checks made before anything is written there.

``RUN_DIR/.moetrain.lock`` is held with an exclusive ``flock`` by rank 0 for the
run's lifetime. The kernel drops the lock when its holder dies, however it dies
(``kill -9`` included), so a stale lock is simply taken over; a live one makes
a second run on the same directory stop with one line naming the holder. The
file itself stays (emptied on release): deleting it would let two runs lock two
different files of the same name. A ``checkpoint.dir`` outside the run directory
is locked the same way (``CKPT_DIR/.moetrain.lock``): two live runs sharing it
would resume and prune each other's checkpoints.

:func:`preflight` runs before ``config.yaml`` or anything else is written: the
lock, then ``trainer.resume=none`` on a directory that already holds a run is
refused, then the checkpoint to resume is found and its config compared
(:func:`moetrain.train.checkpoint.resume_target`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from moetrain.config import TrainConfig
from moetrain.train.checkpoint import complete_checkpoints, resume_target

LOCK_FILE = ".moetrain.lock"


class RunDirError(RuntimeError):
    """The run directory is in use, or holds another run (one-line message)."""


class RunDirLock:
    """An exclusive lock on a run directory (or, ``key="checkpoint.dir"``, a checkpoint directory), held until
    :meth:`release` or the process's death; :attr:`also` is released with it."""

    def __init__(self, run_dir: Path, key: str = "run_dir") -> None:
        self.run_dir = Path(run_dir)
        self.key = key
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.also: RunDirLock | None = None
        self.took_over: dict | None = None
        """The holder recorded by a previous run that died without releasing (a stale lock), if any."""

    def acquire(self) -> RunDirLock:
        """Take the lock or raise :class:`RunDirError` naming the run that holds it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            what = "" if self.key == "run_dir" else f"{self.key} "
            raise RunDirError(
                f"{what}{self.run_dir}: in use by another run ({holder}); wait for it to end or choose another "
                f"{self.key}"
            ) from None
        except OSError as e:  # a filesystem without locks: go on unprotected, and say so
            os.close(fd)
            print(f"moetrain: warning: cannot lock {self.path} ({e.strerror}); runs sharing it are not detected")
            return self
        previous = _read_holder(fd)
        if previous:  # written by a holder whose lock the kernel released: it ended without cleaning up
            self.took_over = previous
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.also is not None:
            self.also.release()
            self.also = None
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"


def run_files(run_dir: Path, ckpt_dir: Path) -> list[str]:
    """What in a run directory shows that a run already wrote there (checkpoints, metrics, a summary)."""
    found = []
    if complete_checkpoints(ckpt_dir):
        found.append(f"checkpoints in {ckpt_dir}")
    for name in ("metrics.jsonl", "summary.json"):
        f = run_dir / name
        if f.is_file() and f.stat().st_size > 0:
            found.append(name)
    return found


def check_fresh_start(cfg: TrainConfig, run_dir: Path, ckpt_dir: Path) -> None:
    """``trainer.resume=none`` (or ``auto`` with nothing to resume but a finished run) must not mix two runs."""
    resume = cfg.trainer.resume
    found = run_files(run_dir, ckpt_dir)
    if resume == "none" and found:
        raise RunDirError(
            f"{run_dir}: already holds a run ({', '.join(found)}); trainer.resume=none would mix two runs' files: "
            "continue it with trainer.resume=auto, or choose another run_dir"
        )
    if resume == "auto" and not complete_checkpoints(ckpt_dir) and (run_dir / "summary.json").is_file():
        raise RunDirError(
            f"{run_dir}: holds a finished run without checkpoints to continue from; choose another run_dir"
        )


def preflight(cfg: TrainConfig, run_dir: Path) -> RunDirLock:
    """Lock the run directory and check that this run may write there; raises before anything is written
    (:class:`RunDirError`, or ``CheckpointError`` for the checkpoint to resume). Rank 0 only."""
    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    created = [d for d in (run_dir, ckpt_dir) if not d.exists() or (d.is_dir() and not any(d.iterdir()))]
    lock = RunDirLock(run_dir).acquire()
    try:
        if not ckpt_dir.resolve().is_relative_to(run_dir.resolve()):  # inside: the run dir's lock covers it
            lock.also = RunDirLock(ckpt_dir, "checkpoint.dir").acquire()
        check_fresh_start(cfg, run_dir, ckpt_dir)
        resume_target(cfg, ckpt_dir)
    except BaseException:
        lock.release()
        for directory in created:  # a run refused before it wrote anything leaves no directory behind
            (directory / LOCK_FILE).unlink(missing_ok=True)
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
        raise
    if lock.took_over:
        print(f"moetrain: {run_dir}: the previous run ({_describe(lock.took_over)}) ended without releasing it")
    return lock


RUNS_ROOT = Path("runs")
"""Where single runs go (``configs/train.yaml``'s ``hydra.run.dir`` is ``runs/<time>``)."""


def unfinished_runs(root: Path, name: str | None = None) -> list[Path]:
    """Run directories under ``root`` (named ``name``, or ``name-*``, when given) with a complete checkpoint and
    no ``summary.json`` (a run that stopped before its end), newest checkpoint last."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if not d.is_dir() or (name and d.name != name and not d.name.startswith(f"{name}-")):
            continue
        ckpts = complete_checkpoints(d / "checkpoints")
        if ckpts and not (d / "summary.json").is_file():
            found.append((ckpts[-1][1].stat().st_mtime, d))
    return [d for _, d in sorted(found)]


def chosen_run_dir(run_dir: str | None, run_name: str | None, resume: str, root: Path = RUNS_ROOT) -> str | None:
    """The run directory a command names: ``run_dir``; else ``runs/<run_name>`` (so the same command continues
    the run); else, for ``trainer.resume=latest``, the newest unfinished run (:func:`unfinished_runs`); else
    ``None`` (a new ``runs/<time>``)."""
    if run_dir:
        return run_dir
    if resume == "latest":
        runs = unfinished_runs(root, run_name)
        if runs:
            return str(runs[-1])
    return str(root / run_name) if run_name else None
