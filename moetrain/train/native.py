"""moetrain's own engine as a train module (see :mod:`moetrain.train.module` for the protocol)."""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from moetrain.config import TrainConfig
from moetrain.model.transformer import ModelOutput, Transformer
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.fsdp import set_micro_batch_sync
from moetrain.parallel.grad_buckets import apply_grad_buckets, grad_reducer
from moetrain.parallel.grad_sync import clip_grad_norm, sync_gradients
from moetrain.train.checkpoint import native
from moetrain.train.guards import NonFiniteGuard
from moetrain.train.metrics import MetricRecorder, ReducedMetrics
from moetrain.train.module import StepInfo, autocast_dtype
from moetrain.train.optim import build_optimizer, build_scheduler
from moetrain.train.step import accumulate_gradients, routing_prepass


class NativeTrainModule:
    """moetrain's own engine: AdamW with decay on matrices, warmup + cosine, DP/EDP gradient sync (bucketed,
    overlapped with the last micro-batch's backward), global-norm clipping, bf16 autocast (fp32 router),
    ``trainer.nonfinite``; checkpoints as resharding DCP shards."""

    engine = "native"

    def __init__(self, cfg: TrainConfig, model: Transformer, pc: ParallelContext) -> None:
        self.cfg, self.model, self.pc = cfg, model, pc
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.trainer.max_steps)
        self.dtype = autocast_dtype(cfg.trainer.precision, pc.device)
        self.nonfinite = NonFiniteGuard(cfg.trainer.nonfinite, cfg.trainer.nonfinite_max_skips, pc.is_main)
        self.global_scope = cfg.moe.balance.scope == "global"
        self.keep_gathered = cfg.parallel.fsdp and cfg.parallel.fsdp_keep_gathered
        self._micro_index = self._num_micro = 0
        apply_grad_buckets(model, pc, cfg.parallel.bucket_mb)  # the all-reduce overlaps the last backward

    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype is None:
            return torch.autocast(self.pc.device.type, enabled=False)
        return torch.autocast(self.pc.device.type, dtype=self.dtype)

    def train_batch(self, micro: list[torch.Tensor], rec: MetricRecorder) -> None:
        self.model.train()
        counts = None
        self._micro_index, self._num_micro = 0, len(micro)
        if self.global_scope and (len(micro) > 1 or self.pc.distributed):
            counts = routing_prepass(self._prepass_forward, micro, self.pc, self.autocast)
        reducer = grad_reducer(self.model)  # None on one process (or once removed: the flat sync then)
        last = reducer.overlap if reducer is not None else None
        accumulate_gradients(self._forward, self._backward, micro, rec, self.autocast, self.pc.device, counts, last)

    def _prepass_forward(self, tokens_BS: torch.Tensor, **kw: Any) -> ModelOutput:
        """The routing pre-pass's forward: under FSDP the weights it gathers stay for the first micro-batch."""
        if self.keep_gathered:
            set_micro_batch_sync(self.model, last=False)
        return self.model(tokens_BS, **kw)

    def _forward(self, tokens_BS: torch.Tensor, **kw: Any) -> ModelOutput:
        """The model on one micro-batch of the step; under FSDP, gathered and reduced as
        ``parallel.fsdp_keep_gathered`` says (:func:`~moetrain.parallel.fsdp.set_micro_batch_sync`)."""
        if self.keep_gathered:
            set_micro_batch_sync(self.model, last=self._micro_index == self._num_micro - 1)
        self._micro_index += 1
        return self.model(tokens_BS, **kw)

    @staticmethod
    def _backward(loss: torch.Tensor, num_micro: int) -> None:
        (loss / num_micro).backward()

    def optim_step(self, step: int, reduced: ReducedMetrics) -> StepInfo:
        """Sync, clip, check, step. Non-expert gradients are averaged over all W ranks, experts over their
        EDP group (both / W); each expert shard counts once in the global norm."""
        sync_gradients(self.model, self.pc)  # waits for the buckets the last backward launched
        grad_norm = clip_grad_norm(self.model, self.pc, self.cfg.optim.grad_clip)
        losses = {"loss": reduced.tensor("train/loss"), "aux loss": reduced.tensor("train/aux_loss")}
        if not self.nonfinite.check(step, {**losses, "gradient norm": grad_norm}):  # trainer.nonfinite=skip
            self.optimizer.zero_grad(set_to_none=True)
            return StepInfo(grad_norm, False, {"train/nonfinite_skips": self.nonfinite.skipped})
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepInfo(grad_norm, True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @torch.no_grad()
    def eval_forward(self, tokens_BS: torch.Tensor) -> ModelOutput:
        with self.autocast():
            return self.model(tokens_BS)

    # ------------------------------------------------------------ checkpoint
    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            **native.schedule_meta(self.optimizer, self.scheduler),
            "nonfinite_skips": self.nonfinite.skipped,
        }

    def save_checkpoint(self, tmp: Path, group: Any, asynchronous: bool) -> Future | None:
        return native.save_state(self.model, self.optimizer, self.pc.rank, tmp, group, asynchronous)

    def check_checkpoint(self, path: Path, meta: dict[str, Any]) -> None:
        """Any world size and EP size loads, with or without FSDP (the entries are per global expert, the
        sharded ones resharded by DCP); its param groups must map onto this optimizer's."""
        if meta.get("kind") != "weights":
            native.saved_groups_of(path, meta, self.optimizer)

    def load_checkpoint(self, path: Path, meta: dict[str, Any], group: Any) -> None:
        seed = self.cfg.trainer.seed
        native.load_state(path, meta, self.model, self.optimizer, self.scheduler, self.pc.rank, seed, group)
        self.nonfinite.skipped = int(meta.get("nonfinite_skips", 0))

    def close(self) -> None:
        """Nothing to release."""
