"""Values that follow the world a run starts in, when the config leaves them unset: the micro-batch (each
rank's share of the global batch) and torch's thread count (the CPUs this process may use, shared by the
ranks on its node). ``trainer.micro_batch_size`` and ``trainer.num_threads`` override them."""

from __future__ import annotations

import dataclasses

from moetrain.config.errors import ConfigError
from moetrain.config.run import TrainConfig, TrainerConfig


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as ``taskset`` / SLURM's cgroup set it)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS has no affinity masks
        return os.cpu_count() or 1


def default_threads(local_world_size: int = 1) -> int:
    """Threads for torch when ``trainer.num_threads`` is unset: the CPUs this process may use, shared by the
    ranks on this node, at least 1. torch's own default counts the machine's cores, not the ones the process
    may use: on a shared 2-core slice of a large machine it oversubscribes them (issue 31: 34 s instead of 7 s).
    ``OMP_NUM_THREADS``, when set to a positive count, wins (as it does for torch itself; ``torchrun`` sets it to
    1 for several ranks): a user's or launcher's explicit choice is kept."""
    import os

    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return max(1, usable_cpus() // max(local_world_size, 1))


PIPELINE_MICRO_BATCHES_PER_STAGE = 4
"""The default micro-batch under pipeline parallelism aims at this many micro-batches per stage and step: the
1F1B bubble (p-1)/(m+p-1) is then under 1/5 for any p (Narayanan et al. 2021, arXiv 2104.04473, sec. 2.2:
m >> p keeps the bubble small)."""


def micro_batch_for(t: TrainerConfig, world_size: int, pp: int = 1) -> int:
    """``trainer.micro_batch_size``, or when unset: without pipeline parallelism the rank's share of the global
    batch (global / world size: ``world_size`` is the data-parallel ranks, one per pipeline under PP); with
    ``pp > 1`` stages, :func:`pipeline_micro_batch` of the pipeline's share. Raises :class:`ConfigError` naming
    the keys when the global batch does not split over the ranks."""
    if t.micro_batch_size is not None:
        return t.micro_batch_size
    if t.global_batch_size > 0 and t.global_batch_size % world_size:
        raise ConfigError(
            f"trainer.global_batch_size={t.global_batch_size}: must be divisible by the world size={world_size} "
            f"(each rank takes an equal share); use a multiple of {world_size}"
        )
    share = max(t.global_batch_size // world_size, 1)
    return share if pp <= 1 else pipeline_micro_batch(share, pp)


def pipeline_micro_batch(share: int, pp: int) -> int:
    """The largest micro-batch that splits a pipeline's ``share`` of sequences into a multiple of ``pp``
    micro-batches (what every schedule of docs/pipeline.md can run), at least
    :data:`PIPELINE_MICRO_BATCHES_PER_STAGE` per stage; 1 (the most micro-batches) when none does."""
    for micro in range(share, 0, -1):
        m = share // micro
        if share % micro == 0 and m % pp == 0 and m >= PIPELINE_MICRO_BATCHES_PER_STAGE * pp:
            return micro
    return 1


def with_micro_batch(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """``cfg`` with ``trainer.micro_batch_size`` resolved (:func:`micro_batch_for` over the ``world_size /
    parallel.pp`` data-parallel ranks, ``world_size`` counting every rank); ``cfg`` itself when set."""
    if cfg.trainer.micro_batch_size is not None:
        return cfg
    pp = max(cfg.parallel.pp, 1)
    micro = micro_batch_for(cfg.trainer, max(world_size // pp, 1), pp)
    trainer = dataclasses.replace(cfg.trainer, micro_batch_size=micro)
    return dataclasses.replace(cfg, trainer=trainer)
