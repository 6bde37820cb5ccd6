"""The pipeline's stage layout, pure: ``parallel.pp_schedule``'s names, the split of the blocks into stages
(``parallel.pp_layers`` or the balanced default) and which stages a rank holds. Here, not in
:mod:`moetrain.parallel.pipeline`, so config validation checks ``parallel.pp_layers`` before any work starts
(the config package imports nothing of ``moetrain.parallel``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moetrain.config.errors import ConfigError

PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble", "zbv")
"""``parallel.pp_schedule`` names (:data:`moetrain.parallel.pipeline.SCHEDULES` maps each to torch's class)."""
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "interleaved_zero_bubble")
"""The schedules whose ranks hold ``parallel.pp_virtual`` stages each (``zbv``: always 2)."""


def stages_per_rank(schedule: str, virtual: int) -> int:
    """How many stages each rank holds under ``schedule`` (``virtual``: ``parallel.pp_virtual``)."""
    if schedule == "zbv":
        return 2
    if schedule not in MULTI_STAGE_SCHEDULES:
        return 1
    if virtual < 2:
        raise ConfigError(f"parallel.pp_virtual={virtual}: {schedule} needs at least 2 stages per rank")
    return virtual


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


def check_pipeline_model(model_cfg: Any, moe_cfg: Any, n_stages: int) -> None:
    """One :class:`ConfigError` line for what the stage split cannot run exactly yet (config validation, and
    :func:`~moetrain.parallel.pipeline_stage.build_stage_modules`)."""
    from moetrain.moe.losses import enabled  # the registry of balance losses lives with their math

    if n_stages == 1:
        return
    if model_cfg.tie_embeddings:
        raise ConfigError("parallel.pp > 1 with model.tie_embeddings: the embedding and LM head are on two stages")
    if getattr(model_cfg, "mtp_depth", 0):  # multi-token prediction (issue 30): the stage module has no MTP
        raise ConfigError("parallel.pp > 1 with model.mtp_depth > 0: the MTP modules are not placed on a stage yet")
    model_losses = [f"moe.balance.{loss.coef}" for loss, _ in enabled(moe_cfg.balance, "model")]
    if model_losses:
        raise ConfigError(f"parallel.pp > 1: the model-scope balance losses {model_losses} span every stage")


def check_pipeline_training(cfg: Any, microbatches: int) -> None:
    """What training with ``parallel.pp > 1`` needs (config validation), else one :class:`ConfigError` line:
    a model the stages can split (:func:`check_pipeline_model`), the native engine, no ``trainer.compile``, and ``microbatches`` per pipeline and step that torch's schedule
    can run (1F1B: at least one per stage; the interleaved schedules: a multiple of their rounds,
    ``max(1, microbatches // pp)``, ``torch.distributed.pipelining.schedules``)."""
    pp, schedule, engine = cfg.parallel.pp, cfg.parallel.pp_schedule, cfg.engine.name
    check_pipeline_model(cfg.model, cfg.moe, pp)
    if engine != "native":
        raise ConfigError(
            f"parallel.pp={pp}: pipeline stages are run by the native engine only, not engine.name={engine}"
        )
    if cfg.trainer.compile:
        raise ConfigError(
            f"parallel.pp={pp}: trainer.compile is not applied to pipeline stages yet; use trainer.compile=false"
        )
    error = None
    rounds = max(1, microbatches // pp)
    if schedule == "1f1b" and microbatches < pp:
        error = f"1f1b needs at least parallel.pp={pp} micro-batches per pipeline, the step has {microbatches}"
    elif schedule in MULTI_STAGE_SCHEDULES and microbatches % rounds:
        error = f"{schedule} needs the micro-batches per pipeline ({microbatches}) a multiple of {rounds}"
    if error:
        raise ConfigError(f"parallel.pp_schedule={schedule!r}: {error} (set trainer.micro_batch_size smaller)")


def check_pipeline_layout(
    pp: int, schedule: str, virtual: int, rule: str | None, n_layers: int, world_size: int
) -> list[StageSpec]:
    """``parallel.pp*`` (config validation): ``pp`` divides the ranks, the schedule is known, and the split rule
    covers the blocks; one :class:`ConfigError` line naming the key otherwise. Returns the stages."""
    if pp <= 0:
        raise ConfigError(f"parallel.pp={pp!r}: must be > 0")
    if world_size % pp:
        raise ConfigError(
            f"parallel.pp={pp!r}: must divide the world size ({world_size} rank{'s' if world_size != 1 else ''})"
        )
    if schedule not in PP_SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule={schedule!r}: must be one of {', '.join(PP_SCHEDULES)}")
    if virtual <= 0:
        raise ConfigError(f"parallel.pp_virtual={virtual!r}: must be > 0")
    return stage_specs(n_layers, pp * stages_per_rank(schedule, virtual), rule)
