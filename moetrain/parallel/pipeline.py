"""Pipeline parallelism on ``torch.distributed.pipelining``: the schedule by name and the bubble each implies.
Pure functions except :func:`build_schedule`.

The stage split rule and placement are in :mod:`moetrain.config.pipeline_layout` (config validation checks
them), the stage modules themselves (meta-device build, the aux-loss autoscaler) are in
:mod:`moetrain.parallel.pipeline_stage`. The design follows torchtitan's (``pipeline_llm``: one module per stage
keeping the model's parameter names, ``build_pipeline_schedule``: one schedule class per name, a list of
stages for the multi-stage schedules); see docs/pipeline.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.pipelining as pipelining
from torch import nn

from moetrain.config import ConfigError
from moetrain.config.pipeline_layout import PP_SCHEDULES


@dataclass(frozen=True)
class ScheduleInfo:
    """A ``parallel.pp_schedule`` name: torch's class, its stages per rank and their placement, and its bubble."""

    class_name: str
    multi_stage: bool
    """Whether torch's class takes a list of stages (several per rank) rather than one."""
    style: str
    """``loop`` (rank r holds stages r, r + P, ...) or ``v`` (rank r holds stages r and 2P - 1 - r)."""
    bubble: Callable[[int, int, int], float]
    """``bubble(p, m, v)``: the idle fraction of the step (:func:`bubble_fraction`)."""


def _bubble_1f1b(p: int, m: int, v: int) -> float:
    # Narayanan et al. 2021 (arXiv 2104.04473) sec. 2.2.1: bubble time (p-1)(tf+tb) next to m(tf+tb) of work,
    # the same for GPipe (Huang et al. 2019) and 1F1B (PipeDream-Flush). The paper's (p-1)/m is relative to the
    # ideal time; as a fraction of the step it is (p-1) / (m + p-1).
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
    "gpipe": ScheduleInfo("ScheduleGPipe", False, "loop", _bubble_1f1b),
    "1f1b": ScheduleInfo("Schedule1F1B", False, "loop", _bubble_1f1b),
    "interleaved_1f1b": ScheduleInfo("ScheduleInterleaved1F1B", True, "loop", _bubble_interleaved),
    "interleaved_zero_bubble": ScheduleInfo("ScheduleInterleavedZeroBubble", True, "loop", _bubble_zero_bubble),
    "zbv": ScheduleInfo("ScheduleZBVZeroBubble", True, "v", _bubble_zero_bubble),
}
"""By ``parallel.pp_schedule`` name (:data:`~moetrain.config.pipeline_layout.PP_SCHEDULES`). Those whose class the installed torch lacks are refused by
:func:`check_schedule` (:func:`available_schedules`)."""


def available_schedules() -> list[str]:
    """The :data:`SCHEDULES` names whose class the installed ``torch.distributed.pipelining`` has."""
    return [name for name, info in SCHEDULES.items() if hasattr(pipelining, info.class_name)]


def check_schedule(name: str) -> ScheduleInfo:
    """The :class:`ScheduleInfo` of ``name``, or one :class:`~moetrain.config.ConfigError` line."""
    if name not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule={name!r}: not one of {', '.join(PP_SCHEDULES)}")
    if name not in available_schedules():
        raise ConfigError(
            f"parallel.pp_schedule={name!r}: this torch has no {SCHEDULES[name].class_name} "
            f"(available: {', '.join(available_schedules())})"
        )
    return SCHEDULES[name]


def bubble_fraction(schedule: str, pp: int, microbatches: int, virtual: int = 1) -> float:
    """The fraction of a step each pipeline rank idles under ``schedule`` with ``pp`` ranks, ``microbatches``
    micro-batches and ``virtual`` stages per rank, assuming equal stages (formulas at :data:`SCHEDULES`)."""
    if pp < 1 or microbatches < 1 or virtual < 1:
        raise ValueError(f"bubble_fraction: pp={pp}, microbatches={microbatches}, virtual={virtual} must be >= 1")
    return SCHEDULES[schedule].bubble(pp, microbatches, virtual)


def build_schedule(
    schedule: str, stages: Sequence[Any], microbatches: int, loss_fn: Callable[..., Any]
) -> pipelining.schedules._PipelineSchedule:
    """torch's schedule ``schedule`` over this rank's ``stages`` (``PipelineStage``\\ s). Gradients are scaled by
    ``1 / microbatches`` (``scale_grads``), so with ``loss_fn`` a mean over tokens the accumulated gradient is
    the step's, as :func:`~moetrain.train.step.accumulate_gradients` makes it in one process."""
    info = check_schedule(schedule)
    cls = getattr(pipelining, info.class_name)
    target = list(stages) if info.multi_stage else stages[0]
    return cls(target, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=True)


@torch.no_grad()
def forward_only(
    modules: Mapping[int, nn.Module], holders: Sequence[int], tokens_BS: torch.Tensor, dim: int, group: Any
) -> torch.Tensor | None:
    """One forward of ``tokens_BS`` through every stage, stage after stage, no gradients (evaluation, the
    routing pre-pass of global-batch balance): the holder of stage ``s`` (global rank ``holders[s]``) receives
    the activations ``[B, S, dim]`` (fp32, the residual stream) from the holder of ``s - 1``, runs its module
    ``modules[s]`` and sends the output on; a rank holding both keeps it. Every rank runs the stages in the same
    order, so the sends and receives pair up, and the ranks of one stage run it together (its EP all-to-alls).
    Returns the last stage's output on its holder, ``None`` elsewhere."""
    me, h, out = dist.get_rank(), None, None
    last = len(holders) - 1
    for s, holder in enumerate(holders):
        if holder != me:
            continue
        if s == 0:
            x = tokens_BS
        elif holders[s - 1] == me:
            x = h
        else:
            x = torch.empty(*tokens_BS.shape, dim, device=tokens_BS.device)
            dist.recv(x, holders[s - 1], group=group)
        y = modules[s](x, tokens_BS=tokens_BS)
        if s == last:
            out = y
        elif holders[s + 1] == me:
            h = y
        else:
            dist.send(y.contiguous(), holders[s + 1], group=group)
    return out
