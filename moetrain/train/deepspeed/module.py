"""``engine=deepspeed``: the moetrain model trained through ``deepspeed.initialize``.

The loop, data, routing, balance losses, loss-free bias, evaluation and metrics
are :class:`~moetrain.train.trainer.Trainer`'s; this train module owns what
differs:

- optimizer: moetrain's AdamW param groups with the expert parameters split
  into DeepSpeed's ``moe: True`` groups (``split_params_into_different_moe_groups_for_optimizer``),
  and the warmup + cosine ``LambdaLR``, handed to ``deepspeed.initialize`` as
  client objects. The experts stay sharded by moetrain's EP dispatcher; DeepSpeed
  sees them as its own MoE layers (:mod:`moetrain.train.deepspeed.moe_layers`), so
  ZeRO-1/2 partitions the non-expert state over all W ranks and each expert
  group's state over its expert-data-parallel group, and reduces expert
  gradients over that group only (sum / W, the same scaling as
  the native engine's units, docs/parallelism.md "Gradient scaling").
- forward / backward / step: ``engine(x)``, ``engine.backward(loss)`` (which
  divides by ``gradient_accumulation_steps`` = the micro-batch count, checked
  against the step's micro-batches in :meth:`DeepSpeedTrainModule.micro_batch_context`) and
  ``engine.step()`` after every micro-batch (an update only at the boundary);
  precision (bf16, or fp16 with loss scaling) and clipping are DeepSpeed's.
  One exception: fp32 at ZeRO stage 0, where DeepSpeed clips by the *mean* of
  the ranks' local norms (``runtime.utils.clip_grad_norm_``, wrong once experts
  are sharded), moetrain clips by the true global norm itself
  (:func:`moetrain.parallel.clip_grad_norm`) and DeepSpeed's clipping is off.
- checkpoints: DeepSpeed's files (:mod:`moetrain.train.deepspeed.checkpoint`),
  published by the same manager as the native engine's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moetrain.config import ConfigError, TrainConfig
from moetrain.model.transformer import ModelOutput, Transformer
from moetrain.parallel.clip import clip_grad_norm
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.expert_parallel import use_unfused_dispatch
from moetrain.train.checkpoint import native
from moetrain.train.deepspeed.checkpoint import check_layout, load_files, make_loading_safe, save_files
from moetrain.train.deepspeed.config import build_ds_config, ds_precision
from moetrain.train.guards import NonFiniteGuard
from moetrain.train.metrics import ReducedMetrics
from moetrain.train.module import StepInfo, TrainModule
from moetrain.train.optim import adamw, build_scheduler, group_hyperparameters, param_groups, restart_schedule


def ensure_process_group() -> bool:
    """DeepSpeed needs a process group even on one process: start a 1-rank gloo group if there is none.

    The group lives on an in-process ``HashStore`` (no port, no clash with a launcher's store).
    Returns whether it started one (the caller then destroys it)."""
    os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize asserts it is set
    if dist.is_initialized():
        return False
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return True


def reset_deepspeed_groups() -> None:
    """Forget DeepSpeed's module-level process groups (``deepspeed.utils.groups``, ``deepspeed.comm.cdb``).

    They outlive the process group they were made from; after that group is destroyed, a later
    ``deepspeed.initialize`` in the same process (the Python API called twice, a notebook) would reuse
    dead groups. Called only by the trainer that started the (1-rank) process group itself."""
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups

    for name, value in list(vars(groups).items()):
        if name.startswith("_") and (name.endswith("_GROUP") or name.endswith("_GROUP_RANKS")):
            if isinstance(value, dict):
                value.clear()
            else:
                setattr(groups, name, None)
    groups.mesh_device = None
    ds_comm.cdb = None


def quiet_deepspeed() -> None:
    """DeepSpeed logs every init detail at INFO on every rank; moetrain reports what matters."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def check_fp16_supported() -> None:
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        raise ConfigError(
            f"trainer.precision=fp16: DeepSpeed's {get_accelerator().device_name()} accelerator has no fp16; "
            "use bf16 or fp32"
        )


def check_expert_groups(pc: ParallelContext) -> None:
    """DeepSpeed's EP / EDP groups must be moetrain's (same ranks)."""
    from deepspeed.utils import groups

    from moetrain.train.deepspeed.moe_layers import expert_group_name

    name = expert_group_name(pc.ep_size)
    ep_ranks = dist.get_process_group_ranks(groups._get_expert_parallel_group(name))
    edp_ranks = dist.get_process_group_ranks(groups._get_expert_data_parallel_group(name))
    expected_edp = list(range(pc.ep_rank, pc.world_size, pc.ep_size))
    if sorted(ep_ranks) != pc.ep_ranks or sorted(edp_ranks) != expected_edp:
        raise RuntimeError(
            f"DeepSpeed's expert groups {ep_ranks} / {edp_ranks} differ from moetrain's {pc.ep_ranks} / {expected_edp}"
        )


class DeepSpeedTrainModule(TrainModule):
    """The model trained through ``deepspeed.initialize``: DeepSpeed does the backward, reduction, precision,
    step and checkpoint files; moetrain keeps the data, routing, balance losses, bias updates and metrics."""

    engine = "deepspeed"

    def __init__(self, cfg: TrainConfig, model: Transformer, pc: ParallelContext) -> None:
        quiet_deepspeed()
        super().__init__(cfg, model, pc)
        self.ds: Any = None
        self.set_local_rank = "LOCAL_RANK" not in os.environ  # ensure_process_group sets it; close() unsets
        self.owns_process_group = ensure_process_group()
        try:
            self._initialize()
        except BaseException:
            self.close()
            raise
        self.nonfinite = NonFiniteGuard("stop", 0, pc.is_main)  # validate() allows only nonfinite=stop here

    def _initialize(self) -> None:
        import deepspeed

        from moetrain.train.deepspeed.moe_layers import adopt_experts, split_moe_param_groups

        cfg, pc = self.cfg, self.pc
        ds_config = build_ds_config(cfg, pc.world_size, pc.device.type)
        self.precision = ds_precision(ds_config)
        if self.precision == "fp16":
            check_fp16_supported()
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.clip = float(ds_config.get("gradient_clipping", 0.0) or 0.0)
        # fp32 at stage 0: DeepSpeed's clip_grad_norm_ averages the ranks' local norms; clip here instead.
        self.own_clip = self.precision == "fp32" and self.zero_stage == 0
        if self.own_clip:
            ds_config = {**ds_config, "gradient_clipping": 0.0}
        adopt_experts(self.model, pc.ep_size)
        use_unfused_dispatch(self.model)  # DeepSpeed's module hooks must see the experts' forward
        groups_ = split_moe_param_groups(param_groups(self.model, cfg.optim.weight_decay))
        self.optimizer = adamw(groups_, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.trainer.max_steps)
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        self.ds, _, _, _ = deepspeed.initialize(
            model=self.model,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            config=ds_config,
            dist_init_required=False,
        )
        make_loading_safe(self.ds)
        if self.model.moe_layers() and not self.ds.has_moe_layers:
            raise RuntimeError("DeepSpeed did not pick up the MoE layers (has_moe_layers is false)")
        if self.model.moe_layers():
            check_expert_groups(pc)

    @contextmanager
    def micro_batch_context(self, i: int, n: int) -> Iterator[None]:
        """DeepSpeed's accumulation count must be the step's micro-batches; after each but the last,
        ``engine.step()`` only advances its micro-step count (the last one's, in :meth:`optim_step`, updates)."""
        gas = self.ds.gradient_accumulation_steps()
        if gas != n:
            raise RuntimeError(f"DeepSpeed accumulates {gas} micro-batches, this step has {n}")
        yield
        if 0 <= i < n - 1:  # not the routing pre-pass (i = -1), not the last micro-batch
            self.ds.step()

    def forward(self, tokens_BS: torch.Tensor, **kw: Any) -> ModelOutput:
        return self.ds(tokens_BS, **kw)  # type: ignore[no-any-return]

    def backward(self, loss: torch.Tensor, num_micro: int) -> None:
        """``engine.backward`` scales by 1 / gradient_accumulation_steps (= ``num_micro``) and reduces at the
        accumulation boundary (the last micro-batch)."""
        self.ds.backward(loss)

    def optim_step(self, step: int, reduced: ReducedMetrics) -> StepInfo:
        """``engine.step()`` at the boundary. A non-finite loss (or, when moetrain clips, gradient norm) stops
        the run before the step; fp16 leaves overflows to DeepSpeed's loss scaler, which skips them."""
        norm: torch.Tensor | None = None
        if self.own_clip:  # gradients are reduced by now (engine.backward at the boundary)
            norm = clip_grad_norm(self.model, self.pc, self.clip)
        if self.precision != "fp16":
            self.nonfinite.check(step, {**self.step_losses(reduced), "gradient norm": norm})
        skipped_before = self.ds.skipped_steps
        self.ds.step()
        applied = self.ds.skipped_steps == skipped_before
        if norm is None:
            ds_norm = self.ds.get_global_grad_norm()
            norm = torch.as_tensor(float(ds_norm) if ds_norm is not None else float("nan"))
            if self.precision != "fp16" and ds_norm is not None:  # DeepSpeed clipped: its norm comes after
                self.nonfinite.check(step, {"gradient norm": norm})
        extra: dict[str, Any] = {}
        if self.precision == "fp16":
            opt = self.ds.optimizer
            extra["train/loss_scale"] = float(getattr(opt, "cur_scale", None) or opt.loss_scale)
            extra["train/skipped_steps"] = int(self.ds.skipped_steps)
        return StepInfo(norm.detach().float(), applied, extra)

    # ------------------------------------------------------------ checkpoint
    def checkpoint_meta(self) -> dict[str, Any]:
        import deepspeed

        return {
            "engine": self.engine,
            **native.schedule_meta(self.optimizer, self.scheduler),
            "nonfinite_skips": 0,
            "zero_stage": self.zero_stage,
            "precision": self.precision,
            "deepspeed_version": deepspeed.__version__,
        }

    def save_checkpoint(self, tmp: Path, group: Any, asynchronous: bool) -> Future | None:
        save_files(self.ds, tmp, self.pc.rank)  # validate() refuses checkpoint.async_save with DeepSpeed
        return None

    def check_checkpoint(self, path: Path, meta: dict[str, Any]) -> None:
        check_layout(path, meta, self.pc.world_size, self.cfg.parallel.ep, self.zero_stage)

    def load_checkpoint(self, path: Path, meta: dict[str, Any], group: Any) -> None:
        """DeepSpeed's files, then this run's hyperparameters and LR schedule at the restored position (DeepSpeed
        restores the saved ones: an ``optim.*`` change allowed on resume would otherwise not take effect)."""
        fresh = group_hyperparameters(self.optimizer)
        load_files(self.ds, path, self.pc.rank)
        restart_schedule(self.optimizer, self.scheduler, int(self.scheduler.last_epoch), fresh)

    def close(self) -> None:
        if self.ds is not None:
            self.ds.destroy()
            self.ds = None
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            reset_deepspeed_groups()
            self.owns_process_group = False
        if self.set_local_rank:  # leave the environment as it was (the Python API, a notebook)
            os.environ.pop("LOCAL_RANK", None)
            self.set_local_rank = False
