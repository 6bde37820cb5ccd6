"""Per-step state the MoE layers read, installed around a training step's passes instead of passed down.

Some inputs of an MoE layer are the same for every micro-batch of a step and come from outside the model:
the step's global-batch routing counts (``moe.balance.scope=global``, Qiu et al. 2025). Rather than thread
them through ``Transformer.forward`` and every block, the train module installs them around the step's
forward and backward passes with :func:`step_state` (as
:func:`~moetrain.parallel.fsdp.set_micro_batch_sync` sets FSDP's per-micro-batch behaviour from outside),
and each layer reads its own with :func:`global_counts_of`.

The state is process-wide, not a context variable: the backward pass, which recomputes checkpointed blocks
(``trainer.activation_checkpointing``), may run in autograd's device threads and must see what the forward
saw. So the context spans the backward passes too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepState:
    """What the MoE layers read of the step in progress."""

    global_counts: dict[int, dict[str, torch.Tensor]] | None = None
    """The step's f-type routing counts by MoE layer index, summed over micro-batches and data-parallel
    ranks (:func:`~moetrain.moe.layer.global_routing_counts`); ``None``: each layer uses its micro-batch's."""


_current = StepState()


@contextmanager
def step_state(*, global_counts: dict[int, dict[str, torch.Tensor]] | None = None) -> Iterator[StepState]:
    """Install the step's state for the passes run inside (forward and backward); the previous one after."""
    global _current
    previous, _current = _current, StepState(global_counts=global_counts)
    try:
        yield _current
    finally:
        _current = previous


def global_counts_of(layer_idx: int | None) -> dict[str, torch.Tensor] | None:
    """MoE layer ``layer_idx``'s global-batch counts (``expert`` [N], ``tokens`` [1], ``sent`` [G] with
    groups) in the step in progress; ``None`` outside :func:`step_state`, without global counts, or for a
    layer built outside a model (no index)."""
    counts = _current.global_counts
    if counts is None or layer_idx is None:
        return None
    return counts.get(layer_idx)
