"""``engine=deepspeed``: the moetrain model trained through ``deepspeed.initialize``.

The loop, data, routing, balance losses, loss-free bias, evaluation and metrics
are :class:`~moetrain.train.trainer.Trainer`'s; this module swaps its five engine
hooks:

- optimizer: moetrain's AdamW param groups with the expert parameters split
  into DeepSpeed's ``moe: True`` groups (``split_params_into_different_moe_groups_for_optimizer``),
  and the warmup + cosine ``LambdaLR``, handed to ``deepspeed.initialize`` as
  client objects. The experts stay sharded by moetrain's EP dispatcher; DeepSpeed
  sees them as its own MoE layers (:mod:`moetrain.parallel.deepspeed_moe`), so
  ZeRO-1/2 partitions the non-expert state over all W ranks and each expert
  group's state over its expert-data-parallel group, and reduces expert
  gradients over that group only (sum / W, the same scaling as
  :func:`moetrain.parallel.sync_gradients`).
- forward / backward / step: ``engine(x)``, ``engine.backward(loss)`` (which
  divides by ``gradient_accumulation_steps`` = the micro-batch count) and
  ``engine.step()`` after every micro-batch (an update only at the boundary);
  precision (bf16, or fp16 with loss scaling) and clipping are DeepSpeed's.
  One exception: fp32 at ZeRO stage 0, where DeepSpeed clips by the *mean* of
  the ranks' local norms (``runtime.utils.clip_grad_norm_``, wrong once experts
  are sharded), moetrain clips by the true global norm itself
  (:func:`moetrain.parallel.clip_grad_norm`) and DeepSpeed's clipping is off.
- checkpoints: ``engine.save_checkpoint`` / ``engine.load_checkpoint`` into
  ``checkpoints/step_NNNNNN`` (the same publish-by-rename and ``meta.json`` as the
  native engine, so ``trainer.resume=auto`` and pruning work alike), with
  DeepSpeed's per-expert files indexed by global expert, ZeRO optimizer shards,
  the scheduler, and moetrain's loader position and per-rank RNG.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moetrain.config import ConfigError, TrainConfig
from moetrain.model.transformer import ModelOutput
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.grad_sync import clip_grad_norm
from moetrain.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    _one_line,
    arch_of,
    check_arch,
    check_engine,
    read_meta,
    rng_entries,
    set_rng,
    verify_checkpoint,
)
from moetrain.train.ds_config import build_ds_config, ds_precision
from moetrain.train.optim import adamw, build_scheduler, param_groups
from moetrain.train.trainer import Trainer


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


def ds_safe_globals() -> list[Any]:
    """The plain-data DeepSpeed classes its checkpoint files pickle (ZeRO optimizer states): the only
    non-torch globals the weights-only unpickler admits. Their construction runs no code of the file's."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` as DeepSpeed's checkpoint engine calls it, but ``weights_only=True``: a file that
    pickles anything else (code) is refused with one line naming it, never executed."""
    try:
        with torch.serialization.safe_globals(ds_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the save of this checkpoint did not complete") from None
    except Exception as e:
        raise CheckpointError(f"{path}: refused, not plain tensor data ({_one_line(e)})") from None


def make_loading_safe(engine: Any) -> None:
    """Route every file DeepSpeed's engine loads (model, expert and ZeRO optimizer states) through
    :func:`safe_torch_load`; DeepSpeed's own loader unpickles with ``weights_only=False``."""
    engine.checkpoint_engine.load = safe_torch_load


