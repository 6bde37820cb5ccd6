"""``moetrain-plan`` under pipeline parallelism: memory per GPU for each pipeline rank, and the bubble.

A pipeline rank holds its stages (:func:`~moetrain.config.pipeline_layout.stage_specs` placed by
:func:`~moetrain.config.pipeline_layout.stage_ids`): their blocks' non-expert parameters, its EP share
(``1 / ep``) of their routed experts, the embedding on the first stage and the final norm and LM head on the
last. The ``world / pp`` ranks of a stage are its data-parallel replicas (``dp``), ``ep`` of them split its
experts, so a non-expert parameter has ``dp`` replicas and an expert ``dp / ep``. Bytes per parameter as the
planner counts them without PP (:func:`moetrain.tools.plan.memory_per_gpu`): bf16 weights and gradients
(2 + 2), fp32 master weights and AdamW's two moments (12), the 12 sharded over the replicas from ZeRO-1, the
gradients from ZeRO-2, and all 16 under FSDP (``parallel.fsdp``).

Activations: a micro-batch's per block as without PP (Korthikanti et al. 2022, eq. 2, no recomputation:
``s b D (34 + 5 a s / D)`` bytes), times the rank's blocks, times the micro-batches whose activations the
schedule keeps in flight on that rank (:func:`in_flight`), plus the fp32 logits of one micro-batch on the
rank holding the LM head (its forward and backward run back to back).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from moetrain.config import TrainConfig
from moetrain.config.pipeline_layout import StageSpec, stage_ids, stage_specs, stages_per_rank

EXPERT_SUFFIXES = ("experts.w13", "experts.w2")
BYTES_WEIGHTS, BYTES_GRADS, BYTES_OPTIMIZER = 2.0, 2.0, 12.0
"""bf16 weights and gradients; fp32 master weights + AdamW's two moments."""


@dataclass(frozen=True)
class ModelParts:
    """Parameter counts by where a stage puts them: the embedding, the head (final norm, LM head, and any
    multi-token prediction modules, which would sit after it), and per block its non-expert and routed-expert
    (all N experts) parameters."""

    embedding: int
    head: int
    blocks_dense: tuple[int, ...]
    blocks_experts: tuple[int, ...]


def model_parts(named_numels: Sequence[tuple[str, int, int]], num_experts: int) -> ModelParts:
    """:class:`ModelParts` from ``(name, numel, rows)`` of every parameter (``rows``: a stacked expert tensor's
    first dimension, its EP-local experts, scaled up to all ``num_experts`` as
    :meth:`~moetrain.model.transformer.Transformer.param_counts` does)."""
    embedding = head = 0
    dense: dict[int, int] = {}
    experts: dict[int, int] = {}
    for name, numel, rows in named_numels:
        if name.startswith("blocks."):
            i = int(name.split(".")[1])
            if name.endswith(EXPERT_SUFFIXES):
                experts[i] = experts.get(i, 0) + numel // rows * num_experts
            else:
                dense[i] = dense.get(i, 0) + numel
        elif name.startswith("embed."):
            embedding += numel
        else:
            head += numel
    n = max([*dense, *experts], default=-1) + 1
    return ModelParts(
        embedding, head, tuple(dense.get(i, 0) for i in range(n)), tuple(experts.get(i, 0) for i in range(n))
    )


def in_flight(schedule: str, pp: int, pp_rank: int, m: int, v: int) -> float:
    """Micro-batches whose activations rank ``pp_rank`` holds at its peak, in units of all its stages' blocks.

    GPipe: all ``m`` (every forward before any backward). 1F1B: ``min(m, pp - r)`` (rank r runs ``pp - r - 1``
    warmup forwards, then one more before its first backward; Narayanan et al. 2021, arXiv 2104.04473,
    sec. 2.2.1). Interleaved (also the interleaved zero-bubble schedule): Megatron-LM's warmup of
    ``2 (pp - r - 1) + (v - 1) pp`` forwards of one stage (a 1/v of the rank's blocks) plus one, at most
    ``m v`` (``get_num_warmup_microbatches`` in megatron/core/pipeline_parallel/schedules.py). ZBV: ``min(m,
    pp)`` on every rank (Qi et al. 2024, arXiv 2405.15362: the V schedule's peak is 1F1B's first rank's). One
    process (``pp == 1``) keeps one micro-batch (accumulation frees each after its backward)."""
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(m)
    if schedule == "zbv":
        return float(min(m, pp))
    if v > 1:
        return min(m * v, 2 * (pp - pp_rank - 1) + (v - 1) * pp + 1) / v
    return float(min(m, pp - pp_rank))


@dataclass(frozen=True)
class RankMemory:
    """One pipeline rank's memory per GPU (bytes) and what it holds."""

    pp_rank: int
    stages: tuple[StageSpec, ...]
    dense_params: float
    """Non-expert parameters of its stages (each replicated over the stage's ``dp`` ranks)."""
    expert_params: float
    """Its EP share of its stages' routed experts (replicated over ``dp / ep`` ranks)."""
    in_flight: float
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass(frozen=True)
class Layout:
    """A (pp, ep, dp) layout: ``dp`` ranks per stage (``world / pp``), ``ep`` of them splitting the experts;
    ``zero`` the ZeRO stage (0-2) of the optimizer and gradients, ``fsdp`` sharding all of them."""

    pp: int
    ep: int
    dp: int
    zero: int = 1
    fsdp: bool = False


