"""Pipeline parallelism on ``torch.distributed.pipelining``: the stage split rule, which stages a rank holds, the
schedule, and the bubble each schedule implies. Pure functions except :func:`build_schedule`.

The stage modules themselves (meta-device build, the aux-loss autoscaler) are in
:mod:`moetrain.parallel.pipeline_stage`. The design follows torchtitan's (``pipeline_llm``: one module per stage
keeping the model's parameter names, ``build_pipeline_schedule``: one schedule class per name, a list of
stages for the multi-stage schedules); see docs/pipeline.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed.pipelining as pipelining

from moetrain.config import ConfigError


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: blocks ``[first, last)`` and whether it holds the embedding or the final norm and head."""

    index: int
    first: int
    last: int
    embedding: bool
    head: bool

    @property
    def blocks(self) -> range:
        return range(self.first, self.last)


@dataclass(frozen=True)
class ScheduleInfo:
    """A ``parallel.pp_schedule`` name: torch's class, its stages per rank and their placement, and its bubble."""

    class_name: str
    stages_per_rank: int | None
    """``None``: one stage (single-stage schedules); else a fixed count, or ``0`` for ``pp_virtual`` stages."""
    style: str
    """``loop`` (rank r holds stages r, r + P, ...) or ``v`` (rank r holds stages r and 2P - 1 - r)."""
    bubble: Callable[[int, int, int], float]
    """``bubble(p, m, v)``: the idle fraction of the step (:func:`bubble_fraction`)."""


def _bubble_1f1b(p: int, m: int, v: int) -> float:
    # Narayanan et al. 2021 (arXiv 2104.04473) sec. 2.2.1: bubble time (p-1)(tf+tb) next to m(tf+tb) of work,
    # the same for GPipe (Huang et al. 2019) and 1F1B (PipeDream-Flush).
    return (p - 1) / (m + p - 1)


def _bubble_interleaved(p: int, m: int, v: int) -> float:
    # Narayanan et al. 2021 sec. 2.2.2: with v model chunks per device the bubble shrinks v-fold, (p-1)/v chunks
    # of (tf+tb) next to m of them.
    return (p - 1) / (v * m + p - 1)


def _bubble_zero_bubble(p: int, m: int, v: int) -> float:
    # Qi et al. 2023, Zero Bubble Pipeline Parallelism (arXiv 2401.10241) sec. 3.1: splitting the backward into
    # B (input grad) and W (weight grad), ZB-H1's bubble is (p-1)(tF + tB - tW) against m(tF + tB + tW) of work;
    # with tF = tB = tW (the paper's reading) that is (p-1) / (3m + p-1), a third of 1F1B's. Interleaving v
    # chunks divides it by v as in Narayanan et al. 2021. A lower bound: tW < tB makes it larger.
    return (p - 1) / (3 * v * m + p - 1)


SCHEDULES: dict[str, ScheduleInfo] = {
    "gpipe": ScheduleInfo("ScheduleGPipe", None, "loop", _bubble_1f1b),
    "1f1b": ScheduleInfo("Schedule1F1B", None, "loop", _bubble_1f1b),
    "interleaved_1f1b": ScheduleInfo("ScheduleInterleaved1F1B", 0, "loop", _bubble_interleaved),
    "interleaved_zero_bubble": ScheduleInfo("ScheduleInterleavedZeroBubble", 0, "loop", _bubble_zero_bubble),
    "zbv": ScheduleInfo("ScheduleZBVZeroBubble", 2, "v", _bubble_zero_bubble),
}
"""``parallel.pp_schedule`` names. Those whose class the installed torch lacks are refused by
:func:`check_schedule` (:func:`available_schedules`)."""


def available_schedules() -> list[str]:
    """The :data:`SCHEDULES` names whose class the installed ``torch.distributed.pipelining`` has."""
    return [name for name, info in SCHEDULES.items() if hasattr(pipelining, info.class_name)]


def check_schedule(name: str) -> ScheduleInfo:
    """The :class:`ScheduleInfo` of ``name``, or one :class:`~moetrain.config.ConfigError` line."""
    if name not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule={name!r}: not one of {', '.join(SCHEDULES)}")
    if name not in available_schedules():
        raise ConfigError(
            f"parallel.pp_schedule={name!r}: this torch has no {SCHEDULES[name].class_name} "
            f"(available: {', '.join(available_schedules())})"
        )
    return SCHEDULES[name]


