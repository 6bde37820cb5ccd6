"""Ranks from SLURM's variables, for tasks started by ``srun`` or the submitit launcher without torchrun.

Each SLURM task is one rank: RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS,
LOCAL_RANK = SLURM_LOCALID, and the rendezvous (env://) at the first node of the
allocation on a port derived from the job id, the same on every task. Nothing
changes when torchrun already set RANK (``scripts/slurm_train.sbatch``) or when
the allocation has a single task.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[003-007,012],cpu01`` -> ``gpu003``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot parse")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def export_slurm_env(env: MutableMapping[str, str] = os.environ) -> bool:
    """Fill torchrun's variables from SLURM's; return whether it did."""
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["LOCAL_WORLD_SIZE"] = env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost"))))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    return True
