"""Train modules: what an engine owns (model, optimizer, precision, forward/backward, step, its checkpoint files).

OLMo-core's split: the :class:`~moetrain.train.trainer.Trainer` owns the loop,
the schedule of evaluation, logging and checkpoints; a :class:`TrainModule`
owns everything that differs between engines. :class:`~moetrain.train.native.NativeTrainModule` is
moetrain's own (AdamW, gradient sync over DP / EDP, clipping by the true global
norm, autocast); :class:`~moetrain.train.deepspeed.module.DeepSpeedTrainModule`
runs the same model through ``deepspeed.initialize``. To add an engine,
implement this protocol and add it to :func:`moetrain.train.trainer.build_train_module`.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from moetrain.model.transformer import ModelOutput, Transformer
from moetrain.train.metrics import MetricRecorder, ReducedMetrics


@dataclass
class StepInfo:
    """What an optimizer step reports: the pre-clip global gradient norm, whether the update was applied
    (not for a skipped non-finite or fp16-overflow step) and any engine metrics (already global)."""

    grad_norm: torch.Tensor
    applied: bool
    extra: dict[str, Any] = field(default_factory=dict)


class TrainModule(Protocol):
    """One engine: built around a (sharded) model, it trains one global batch at a time."""

    engine: str
    model: Transformer

    def train_batch(self, micro: list[torch.Tensor], rec: MetricRecorder) -> None:
        """Accumulate the gradients of this rank's micro-batches, recording their metrics into ``rec``."""
        ...

    def optim_step(self, step: int, reduced: ReducedMetrics) -> StepInfo:
        """Apply the accumulated gradients (``reduced``: the step's global metrics, for the non-finite check)."""
        ...

    def lr(self) -> float: ...

    def eval_forward(self, tokens_BS: torch.Tensor) -> ModelOutput:
        """The model's forward under the engine's precision, without gradients' bookkeeping."""
        ...

    def checkpoint_meta(self) -> dict[str, Any]: ...

    def save_checkpoint(self, tmp: Path, group: Any, asynchronous: bool) -> Future | None: ...

    def check_checkpoint(self, path: Path, meta: dict[str, Any]) -> None: ...

    def load_checkpoint(self, path: Path, meta: dict[str, Any], group: Any) -> None: ...

    def close(self) -> None: ...


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``trainer.precision`` for the native engine: bf16 autocast for ``bf16`` (and ``auto`` on GPU), else none."""
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else None
