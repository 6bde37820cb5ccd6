"""One line for a user's mistake, a traceback only for a bug: the entry points' error handling.

Every ``moetrain-*`` tool runs its work through :func:`guarded_main`. The
exceptions a user can cause (a bad config, data, checkpoint or path, a run dir
in use, a full or read-only disk, the receive-budget guardrail) print one line
``<tool>: <kind> error: <message>`` and exit 2; anything else is a bug and
keeps its traceback. ``MOETRAIN_DEBUG=1`` shows the traceback of every error.
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


def user_error(e: BaseException) -> tuple[str, str] | None:
    """``(kind, message)`` when ``e`` is a user's mistake or the machine's (disk, permissions), else ``None``."""
    for cls, kind in _user_error_kinds().items():
        if isinstance(e, cls):
            return kind, one_line(str(e))
    if isinstance(e, OSError) and (
        e.errno in DISK_ERRNOS or isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError)
    ):
        what = DISK_ERRNOS.get(e.errno or 0, e.strerror or type(e).__name__)
        where = e.filename if e.filename is not None else ""
        return "file", one_line(f"{where}: {what}" if where else what)
    return None


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
    except Exception as e:
        sys.exit(report(tool, e))
