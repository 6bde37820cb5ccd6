"""Run a test function on several gloo processes on CPU (no torchrun, no GPU).

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes
(start method ``spawn``), gives each torchrun's environment (MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK), starts a gloo process group, calls
``fn(rank, world_size, *args)`` and returns the ranks' return values in rank
order. A child's exception is re-raised in the parent with its traceback, so a
failing assertion on rank 1 reads like a normal pytest failure. ``fn`` and its
arguments must be picklable (module-level functions).
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class ChildError(RuntimeError):
    """A rank raised; the message holds its rank and traceback."""


def free_port() -> int:
    """A TCP port nobody listens on right now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, results: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        # Plain pickle copies tensors' data (the queue's torch reducer would share memory that dies with us).
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: list[str] = []
    try:
        while len(out) + len(errors) < world_size:
            try:
                rank, status, value = results.get(timeout=timeout)
            except queue.Empty:
                errors.append(f"timed out after {timeout:.0f}s waiting for the ranks")
                break
            if status == "ok":
                out[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break  # the other ranks are probably blocked in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.terminate()
                p.join()
    if errors:
        raise ChildError("\n".join(errors))
    return [out[r] for r in range(world_size)]


def merged(per_rank: list[dict[str, Any]], key: str) -> dict[str, torch.Tensor]:
    """The union of the ranks' ``key`` entries (name -> tensor); an entry several ranks hold must agree bitwise."""
    full: dict[str, torch.Tensor] = {}
    for r in per_rank:
        for k, v in r[key].items():
            if k in full:
                assert torch.equal(full[k], v), f"ranks disagree on {k}"
            full[k] = v
    return full
