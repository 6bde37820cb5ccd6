"""Run-time guards of the training loop: non-finite steps and preemption signals.

Both decide something every rank must agree on, at a step boundary:

* :class:`NonFiniteGuard` looks at the step's global loss and global gradient
  norm (identical on every rank: both are all-reduced) once per optimizer step,
  before the update, so a non-finite step never reaches the weights. That is one
  host synchronisation per step, none per micro-batch.
* :class:`StopSignals` turns SIGTERM / SIGINT into a request to stop at the next
  step boundary; the ranks OR their requests (one tiny all-reduce on a CPU gloo
  group per step) so all of them save the same step and exit together.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient norm (one-line message naming the step and quantity)."""


class NonFiniteGuard:
    """Applies ``trainer.nonfinite`` (``stop`` | ``skip``) to each optimizer step."""

    def __init__(self, policy: str, max_skips: int, verbose: bool = True) -> None:
        self.policy = policy
        self.max_skips = max_skips
        self.verbose = verbose
        """Print a line per skipped step (rank 0 only: every rank decides the same)."""
        self.skipped = 0
        """Steps skipped so far in this run (saved in checkpoints, so the budget spans resumes)."""

    def check(self, step: int, values: dict[str, torch.Tensor | None]) -> bool:
        """Whether step ``step``'s update may be applied; raises :class:`NonFiniteError` to stop the run.

        ``values`` names the step's global quantities (``loss``, ``gradient norm``); ``None`` ones are not
        known yet. One host synchronisation.
        """
        parts = {name: t for name, t in values.items() if t is not None}
        if not parts:
            return True
        flags = torch.stack([torch.isfinite(t.detach().float()).all() for t in parts.values()])
        if bool(flags.all()):
            return True
        bad = [name for name, ok in zip(parts, flags.tolist()) if not ok]
        values_text = ", ".join(f"{name} {_describe(parts[name])}" for name in bad)
        if self.policy == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            if self.verbose:
                logging.getLogger("moetrain").warning(
                    f"moetrain: step {step}: non-finite {values_text}; update skipped "
                    f"({self.skipped} of at most {self.max_skips}, trainer.nonfinite=skip)"
                )
            return False
        if self.policy == "skip":
            budget, hint = f" after {self.skipped} skipped steps (trainer.nonfinite_max_skips)", ""
        else:
            budget, hint = "", ", or set trainer.nonfinite=skip"
        raise NonFiniteError(
            f"step {step}: non-finite {values_text}{budget}; the update was not applied and no checkpoint of it "
            f"was written (lower optim.lr, raise optim.warmup_steps{hint})"
        )


def _describe(t: torch.Tensor) -> str:
    values = t.detach().float().flatten().tolist()
    return ", ".join(f"{v:g}" for v in values)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor holds only finite values (one host synchronisation)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """SIGTERM / SIGINT request a stop at the next step boundary (a second one of the same kind acts at once).

    Installed only in the main thread (Python delivers signals there); :meth:`restore` puts the
    previous handlers back.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signum:  # asked twice: stop now, the default way
            self.restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        print(
            f"moetrain: {signal.Signals(signum).name} received; saving a checkpoint at the end of this step, "
            "or at the next batch of an evaluation (send it again to stop at once)",
            flush=True,
        )

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def agreed(self, group: Any, distributed: bool) -> int | None:
        """The signal any rank received (the same answer on every rank), or ``None``."""
        if not distributed:
            return self.received
        flag = torch.tensor([self.received or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return int(flag.item()) or None


def exit_code_for(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (SIGTERM 143, SIGINT 130)."""
    return 128 + signum