def _bytes(n: float, replicas: int, layout: Layout) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes of ``n`` parameters replicated on ``replicas`` ranks."""
    if layout.fsdp:
        return BYTES_WEIGHTS * n / replicas, BYTES_GRADS * n / replicas, BYTES_OPTIMIZER * n / replicas
    grads = BYTES_GRADS * n / (replicas if layout.zero >= 2 else 1)
    return BYTES_WEIGHTS * n, grads, BYTES_OPTIMIZER * n / (replicas if layout.zero >= 1 else 1)


def rank_memory(
    parts: ModelParts,
    stages: Sequence[StageSpec],
    pp_rank: int,
    layout: Layout,
    act_per_block: float,
    logits: float,
    in_flight_mb: float,
) -> RankMemory:
    """The memory of pipeline rank ``pp_rank`` holding ``stages`` (module docstring). ``act_per_block``:
    activation bytes of one micro-batch through one block; ``logits``: those of one micro-batch's logits."""
    blocks = [i for s in stages for i in s.blocks]
    dense = sum(parts.blocks_dense[i] for i in blocks)
    dense += sum(parts.embedding for s in stages if s.embedding) + sum(parts.head for s in stages if s.head)
    expert = sum(parts.blocks_experts[i] for i in blocks) / layout.ep
    d, e = _bytes(dense, layout.dp, layout), _bytes(expert, layout.dp // layout.ep, layout)
    act = in_flight_mb * act_per_block * len(blocks) + (logits if any(s.head for s in stages) else 0.0)
    return RankMemory(pp_rank, tuple(stages), dense, expert, in_flight_mb, d[0] + e[0], d[1] + e[1], d[2] + e[2], act)


def activation_bytes_per_block(seq_len: int, micro_batch: int, dim: int, n_heads: int) -> float:
    """One micro-batch through one block, no recomputation (Korthikanti et al. 2022, eq. 2)."""
    s, b = seq_len, micro_batch
    return s * b * dim * (34 + 5 * n_heads * s / dim)


def pipeline_memory(
    cfg: TrainConfig, parts: ModelParts, vocab_size: int, layout: Layout, micro_batch: int, m: int
) -> list[RankMemory]:
    """Every pipeline rank's :class:`RankMemory` for ``cfg``'s ``parallel.pp*`` and ``m`` micro-batches a step
    (of ``micro_batch`` sequences each)."""
    from moetrain.parallel.pipeline import SCHEDULES

    p = cfg.parallel
    v = stages_per_rank(p.pp_schedule, p.pp_virtual) if layout.pp > 1 else 1
    specs = stage_specs(cfg.model.n_layers, layout.pp * v, p.pp_layers if layout.pp > 1 else None)
    act = activation_bytes_per_block(cfg.data.seq_len, micro_batch, cfg.model.dim, cfg.model.n_heads)
    logits = 4.0 * cfg.data.seq_len * micro_batch * vocab_size
    out = []
    for r in range(layout.pp):
        mine = [specs[i] for i in stage_ids(r, layout.pp, v, SCHEDULES[p.pp_schedule].style)]
        out.append(rank_memory(parts, mine, r, layout, act, logits, in_flight(p.pp_schedule, layout.pp, r, m, v)))
    return out


def describe(stages: Sequence[StageSpec]) -> str:
    """``stage 0 (embedding + blocks 0-6)``, ``stages 1, 6 (blocks 2-3; blocks 12-13 + head)``."""
    parts = []
    for s in stages:
        blocks = f"blocks {s.first}-{s.last - 1}" if s.last - s.first > 1 else f"block {s.first}"
        parts.append(("embedding + " if s.embedding else "") + blocks + (" + head" if s.head else ""))
    label = "stage" if len(stages) == 1 else "stages"
    return f"{label} {', '.join(str(s.index) for s in stages)} ({'; '.join(parts)})"


def memory_lines(
    ranks: Sequence[RankMemory], fsdp: Sequence[RankMemory], layout: Layout, gpu_mem_gb: float, size: Callable
) -> list[str]:
    """The report's lines: each pipeline rank's memory (ZeRO-``layout.zero``, and its total with FSDP), then the
    largest of each, which is what must fit. ``size``: bytes in GB -> text (:func:`moetrain.tools.plan.size`)."""
    gb = 1e9
    lines = [
        f"memory/GPU by pipeline rank (PP={layout.pp}; a stage's DP={layout.dp} ranks, EP={layout.ep} of them "
        f"splitting its experts; ZeRO-{layout.zero}, and the total with FSDP):"
    ]
    for r, f in zip(ranks, fsdp, strict=True):
        lines.append(
            f"  rank {r.pp_rank}: {describe(r.stages)}: weights {size(r.weights / gb)}, grads {size(r.grads / gb)}, "
            f"optimizer {size(r.optimizer / gb)}, activations ~{size(r.activations / gb)} "
            f"({r.in_flight:.3g} micro-batch{'' if r.in_flight == 1 else 'es'} in flight) = {size(r.total / gb)}; with FSDP {size(f.total / gb)}"
        )
    big, big_f = max(ranks, key=lambda r: r.total), max(fsdp, key=lambda r: r.total)
    fits = lambda t: "  ** does not fit **" if t / gb > gpu_mem_gb else ""  # noqa: E731
    lines.append(
        f"  largest: rank {big.pp_rank}, {size(big.total / gb)}{fits(big.total)}; with FSDP rank {big_f.pp_rank}, "
        f"{size(big_f.total / gb)}{fits(big_f.total)}; of {gpu_mem_gb:.0f} GB"
    )
    return lines
