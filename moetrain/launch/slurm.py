"""Ranks from SLURM's variables, for tasks started by ``srun`` or the submitit launcher without torchrun.

Each SLURM task is one rank: RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS,
LOCAL_RANK = SLURM_LOCALID, and the rendezvous (env://) at the first node of the
allocation on a port derived from the job id, the same on every task. Nothing
changes when torchrun already set RANK (``scripts/slurm_train.sbatch``) or when
the allocation has a single task.

In a submitit task (the ``hydra/launcher=slurm`` sweeps: ``SUBMITIT_EXECUTOR=slurm``)
the values are submitit's own, from ``submitit.helpers.TorchDistributedEnvironment``.
Elsewhere (``srun`` without submitit) moetrain computes the same values the same
way: the port is ``random.Random(SLURM_JOB_ID).randint(20000, 60000)`` (submitit's
rule; an explicit ``MASTER_PORT`` wins), not ``20000 + job_id % 20000``, which gave
jobs whose ids differ by 20000 the same port on a shared first node.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import MutableMapping

PORT_RANGE = (20000, 60000)
"""MASTER_PORT range, as submitit's ``TorchDistributedEnvironment`` draws it."""


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[003-007,012],cpu01`` -> ``gpu003``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot parse")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def master_port(job_id: str) -> int:
    """The rendezvous port of a SLURM job: seeded by its id, as submitit does (the same on every task)."""
    return random.Random(job_id).randint(*PORT_RANGE)


def export_submitit_env() -> bool:
    """In a submitit task, export submitit's own torch.distributed variables; return whether it did."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return False
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return False
    keep = {k: os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT") if k in os.environ}  # the user's win
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    os.environ.update(keep)
    return True


def export_slurm_env(env: MutableMapping[str, str] = os.environ) -> bool:
    """Fill torchrun's variables from SLURM's; return whether it did."""
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return False
    if env is os.environ and export_submitit_env():
        return True
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["LOCAL_WORLD_SIZE"] = env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost"))))
    env.setdefault("MASTER_PORT", str(master_port(env.get("SLURM_JOB_ID", "0"))))
    return True
