"""Train modules: what an engine owns (model, optimizer, precision, backward, step, its checkpoint state).

OLMo-core's split: the :class:`~moetrain.train.trainer.Trainer` owns the loop, the schedule of evaluation,
logging and checkpoints; a :class:`TrainModule` owns everything that differs between engines, and is the
stateful part a checkpoint saves and restores. The base class runs a step's micro-batches (the routing pre-pass,
forward, loss, backward, metrics); an engine says how to run the forward and the backward, and what changes
around each micro-batch (:meth:`TrainModule.micro_batch_context`: the one place that knows which micro-batch is
the step's last). :class:`~moetrain.train.native.NativeTrainModule` is moetrain's own (AdamW, FSDP2
``replicate`` or ``fully_shard`` over DP / EDP, clipping by the true global norm, autocast);
:class:`~moetrain.train.deepspeed.module.DeepSpeedTrainModule` runs the same model through
``deepspeed.initialize``. To add an engine, subclass :class:`TrainModule` in a package of its own and add it to
:func:`moetrain.train.trainer.build_train_module` (docs/architecture.md, "Where to add ...").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from moetrain.config import TrainConfig
from moetrain.model.transformer import ModelOutput, Transformer
from moetrain.moe.step_state import step_state
from moetrain.parallel.context import ParallelContext
from moetrain.train.metrics import MetricRecorder, ReducedMetrics
from moetrain.train.moe_metrics import record_moe, record_val
from moetrain.train.step import micro_batch_loss, routing_prepass


@dataclass
class StepInfo:
    """What an optimizer step reports: the pre-clip global gradient norm, whether the update was applied
    (not for a skipped non-finite or fp16-overflow step) and any engine metrics (already global)."""

    grad_norm: torch.Tensor
    applied: bool
    extra: dict[str, Any] = field(default_factory=dict)


class TrainModule(ABC):
    """One engine: built around a (sharded) model, it trains one global batch at a time and owns its checkpoint
    state (:meth:`checkpoint_meta`, :meth:`save_checkpoint`, :meth:`check_checkpoint`, :meth:`load_checkpoint`:
    what :class:`~moetrain.train.checkpoint.manager.CheckpointManager` calls)."""

    engine: ClassVar[str]
    model: Transformer
    optimizer: torch.optim.Optimizer

    def __init__(self, cfg: TrainConfig, model: Transformer, pc: ParallelContext) -> None:
        self.cfg, self.model, self.pc = cfg, model, pc
        self.whole: Transformer = model
        """The whole model's shape (parameter counts, FLOPs, every MoE layer): ``model`` itself, but under
        pipeline parallelism, where ``model`` holds this rank's stages only."""
        self.global_scope = cfg.moe.balance.scope == "global"

    # ------------------------------------------------------------ one step
    def train_batch(self, micro: list[torch.Tensor], rec: MetricRecorder) -> None:
        """Forward and backward of this rank's micro-batches; records ``train/loss``, ``train/aux_loss`` (means
        over micro-batches and ranks) and every MoE layer's statistics into ``rec``.

        Each backward accumulates the gradient of ``loss / len(micro)``: with equal micro-batch sizes the
        accumulated gradient is that of the mean loss over the rank's sequences. Micro-batch ``i`` of ``n`` runs
        inside :meth:`micro_batch_context` ``(i, n)``, the routing pre-pass (``moe.balance.scope=global``) inside
        ``(-1, n)``: a forward before the first micro-batch, never the last (under FSDP the weights it gathers stay
        for the first micro-batch)."""
        self.model.train()
        n, counts = len(micro), None
        if self.global_scope and (n > 1 or self.pc.distributed):
            with self.micro_batch_context(-1, n):
                counts = routing_prepass(self.model, micro, self.pc, self.autocast)
        with step_state(global_counts=counts):  # every forward and backward (recomputes included) of the step
            for i, mb in enumerate(micro):
                with self.micro_batch_context(i, n):
                    out, loss_lm, aux, mtp, mtp_k = micro_batch_loss(self.forward, mb, self.pc.device, self.autocast)
                    self.backward(loss_lm + aux + mtp if mtp_k else loss_lm + aux, n)
                rec.record("train/loss", loss_lm, "mean")
                rec.record("train/aux_loss", aux, "mean")
                for k, loss_k in enumerate(mtp_k, start=1):
                    rec.record(f"train/mtp_loss_{k}", loss_k, "mean")  # DeepSeek-V3 eq. 24, unweighted
                record_moe(rec, out.moe_stats)

    @abstractmethod
    def micro_batch_context(self, i: int, n: int) -> AbstractContextManager[Any]:
        """Entered around micro-batch ``i`` of the step's ``n`` (its forward and backward; ``i = -1``: the routing
        pre-pass's forward): e.g. whether this backward reduces the gradients (only the last one's does)."""

    @abstractmethod
    def forward(self, tokens_BS: torch.Tensor, **kw: Any) -> ModelOutput:
        """The model's training forward as the engine runs it (the model, or DeepSpeed's engine)."""

    @abstractmethod
    def backward(self, loss: torch.Tensor, num_micro: int) -> None:
        """Accumulate the gradient of ``loss / num_micro``."""

    def autocast(self) -> AbstractContextManager[Any]:
        """The precision context of the forward: none unless the engine says (native bf16: autocast)."""
        return torch.autocast(self.pc.device.type, enabled=False)

    @abstractmethod
    def optim_step(self, step: int, reduced: ReducedMetrics) -> StepInfo:
        """Apply the accumulated gradients (``reduced``: the step's global metrics, for the non-finite check)."""

    def reduce_metrics(self, rec: MetricRecorder, kind: str = "train") -> ReducedMetrics:
        """``rec`` reduced over all ranks (:meth:`~moetrain.train.metrics.MetricRecorder.reduce`); ``kind``
        (``train``, ``val``) names what was recorded, for an engine whose ranks record different keys."""
        return rec.reduce(self.pc)

    def eval_step(self, tokens_BS: torch.Tensor, empty: bool, rec: MetricRecorder) -> None:
        """Evaluate one validation batch of token ids ``[B, S + 1]`` into ``rec``
        (:func:`~moetrain.train.moe_metrics.record_val`); ``empty``: this rank's share was empty and
        ``tokens_BS`` is a stand-in row, run for the collectives and recorded as zeros."""
        out = self.eval_forward(tokens_BS[:, :-1])
        record_val(rec, out.logits, tokens_BS, out.moe_stats, empty)

    @staticmethod
    def step_losses(reduced: ReducedMetrics) -> dict[str, torch.Tensor]:
        """The step's global losses, named for the non-finite check's message."""
        return {"loss": reduced.tensor("train/loss"), "aux loss": reduced.tensor("train/aux_loss")}

    def startup_notes(self) -> list[str]:
        """Lines the trainer logs at the start of a run about the engine's layout (none by default)."""
        return []

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @torch.no_grad()
    def eval_forward(self, tokens_BS: torch.Tensor) -> ModelOutput:
        """The model's forward under the engine's precision, without gradients' bookkeeping."""
        with self.autocast():
            return self.model(tokens_BS)

    # ------------------------------------------------------------ checkpoint state
    @abstractmethod
    def checkpoint_meta(self) -> dict[str, Any]:
        """Its ``meta.json`` fields (JSON values)."""

    @abstractmethod
    def save_checkpoint(self, tmp: Path, group: Any, asynchronous: bool) -> Future | None:
        """Write its files into ``tmp`` (every rank); a future when the writing continues in the background."""

    @abstractmethod
    def check_checkpoint(self, path: Path, meta: dict[str, Any]) -> None:
        """Raise :class:`~moetrain.train.checkpoint.layout.CheckpointError` if ``path`` cannot be loaded into this
        engine (before anything is read)."""

    @abstractmethod
    def load_checkpoint(self, path: Path, meta: dict[str, Any], group: Any) -> None:
        """Restore model, optimizer, schedule and RNG from ``path`` (a weights-only import: the model only)."""

    def close(self) -> None:  # noqa: B027  (a hook with a default: an engine holding nothing need not override it)
        """Release what the engine holds (nothing by default)."""


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``trainer.precision`` for the native engine: bf16 autocast for ``bf16`` (and ``auto`` on GPU), else none."""
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else None
