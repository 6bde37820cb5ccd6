"""Fault-injection driver: runs 2-rank gloo jobs the way ``torchrun --max-restarts`` does, with planned faults.

``python tests/helpers/fault_driver.py SPEC.json`` reads ``{"cfg": <config dict>, "jobs": {name: faults}}`` and runs
each job in ``SPEC_DIR/<name>`` with ``MOETRAIN_FAULTS=faults`` (see ``tests/helpers/fault_hooks.py``): every
attempt forks one process per rank (this driver imported torch and moetrain once and runs no torch op
itself, so forking is safe and an attempt starts in milliseconds), each calls ``moetrain.train.cli.run``;
when a rank dies the others get SIGTERM, then SIGKILL after a grace period, as torchrun's agent does, and
the next attempt (``TORCHELASTIC_RESTART_COUNT`` + 1) starts on a fresh port. Prints one JSON line:
per job, per attempt, the ranks' exit codes and the "resumed from" lines they printed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from moetrain.config import from_dict
from moetrain.train.cli import run

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers.fault_hooks import install as install_faults

WORLD = 2
MAX_ATTEMPTS = 4
GRACE_S = 10.0
ATTEMPT_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker(rank: int, port: int, attempt: int, faults: str, cfg: dict[str, Any], run_dir: Path, log: Path) -> None:
    """One rank of one attempt (in a forked child; never returns)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(WORLD),
        TORCHELASTIC_RESTART_COUNT=str(attempt),
        MOETRAIN_FAULTS=faults,
        OMP_NUM_THREADS="1",
    )
    code = 1
    try:
        torch.set_num_threads(1)
        install_faults()
        run(from_dict(cfg), run_dir)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def attempt_once(attempt: int, faults: str, cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Fork the ranks, wait; on the first failure stop the others like torchrun's agent. Exit codes by rank."""
    port = free_port()
    log = run_dir.parent / f"{run_dir.name}.attempt{attempt}.log"
    pids: dict[int, int] = {}
    for rank in range(WORLD):
        pid = os.fork()
        if pid == 0:
            worker(rank, port, attempt, faults, cfg, run_dir, log)
        pids[pid] = rank
    codes: dict[int, int] = {}
    start, stop_sent, kill_at = time.monotonic(), False, None
    while len(codes) < WORLD:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            codes[pids[pid]] = os.waitstatus_to_exitcode(status)
            continue
        failed = any(c != 0 for c in codes.values()) or time.monotonic() - start > ATTEMPT_TIMEOUT_S
        if failed and not stop_sent:
            for p, r in pids.items():
                if r not in codes:
                    os.kill(p, signal.SIGTERM)
            stop_sent, kill_at = True, time.monotonic() + GRACE_S
        if kill_at is not None and time.monotonic() > kill_at:
            for p, r in pids.items():
                if r not in codes:
                    os.kill(p, signal.SIGKILL)
            kill_at = None
        time.sleep(0.02)
    text = log.read_text() if log.exists() else ""
    resumed = [line for line in text.splitlines() if "resumed from" in line]
    return {"codes": [codes[r] for r in range(WORLD)], "resumed": resumed, "log_tail": text[-1500:]}


def job(faults: str, cfg: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    """Attempts until one finishes on every rank (at most ``MAX_ATTEMPTS``)."""
    attempts = []
    for attempt in range(MAX_ATTEMPTS):
        result = attempt_once(attempt, faults, cfg, run_dir)
        attempts.append(result)
        if all(c == 0 for c in result["codes"]):
            break
    return attempts


def main() -> None:
    spec_path = Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    out = {name: job(faults, spec["cfg"], spec_path.parent / name) for name, faults in spec["jobs"].items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