def quiet_deepspeed() -> None:
    """DeepSpeed logs every init detail at INFO on every rank; moetrain reports what matters."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


class DeepSpeedTrainer(Trainer):
    """:class:`Trainer` with DeepSpeed's engine doing the backward, reduction, precision, step and checkpoints."""

    engine: Any

    def __init__(self, cfg: TrainConfig, run_dir: Path, pc: ParallelContext | None = None) -> None:
        quiet_deepspeed()
        self._owns_process_group = ensure_process_group()
        try:
            super().__init__(cfg, run_dir, pc)
        except BaseException:
            self.close()
            raise
        self.autocast_dtype = None  # DeepSpeed casts the weights itself (bf16 / fp16); no autocast on top

    # ------------------------------------------------------------------ hooks
    def _build_optimizer(self) -> None:
        import deepspeed
        from deepspeed.utils import groups

        from moetrain.parallel.deepspeed_moe import adopt_experts, expert_group_name, split_moe_param_groups

        cfg, pc = self.cfg, self.pc
        ds_config = build_ds_config(cfg, pc.world_size, self.device.type)
        self.precision = ds_precision(ds_config)
        if self.precision == "fp16":
            from deepspeed.accelerator import get_accelerator

            if not get_accelerator().is_fp16_supported():
                raise ConfigError(
                    f"trainer.precision=fp16: DeepSpeed's {get_accelerator().device_name()} accelerator has no fp16; "
                    "use bf16 or fp32"
                )
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.clip = float(ds_config.get("gradient_clipping", 0.0) or 0.0)
        # fp32 at stage 0: DeepSpeed's clip_grad_norm_ averages the ranks' local norms; clip here instead.
        self.own_clip = self.precision == "fp32" and self.zero_stage == 0
        if self.own_clip:
            ds_config = {**ds_config, "gradient_clipping": 0.0}

        adopt_experts(self.model, pc.ep_size)
        groups_ = split_moe_param_groups(param_groups(self.model, cfg.optim.weight_decay))
        self.optimizer = adamw(groups_, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.trainer.max_steps)
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            config=ds_config,
            dist_init_required=False,
        )
        make_loading_safe(self.engine)
        if self.model.moe_layers() and not self.engine.has_moe_layers:
            raise RuntimeError("DeepSpeed did not pick up the MoE layers (has_moe_layers is false)")
        if self.model.moe_layers():  # DeepSpeed's EP / EDP groups must be moetrain's (same ranks)
            name = expert_group_name(pc.ep_size)
            ep_ranks = dist.get_process_group_ranks(groups._get_expert_parallel_group(name))
            edp_ranks = dist.get_process_group_ranks(groups._get_expert_data_parallel_group(name))
            expected_edp = list(range(pc.ep_rank, pc.world_size, pc.ep_size))
            if sorted(ep_ranks) != pc.ep_ranks or sorted(edp_ranks) != expected_edp:
                raise RuntimeError(
                    f"DeepSpeed's expert groups {ep_ranks} / {edp_ranks} differ from moetrain's "
                    f"{pc.ep_ranks} / {expected_edp}"
                )

    def _build_checkpointer(self) -> Checkpointer:
        return DeepSpeedCheckpointer(self)

    def _forward(self, tokens_BS: torch.Tensor) -> ModelOutput:
        return self.engine(tokens_BS)

    def _backward(self, loss: torch.Tensor, num_micro: int) -> None:
        """``engine.backward`` scales by 1 / gradient_accumulation_steps (= ``num_micro``) and reduces at the
        boundary; ``engine.step()`` after a non-final micro-batch only advances DeepSpeed's micro-step count."""
        gas = self.engine.gradient_accumulation_steps()
        if gas != num_micro:
            raise RuntimeError(f"DeepSpeed accumulates {gas} micro-batches, this step has {num_micro}")
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def _optimizer_step(self, losses: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any], bool]:
        """``engine.step()`` at the boundary. A non-finite loss (or, when moetrain clips, gradient norm) stops
        the run before the step; fp16 leaves overflows to DeepSpeed's loss scaler, which skips them."""
        norm: torch.Tensor | None = None
        if self.own_clip:  # gradients are reduced by now (engine.backward at the boundary)
            norm = clip_grad_norm(self.model, self.pc, self.clip)
        if self.precision != "fp16":
            self.nonfinite.check(
                self.step + 1, {"loss": losses[0], "aux loss": losses[1], "gradient norm": norm}
            )  # validate() allows only nonfinite=stop here
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        applied = self.engine.skipped_steps == skipped_before
        if norm is None:
            ds_norm = self.engine.get_global_grad_norm()
            norm = torch.as_tensor(float(ds_norm) if ds_norm is not None else float("nan"))
            if self.precision != "fp16" and ds_norm is not None:  # DeepSpeed clipped: its norm comes after
                self.nonfinite.check(self.step + 1, {"gradient norm": norm})
        extra: dict[str, Any] = {}
        if self.precision == "fp16":
            opt = self.engine.optimizer
            extra["train/loss_scale"] = float(getattr(opt, "cur_scale", None) or opt.loss_scale)
            extra["train/skipped_steps"] = int(self.engine.skipped_steps)
        return norm.detach().float(), extra, applied

    def close(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.destroy()
            self.engine = None
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            reset_deepspeed_groups()
            self._owns_process_group = False


class DeepSpeedCheckpointer(Checkpointer):
    """``engine.save_checkpoint`` / ``engine.load_checkpoint``, published like the native checkpoints.

    A save writes DeepSpeed's files with tag ``step_NNNNNN.tmp``, each rank's RNG
    state next to them, then :meth:`Checkpointer._publish` writes ``meta.json``
    and renames the directory: an interrupted save is never resumed from.
    DeepSpeed's ZeRO shards and expert files belong to one layout, so resuming
    needs the same world size, ``parallel.ep`` and ZeRO stage (the native engine
    reshards).
    """

    trainer: DeepSpeedTrainer

    def meta(self) -> dict[str, Any]:
        import deepspeed

        tr = self.trainer
        return {
            **super().meta(),
            "engine": "deepspeed",
            "zero_stage": tr.zero_stage,
            "precision": tr.precision,
            "deepspeed_version": deepspeed.__version__,
        }

    def save(self) -> Path:
        tr = self.trainer
        self.check_finite()
        self.last_saved_step = tr.step
        tmp, final = self._staging_dirs()
        tr.engine.save_checkpoint(str(self.dir), tag=tmp.name, save_latest=False)
        torch.save(rng_entries(self.pc.rank), tmp / f"rng_rank_{self.pc.rank}.pt")
        self._publish(tmp, final, self.meta())
        return final

    def load(self, path: Path) -> None:
        tr = self.trainer
        meta = read_meta(path)
        check_engine(path, meta, "deepspeed")
        check_arch(path, meta, arch_of(tr.cfg, tr.model.vocab_size))
        saved = (meta.get("world_size"), meta.get("ep"), meta.get("zero_stage"))
        now = (self.pc.world_size, tr.cfg.parallel.ep, tr.zero_stage)
        if saved != now:
            raise CheckpointError(
                f"{path}: saved with world size {saved[0]}, parallel.ep={saved[1]}, engine.zero_stage={saved[2]}; "
                f"this run has {now[0]}, {now[1]}, {now[2]} (DeepSpeed's ZeRO and expert files need the same layout)"
            )
        verify_checkpoint(path, meta, self.pc.rank, self.pc.world_size, self.group, self.distributed)
        make_loading_safe(tr.engine)
        try:
            loaded, _ = tr.engine.load_checkpoint(
                str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except CheckpointError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, AssertionError) as e:
            raise CheckpointError(f"{path}: DeepSpeed could not load it ({_one_line(e)})") from None
        if loaded is None:
            raise CheckpointError(f"{path}: DeepSpeed found no checkpoint files in it")
        self._restore_progress(meta)
        rng_file = path / f"rng_rank_{self.pc.rank}.pt"
        if not rng_file.is_file():
            raise CheckpointError(f"{rng_file}: missing; the save of this checkpoint did not complete")
        set_rng(safe_torch_load(rng_file), self.pc.rank)