def stages_per_rank(schedule: str, virtual: int) -> int:
    """How many stages each rank holds under ``schedule`` (``virtual``: ``parallel.pp_virtual``)."""
    info = check_schedule(schedule)
    if info.stages_per_rank is None:
        return 1
    if info.stages_per_rank == 0:
        if virtual < 2:
            raise ConfigError(f"parallel.pp_virtual={virtual}: {schedule} needs at least 2 stages per rank")
        return virtual
    return info.stages_per_rank


def bubble_fraction(schedule: str, pp: int, microbatches: int, virtual: int = 1) -> float:
    """The fraction of a step each pipeline rank idles under ``schedule`` with ``pp`` ranks, ``microbatches``
    micro-batches and ``virtual`` stages per rank, assuming equal stages (formulas at :data:`SCHEDULES`)."""
    if pp < 1 or microbatches < 1 or virtual < 1:
        raise ValueError(f"bubble_fraction: pp={pp}, microbatches={microbatches}, virtual={virtual} must be >= 1")
    return SCHEDULES[schedule].bubble(pp, microbatches, virtual)


def stage_ids(pp_rank: int, pp: int, n_per_rank: int, style: str = "loop") -> list[int]:
    """The stage indices rank ``pp_rank`` holds: ``loop`` r, r + P, r + 2P, ... (interleaved 1F1B); ``v``
    r and 2P - 1 - r (the V shape of ZBV, Qi et al. 2024, arXiv 2405.15362)."""
    if style == "v":
        if n_per_rank != 2:
            raise ValueError(f"stage_ids: the v style has 2 stages per rank, not {n_per_rank}")
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(n_per_rank)]


def default_split(n_layers: int, n_stages: int) -> list[int]:
    """Blocks per stage, as even as possible; the stages nearest the middle take the remainder, since the first
    holds the embedding and the last the norm and the LM head."""
    if n_stages > n_layers:
        raise ConfigError(f"parallel.pp: {n_stages} stages for {n_layers} blocks (model.n_layers); use fewer stages")
    base, extra = divmod(n_layers, n_stages)
    middle = (n_stages - 1) / 2
    by_centre = sorted(range(n_stages), key=lambda s: (abs(s - middle), s))
    plus = set(by_centre[:extra])
    return [base + (s in plus) for s in range(n_stages)]


def parse_split(rule: str, n_layers: int, n_stages: int) -> list[int]:
    """Blocks per stage from ``parallel.pp_layers`` (``"embedding+3,4,4,3+head"``: one count per stage, the
    first prefixed ``embedding+``, the last suffixed ``+head``); one :class:`ConfigError` line if it does not
    name ``n_stages`` stages covering all ``n_layers`` blocks."""
    key = f"parallel.pp_layers={rule!r}"
    parts = [p.strip() for p in rule.split(",")]
    if len(parts) != n_stages:
        raise ConfigError(f"{key}: {len(parts)} stages, the layout has {n_stages}")
    if not parts[0].startswith("embedding+") or not parts[-1].endswith("+head"):
        raise ConfigError(f"{key}: the first stage must start 'embedding+' and the last end '+head'")
    parts[0], parts[-1] = parts[0].removeprefix("embedding+"), parts[-1].removesuffix("+head")
    if n_stages == 1:
        parts = [rule.strip().removeprefix("embedding+").removesuffix("+head")]
    if not all(p.isdigit() for p in parts):
        raise ConfigError(f"{key}: each stage must be a count of blocks")
    counts = [int(p) for p in parts]
    if sum(counts) != n_layers:
        raise ConfigError(f"{key}: {sum(counts)} blocks, the model has {n_layers} (model.n_layers)")
    return counts


def stage_specs(n_layers: int, n_stages: int, rule: str | None = None) -> list[StageSpec]:
    """All stages of the pipeline, from ``rule`` (:func:`parse_split`) or :func:`default_split`."""
    counts = parse_split(rule, n_layers, n_stages) if rule else default_split(n_layers, n_stages)
    specs, first = [], 0
    for s, n in enumerate(counts):
        specs.append(StageSpec(s, first, first + n, embedding=s == 0, head=s == n_stages - 1))
        first += n
    return specs


def build_schedule(
    schedule: str, stages: Sequence[Any], microbatches: int, loss_fn: Callable[..., Any]
) -> pipelining.schedules._PipelineSchedule:
    """torch's schedule ``schedule`` over this rank's ``stages`` (``PipelineStage``\\ s). Gradients are scaled by
    ``1 / microbatches`` (``scale_grads``), so with ``loss_fn`` a mean over tokens the accumulated gradient is
    the step's, as :func:`~moetrain.train.step.accumulate_gradients` makes it in one process."""
    info = check_schedule(schedule)
    cls = getattr(pipelining, info.class_name)
    target = stages[0] if info.stages_per_rank is None else list(stages)
    return cls(target, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=True)
