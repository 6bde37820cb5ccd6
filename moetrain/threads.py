"""CPU threads for torch in the tools (``--threads``), as the trainer picks them (``trainer.num_threads``).

torch's default is the machine's core count, not the cores this process may use: on a shared 2-core slice
it oversubscribes them, and ``moetrain-generate`` took 60-89 s instead of 12 s with one thread (issue 31).
The default here is :func:`moetrain.config.default_threads`: the CPUs of this process's affinity mask.
"""

from __future__ import annotations

import argparse

from moetrain.config.world import default_threads, usable_cpus
from moetrain.errors import check_arg


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` on a tool's command line."""
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: the CPUs this process may use)"
    )


def set_threads(threads: int | None) -> int:
    """Give torch ``threads`` (``None``: :func:`default_threads`); one line for a count out of range."""
    import torch

    cpus = usable_cpus()
    if threads is not None:
        check_arg(
            "--threads", threads, 1 <= threads <= cpus, f"must be between 1 and the {cpus} CPUs this process may use"
        )
    n = threads or default_threads()
    torch.set_num_threads(n)
    return n
