"""The checkpoint manager: when to save, staging and publishing, resuming; over the parts that hold state.

It knows no Trainer. A checkpoint is assembled from

* the **engine's state** (the :class:`~moetrain.train.module.TrainModule`, which owns it): its own files in
  the staging directory (DCP shards of model, optimizer and RNG for the native
  engine; DeepSpeed's files for ``engine=deepspeed``) and its ``meta.json``
  fields (scheduler, param groups, ...);
* the **loop's state** (:class:`LoopState`): JSON fields only (step, tokens seen,
  loader position, skipped steps);
* the run's identity: ``arch`` (the tensors' shapes), the resolved config, the
  world, EP and pipeline sizes (for the record: any layout loads, the names are global).
"""

from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from moetrain.config import CheckpointConfig, TrainConfig, to_dict
from moetrain.parallel.context import ParallelContext
from moetrain.train import hooks
from moetrain.train.checkpoint.compat import check_arch, check_engine, resume_target
from moetrain.train.checkpoint.entries import reseed_rank
from moetrain.train.checkpoint.layout import (
    FORMAT_VERSION,
    CheckpointError,
    agree,
    checkpoint_name,
    hash_share,
    prune,
    read_meta,
    truncate_metrics,
    verify_checkpoint,
    write_meta_and_publish,
)
from moetrain.train.checkpoint.sharded import local_tensor
from moetrain.train.guards import NonFiniteError, all_finite

if TYPE_CHECKING:
    from moetrain.train.module import TrainModule


