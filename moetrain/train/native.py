"""moetrain's own engine as a train module (see :mod:`moetrain.train.module` for the base class)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch

from moetrain.config import TrainConfig
from moetrain.model.transformer import ModelOutput, Transformer
from moetrain.parallel.clip import clip_grad_norm
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.data_parallel import apply_data_parallel, set_micro_batch_sync
from moetrain.train.checkpoint import native
from moetrain.train.guards import NonFiniteGuard
from moetrain.train.metrics import ReducedMetrics
from moetrain.train.module import StepInfo, TrainModule, autocast_dtype
from moetrain.train.optim import build_optimizer, build_scheduler


class NativeTrainModule(TrainModule):
    """moetrain's own engine: AdamW with decay on matrices, warmup + cosine, DP/EDP gradient reduction by FSDP2
    units (``replicate``, or ``fully_shard`` under ``parallel.fsdp``: :mod:`moetrain.parallel.data_parallel`,
    overlapped with the backward, only in the last micro-batch's), global-norm clipping, bf16 autocast (fp32
    router), ``trainer.nonfinite``; checkpoints as resharding DCP shards."""

    engine = "native"

    def __init__(self, cfg: TrainConfig, model: Transformer, pc: ParallelContext) -> None:
        super().__init__(cfg, model, pc)
        self.dtype = autocast_dtype(cfg.trainer.precision, pc.device)
        shard = cfg.parallel.fsdp  # fully_shard gathers bf16 weights on a GPU (FSDP2's policy), replicate keeps fp32
        param_dtype = self.dtype if shard and pc.device.type == "cuda" else None
        self.apply_data_parallel(shard, param_dtype)  # before the optimizer: DTensors
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.trainer.max_steps)
        self.nonfinite = NonFiniteGuard(cfg.trainer.nonfinite, cfg.trainer.nonfinite_max_skips, pc.is_main)
        self.reduce_every_micro_batch = cfg.parallel.fsdp and not cfg.parallel.fsdp_keep_gathered

    @property
    def dp_pc(self) -> ParallelContext:
        """The context data parallelism and the gradient norm run over (the stage's under pipeline parallelism)."""
        return self.pc

    def apply_data_parallel(self, shard: bool, param_dtype: torch.dtype | None) -> None:
        """The model's FSDP2 units (:func:`~moetrain.parallel.data_parallel.apply_data_parallel`)."""
        apply_data_parallel(self.model, self.pc, shard=shard, param_dtype=param_dtype)

    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype is None:
            return torch.autocast(self.pc.device.type, enabled=False)
        return torch.autocast(self.pc.device.type, dtype=self.dtype)

    @contextmanager
    def micro_batch_context(self, i: int, n: int) -> Iterator[None]:
        """Only the last micro-batch's backward reduces the gradients (and, under ``fully_shard``, the weights
        stay gathered until then), unless ``parallel.fsdp_keep_gathered=false`` reshards and reduces after every
        one (:func:`~moetrain.parallel.data_parallel.set_micro_batch_sync`)."""
        if not self.reduce_every_micro_batch:
            set_micro_batch_sync(self.model, last=i == n - 1)
        yield

    def forward(self, tokens_BS: torch.Tensor, **kw: Any) -> ModelOutput:
        return self.model(tokens_BS, **kw)

    def backward(self, loss: torch.Tensor, num_micro: int) -> None:
        (loss / num_micro).backward()

    def optim_step(self, step: int, reduced: ReducedMetrics) -> StepInfo:
        """Clip, check, step: the gradients were reduced in the last backward (non-expert ones averaged over all
        W ranks, experts summed over their EDP group, both / W); each expert shard counts once in the norm."""
        grad_norm = clip_grad_norm(self.model, self.dp_pc, self.cfg.optim.grad_clip)
        if not self.nonfinite.check(step, {**self.step_losses(reduced), "gradient norm": grad_norm}):
            self.optimizer.zero_grad(set_to_none=True)  # trainer.nonfinite=skip
            return StepInfo(grad_norm, False, {"train/nonfinite_skips": self.nonfinite.skipped})
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepInfo(grad_norm, True)

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
