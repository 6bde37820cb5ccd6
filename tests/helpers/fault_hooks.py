"""Fault injection for the reliability tests, installed as a training-loop hook (:mod:`moetrain.train.hooks`).

Read from the environment of the process it is installed in (the tests set it):

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

Environment faults, in any attempt (:func:`install` reads them too):

* ``MOETRAIN_FAULT_DISK_FULL_AT_SAVE=N``: the N-th checkpoint save of this process (1-based) and every
  later one runs out of space: DCP's ``FileSystemWriter.write_data`` writes half a file and raises
  ``OSError(ENOSPC)``, which DCP wraps in a ``CheckpointException`` as it does a real full disk.
* ``MOETRAIN_FAULT_READ_ONLY=DIR``: creating a directory under DIR fails with ``OSError(EROFS)``, as on a
  read-only mount (tests run as root, for whom ``chmod`` protects nothing).

Install it with ``tests.helpers.fault_hooks.install()`` before ``moetrain.train.cli.run`` (or ``cli.main``).
"""

from __future__ import annotations

import errno
import os
import pathlib
from typing import Any

from moetrain.train import hooks

FAULT_EXIT_CODE = 17


def _first_attempt() -> bool:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") in ("", "0")


def _fault_rank(world_size: int) -> int:
    return int(os.environ.get("MOETRAIN_FAULT_RANK", world_size - 1))


def _env_step(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def planned(kind: str, step: int, rank: int) -> bool:
    """Whether ``MOETRAIN_FAULTS`` plans a ``kind`` fault at ``step`` on ``rank`` in this torchrun attempt."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") or "0"
    for item in filter(None, os.environ.get("MOETRAIN_FAULTS", "").split(",")):
        a, k, s, r = item.split(":")
        if (a, k, int(s), int(r)) == (attempt, kind, step, rank):
            return True
    return False


class FaultInjector:
    """Kills this rank at the planned points."""

    def before_publish(self, step: int, rank: int, world_size: int) -> None:
        armed = _first_attempt() and _env_step("MOETRAIN_FAULT_DURING_SAVE") == step
        if (armed and rank == _fault_rank(world_size)) or planned("during_save", step, rank):
            os._exit(FAULT_EXIT_CODE)  # data written, checkpoint not yet published

    def after_step(self, step: int, rank: int, world_size: int, checkpoints: Any) -> None:
        if _first_attempt() and _env_step("MOETRAIN_FAULT_AT_STEP") == step:
            checkpoints.wait()
            if rank == _fault_rank(world_size):
                os._exit(FAULT_EXIT_CODE)  # a rank lost after step N
        if planned("after_step", step, rank):
            os._exit(FAULT_EXIT_CODE)


def fill_disk_at_save(n: int) -> None:
    """From the ``n``-th DCP save on (1-based), writing runs out of space (see the module docstring)."""
    from torch.distributed.checkpoint import FileSystemWriter

    write_data = FileSystemWriter.write_data
    saves = [0]

    def full(self: Any, plan: Any, planner: Any) -> Any:
        saves[0] += 1
        if saves[0] < n:
            return write_data(self, plan, planner)
        path = os.path.join(str(self.path), "__0_0.distcp")
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    FileSystemWriter.write_data = full  # type: ignore[method-assign]


def read_only_under(root: str) -> None:
    """``Path.mkdir`` of anything under ``root`` fails with EROFS (see the module docstring)."""
    mkdir = pathlib.Path.mkdir

    def refused(self: pathlib.Path, *args: Any, **kwargs: Any) -> None:
        if str(self.absolute()).startswith(root.rstrip("/") + "/") and not self.exists():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        mkdir(self, *args, **kwargs)

    pathlib.Path.mkdir = refused  # type: ignore[method-assign]


def install() -> FaultInjector:
    if os.environ.get("MOETRAIN_FAULT_DISK_FULL_AT_SAVE"):
        fill_disk_at_save(int(os.environ["MOETRAIN_FAULT_DISK_FULL_AT_SAVE"]))
    if os.environ.get("MOETRAIN_FAULT_READ_ONLY"):
        read_only_under(os.environ["MOETRAIN_FAULT_READ_ONLY"])
    return hooks.install(FaultInjector())
