"""One line for a user's mistake, a traceback only for a bug: the entry points' error handling.

Every ``moetrain-*`` tool runs its work through :func:`guarded_main`. The
exceptions a user can cause (a bad config, data, checkpoint, path or argument,
a run dir in use, a full or read-only disk, the receive-budget guardrail) print
one line ``<tool>: <kind> error: <message>`` and exit 2, also when a library
wrapped them (:func:`causes`: DCP's ``CheckpointException``, ``raise ... from``);
anything else is a bug and keeps its traceback. ``MOETRAIN_DEBUG=1`` shows the
traceback of every error.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import Any

USER_ERROR_EXIT_CODE = 2
DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system"}
if hasattr(errno, "EDQUOT"):
    DISK_ERRNOS[errno.EDQUOT] = "disk quota exceeded"


class ArgumentError(ValueError):
    """A command-line argument of a tool outside its range (``--nodes 0``, ``--top-p 0``)."""


def check_arg(flag: str, value: Any, ok: bool, rule: str) -> None:
    """Raise :class:`ArgumentError` ``--flag=value: rule`` unless ``ok`` (NaN fails every comparison, so a
    rule written as ``value > 0`` refuses it too)."""
    if not ok:
        raise ArgumentError(f"{flag}={value!r}: {rule}")


def one_line(text: str, limit: int = 500) -> str:
    """``text`` on one line (whitespace runs collapsed), at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _user_error_kinds() -> dict[type[BaseException], str]:
    from moetrain.config import ConfigError
    from moetrain.data.corpus import DataError
    from moetrain.train.checkpoint import CheckpointError
    from moetrain.train.rundir import RunDirError

    kinds: dict[type[BaseException], str] = {
        ConfigError: "config",
        DataError: "data",
        CheckpointError: "checkpoint",
        RunDirError: "run dir",
        ArgumentError: "argument",
    }
    try:
        from hydra.errors import HydraException

        kinds[HydraException] = "config"  # a bad override or config group on the command line
    except ImportError:  # pragma: no cover - hydra is a dependency
        pass
    try:
        from moetrain.parallel.all_to_all import RecvOverflowError

        kinds[RecvOverflowError] = "moe.max_recv_factor guardrail"
    except ImportError:  # pragma: no cover - the dispatcher always exists
        pass
    return kinds


def causes(e: BaseException) -> list[BaseException]:
    """``e`` and what it wraps, outermost first: the ``raise ... from`` chain (``__cause__``) and the per-rank
    exceptions of a ``torch.distributed.checkpoint`` ``CheckpointException`` (its ``failures``: rank ->
    (exception, traceback), torch/distributed/checkpoint/api.py), so an ENOSPC inside a DCP save is
    recognised as what it is. ``__context__`` (an exception raised while handling another) is not followed:
    a bug in an ``except`` block stays a bug."""
    out: list[BaseException] = []
    todo: list[BaseException | None] = [e]
    while todo:
        cur = todo.pop(0)
        if cur is None or any(cur is seen for seen in out):
            continue
        out.append(cur)
        failures = getattr(cur, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values() if f is not None]
        todo.append(cur.__cause__)
    return out


def _own_kind(e: BaseException) -> tuple[str, str] | None:
    for cls, kind in _user_error_kinds().items():
        if isinstance(e, cls):
            return kind, one_line(str(e))
    if isinstance(e, OSError) and (
        e.errno in DISK_ERRNOS
        or isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError)
    ):
        what = DISK_ERRNOS.get(e.errno or 0, e.strerror or type(e).__name__)
        where = e.filename if e.filename is not None else ""
        return "file", one_line(f"{where}: {what}" if where else what)
    return None


def user_error(e: BaseException) -> tuple[str, str] | None:
    """``(kind, message)`` when ``e`` (or an exception it wraps, see :func:`causes`) is a user's mistake or
    the machine's (disk, permissions), else ``None``."""
    if isinstance(e, SystemExit | KeyboardInterrupt | GeneratorExit):
        return None
    for cause in causes(e):
        found = _own_kind(cause)
        if found is not None:
            return found
    return None


def is_failure(e: BaseException) -> bool:
    """Whether ``e`` ends a command as a failure to report (every ``Exception``, and the ``BaseException``
    subclasses that libraries raise for one, like DCP's ``CheckpointException``), not an exit or Ctrl-C."""
    return not isinstance(e, SystemExit | KeyboardInterrupt | GeneratorExit)


def report(tool: str, e: BaseException) -> int:
    """Print ``e``'s one line (if it is a user error) and return the exit code, or re-raise a bug."""
    found = user_error(e)
    if found is None or os.environ.get("MOETRAIN_DEBUG") == "1":
        raise e
    kind, message = found
    print(f"{tool}: {kind} error: {message}", file=sys.stderr)
    return USER_ERROR_EXIT_CODE


def guarded_main(tool: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a user error exits with one line and status 2, Ctrl-C with status 130."""
    try:
        return fn()
    except KeyboardInterrupt:
        print(f"{tool}: interrupted", file=sys.stderr)
        sys.exit(130)
    except BaseException as e:
        if not is_failure(e):
            raise
        sys.exit(report(tool, e))
