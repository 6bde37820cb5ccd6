"""One gloo spawn per world size for the multi-process checks of several test modules.

Starting W processes that import torch costs 15-25 s on 2 busy cores, more
than the checks themselves, so test modules :func:`register` their checks (at
import, i.e. collection) and the first :func:`result` for a world size runs
every check registered for it in one :func:`tests.helpers.distributed.run_distributed`
call. A check is a module-level function ``fn(rank, world, tmp_dir)`` (picklable)
returning a picklable value; its exception is returned, not raised, so the
other checks still run and each test reports its own failure. A check must
finish its collectives before asserting, so the ranks stay in step.

A spawn that fails as a whole (a rank crashed, a timeout) is recorded with its
cause: every later :func:`result` for that world size fails at once with the
same cause instead of spawning again and waiting out the timeout once more.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

from tests.helpers.distributed import run_distributed

Check = Callable[[int, int, str], Any]
CHECKS: dict[int, list[tuple[str, Check]]] = {}
_RESULTS: dict[int, list[dict[str, Any]]] = {}
_FAILED: dict[int, str] = {}
"""World size -> why its spawn failed (the first dependant's error, kept for the others)."""


class SpawnFailed(RuntimeError):
    """The spawn of a world size failed as a whole; raised for every check that needed it."""


def register(world: int, name: str, fn: Check) -> None:
    """Run ``fn`` in the ``world``-rank spawn, in registration order."""
    checks = CHECKS.setdefault(world, [])
    if all(n != name for n, _ in checks):
        checks.append((name, fn))


def _suite(rank: int, world: int, checks: list[tuple[str, Check]], tmp: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, fn in checks:
        try:
            out[name] = {"ok": fn(rank, world, tmp)}
        except Exception:
            out[name] = {"error": traceback.format_exc()}
    return out


def result(world: int, name: str) -> list[Any]:
    """The ranks' return values of check ``name`` (the spawn runs on first use); fails with the ranks' errors,
    or with :class:`SpawnFailed` (at once, without spawning again) when the spawn failed as a whole."""
    if world in _FAILED:
        raise SpawnFailed(f"{name}: the {world}-rank spawn failed earlier (not retried): {_FAILED[world]}")
    if world not in _RESULTS:
        tmp = tempfile.mkdtemp(prefix=f"moetrain-spawn{world}-")
        atexit.register(shutil.rmtree, tmp, True)
        try:
            _RESULTS[world] = run_distributed(_suite, world, CHECKS[world], tmp)
        except Exception as e:
            _FAILED[world] = f"{type(e).__name__}: {e}"
            raise SpawnFailed(f"{name}: the {world}-rank spawn failed: {_FAILED[world]}") from e
    per_rank = [r[name] for r in _RESULTS[world]]
    errors = [f"rank {i}: {r['error']}" for i, r in enumerate(per_rank) if "error" in r]
    assert not errors, "\n".join(errors)
    return [r["ok"] for r in per_rank]