class LoopState(Protocol):
    """JSON-only state of the loop (step, tokens, loader position): the Trainer's
    :class:`~moetrain.train.trainer.Progress`."""

    step: int

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointManager:
    """Saves on schedule and at the end, publishes atomically, prunes, and resumes.

    ``group`` and ``control_group`` are CPU gloo groups of their own: asynchronous
    saves run collectives from a background thread that must not interleave with
    the training ones, and the per-step stop vote may run while a save uses ``group``.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        pc: ParallelContext,
        engine: TrainModule,
        progress: LoopState,
        arch: dict[str, Any],
    ) -> None:
        self.run_cfg = cfg
        self.cfg: CheckpointConfig = cfg.checkpoint
        self.run_dir = Path(run_dir)
        self.dir = Path(self.cfg.dir) if self.cfg.dir else self.run_dir / "checkpoints"
        self.pc = pc
        self.engine = engine
        self.progress = progress
        self.arch = arch
        self.group = pc.host_group("checkpoint")
        self.control_group = pc.host_group("control")
        self.distributed = self.group is not None
        self._pending: tuple[Future, Path, Path, dict[str, Any]] | None = None
        self.resumed_from: Path | None = None
        self.last_saved_step: int | None = None

    # ----------------------------------------------------------------- save
    def meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "world_size": self.pc.world_size,
            "ep": self.run_cfg.parallel.ep,
            "pp": self.run_cfg.parallel.pp,
            **self.progress.state_dict(),
            **self.engine.checkpoint_meta(),
            "arch": self.arch,
            "config": to_dict(self.run_cfg),
            "time": time.time(),
        }

    def check_finite(self) -> None:
        """Refuse to save non-finite weights (:class:`NonFiniteError` on every rank if any rank has one)."""
        error = None
        if not all_finite([local_tensor(t) for t in self.engine.model.state_dict().values()]):  # FSDP: each its shard
            error = (
                f"step {self.progress.step}: the weights hold NaN or inf on rank {self.pc.rank}; "
                "this checkpoint is not written (the newest finite one is kept)"
            )
        agree(error, self.group, self.distributed, NonFiniteError)

    def save(self) -> Path:
        """Write a checkpoint of the current step (asynchronously when ``checkpoint.async_save``)."""
        self.wait()
        self.check_finite()
        self.last_saved_step = self.progress.step
        tmp, final = self._staging_dirs()
        meta = self.meta()
        try:
            future = self.engine.save_checkpoint(tmp, self.group, self.cfg.async_save)
        except BaseException:  # e.g. DCP's CheckpointException around an ENOSPC: give the space back
            self._discard(tmp)
            raise
        if future is not None:
            self._pending = (future, tmp, final, meta)
        else:
            self._publish(tmp, final, meta)
        return final

    def save_for_stop(self) -> Path | None:
        """A checkpoint of the current step before the run stops (none if one was just saved, or disabled)."""
        if not self.cfg.enabled:
            return None
        self.wait()
        if self.last_saved_step != self.progress.step:
            self.save()
            self.wait()
        return self.dir / checkpoint_name(self.progress.step)

    def after_step(self, is_last: bool) -> None:
        """Save on schedule and at the end."""
        step = self.progress.step
        if self.cfg.enabled and ((self.cfg.every and step % self.cfg.every == 0) or is_last):
            self.save()
        if is_last:
            self.wait()

    def wait(self) -> None:
        """Finish (and publish) an asynchronous save in flight."""
        if self._pending is None:
            return
        future, tmp, final, meta = self._pending
        self._pending = None
        try:
            result = future.result()
            if hasattr(result, "upload_completion"):  # AsyncSaveResponse
                result.upload_completion.result()
        except BaseException:
            self._discard(tmp)
            raise
        self._publish(tmp, final, meta)

    def _discard(self, tmp: Path) -> None:
        """Remove the staging dir of a save that failed (every rank's DCP write has ended: DCP gathers the
        failures before raising); the published checkpoints are untouched."""
        if self.pc.is_main:
            shutil.rmtree(tmp, ignore_errors=True)

    def _staging_dirs(self) -> tuple[Path, Path]:
        """``(step_N.tmp, step_N)`` of the current step, both cleared by rank 0, then a barrier."""
        final = self.dir / checkpoint_name(self.progress.step)
        tmp = self.dir / (final.name + ".tmp")
        if self.pc.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            if final.exists():  # re-saving a step (e.g. a run that ended there is extended)
                shutil.rmtree(final)
        self._barrier()
        return tmp, final

    def _publish(self, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        """Every rank's files on disk, the ranks hash a share each, rank 0 writes ``meta.json`` and renames."""
        rank, world = self.pc.rank, self.pc.world_size
        hooks.fire("before_publish", step=meta["step"], rank=rank, world_size=world)
        self._barrier()
        share = hash_share(tmp, rank, world)
        shares: list[Any] = [share]
        if self.distributed:
            import torch.distributed as dist

            shares = [None] * world
            dist.all_gather_object(shares, share, group=self.group)
        meta = {**meta, "files": {k: v for share in shares for k, v in share.items()}}
        if self.pc.is_main:
            write_meta_and_publish(tmp, final, meta)
            prune(self.dir, self.cfg.keep_last)
        self._barrier()

    def _barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    # --------------------------------------------------------------- resume
    def find_resume(self) -> Path | None:
        """The checkpoint ``trainer.resume`` asks for (rank 0 decides; every rank gets the same)."""
        found: str | None = None
        error: str | None = None
        if self.pc.is_main:
            try:
                target = resume_target(self.run_cfg, self.dir)
                found = str(target) if target else None
            except CheckpointError as e:
                error = str(e)
        found, error = self.pc.broadcast_object((found, error))  # type: ignore[misc]
        if error:
            raise CheckpointError(error)
        return Path(found) if found else None

    def resume(self) -> int | None:
        """Restore the newest/requested checkpoint; returns its step (``None`` = fresh start)."""
        if self.pc.is_main and self.dir.is_dir():
            for stale in self.dir.glob("step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        path = self.find_resume()
        metrics = self.run_dir / "metrics.jsonl"
        if path is None:
            if self.pc.is_main and self.run_cfg.trainer.resume == "auto":
                truncate_metrics(metrics, -1)  # an attempt that died before its first checkpoint: redone
            return None
        self.load(path)
        self.resumed_from = path
        if self.pc.is_main:
            logging.getLogger("moetrain").info(f"moetrain: resumed from {path} at step {self.progress.step}")
            truncate_metrics(metrics, self.progress.step)
        self.pc.barrier()
        return self.progress.step

    def load(self, path: Path) -> None:
        """Validate (meta, engine, architecture, checksums), then restore the engine's state and the progress."""
        meta = read_meta(path)
        check_engine(path, meta, self.engine.engine)
        check_arch(path, meta, self.arch)
        self.engine.check_checkpoint(path, meta)
        verify_checkpoint(path, meta, self.pc.rank, self.pc.world_size, self.group, self.distributed)
        self.engine.load_checkpoint(path, meta, self.group)
        if meta.get("kind") != "weights":  # an import (moetrain-export --from-hf) starts at step 0
            self.progress.load_state_dict(meta)
            saved_seed = meta["config"].get("trainer", {}).get("seed")
            if saved_seed != self.run_cfg.trainer.seed:  # allowed by trainer.resume_allow_changes: in force now
                reseed_rank(self.run_cfg.trainer.seed, self.progress.step, self.pc.rank)
