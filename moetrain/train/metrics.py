"""Metrics recorded where they arise, each with a declared reduction, reduced across ranks in one place.

OLMo-core's ``record_metric(name, value, reduce_type)`` shape: the train module
records each micro-batch's values (``train/loss`` as a mean, per-expert loads as
sums, ...); :meth:`MetricRecorder.reduce` then combines micro-batches and ranks
with one all-reduce per (operation, dtype), on the device, with no host sync.
The values become Python numbers only when a step is logged
(:meth:`ReducedMetrics.host`). Every logged number is thus a property of the
step's global batch (docs/parallelism.md, "Layout").

Reductions, over every value recorded under one name on every rank:

* ``sum``: the total (loads, token and row counts);
* ``mean``: the total divided by the number of values (a loss averaged over
  micro-batches and ranks: each micro-batch counts once);
* ``max``: the largest.

Values may be scalars or vectors (a per-expert load is one ``[N]`` vector).

The flat all-reduces need the same names, shapes and dtypes on every rank. Under pipeline parallelism a rank
records only its stages' MoE layers, so each rank fills in the others' as neutral values counted zero times
(:func:`pad_to_schema`, zeros for sums and means, ``-inf`` for maxima) from the union of every rank's names
(:func:`metric_schema`), exchanged once (:class:`~moetrain.train.pipeline.PipelineTrainModule`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from moetrain.parallel.context import ParallelContext

Reduce = Literal["sum", "mean", "max"]
REDUCTIONS: tuple[str, ...] = ("sum", "mean", "max")


@dataclass
class MetricRecorder:
    """Accumulates recorded values on the device over one step's micro-batches (or one evaluation)."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    reductions: dict[str, str] = field(default_factory=dict)

    def record(self, name: str, value: torch.Tensor, reduce: Reduce = "mean") -> None:
        """Add one value of ``name`` (detached; float tensors keep their dtype, others become fp32)."""
        if reduce not in REDUCTIONS:
            raise ValueError(f"metric {name}: reduce must be one of {REDUCTIONS}, not {reduce!r}")
        value = value.detach()
        if not value.is_floating_point():
            value = value.float()
        if name not in self.values:
            self.values[name] = value.clone()
            self.counts[name] = 1
            self.reductions[name] = reduce
            return
        if self.reductions[name] != reduce:
            raise ValueError(f"metric {name}: recorded with reduce={self.reductions[name]} and {reduce}")
        old = self.values[name]
        self.values[name] = torch.maximum(old, value) if reduce == "max" else old + value
        self.counts[name] += 1

    def reduce(self, pc: ParallelContext) -> ReducedMetrics:
        """Combine over ranks: one all-reduce per (sum or max, dtype) of every value flattened together, and
        one of the ``mean`` metrics' counts (a rank may have recorded fewer). No host synchronisation."""
        totals = dict(self.values)
        mean_names = sorted(k for k, r in self.reductions.items() if r == "mean")
        counts = torch.tensor([float(self.counts[k]) for k in mean_names], dtype=torch.float64)
        if pc.distributed:
            for op in ("sum", "max"):
                names = sorted(k for k, r in self.reductions.items() if (r == "max") == (op == "max"))
                for dtype in sorted({totals[k].dtype for k in names}, key=str):
                    keys = [k for k in names if totals[k].dtype == dtype]
                    totals.update(zip(keys, pc.all_reduce_flat([totals[k] for k in keys], op)))
            if mean_names:
                counts = pc.all_reduce_sum(counts.to(pc.device))
        return ReducedMetrics(totals, dict(zip(mean_names, counts)), dict(self.reductions))


Schema = dict[str, tuple[tuple[int, ...], str, str]]
"""Metric name -> (shape, dtype name, reduction)."""


def metric_schema(rec: MetricRecorder) -> Schema:
    """What ``rec`` recorded: each name's shape, dtype and reduction."""
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."), rec.reductions[k]) for k, v in rec.values.items()}


def pad_to_schema(rec: MetricRecorder, schema: Schema, device: torch.device) -> None:
    """Add every name of ``schema`` that ``rec`` lacks, as a value that changes no reduction: zeros (``sum``,
    ``mean``, counted zero times) or ``-inf`` (``max``). A name ``rec`` holds outside ``schema`` is an error
    (the ranks' flat reductions would no longer line up)."""
    extra = sorted(set(rec.values) - set(schema))
    if extra:
        raise RuntimeError(f"metrics {extra} were recorded after the ranks agreed on the metric names")
    for name, (shape, dtype, reduce) in schema.items():
        if name not in rec.values:
            fill = float("-inf") if reduce == "max" else 0.0
            rec.values[name] = torch.full(shape, fill, dtype=getattr(torch, dtype), device=device)
            rec.counts[name] = 0
            rec.reductions[name] = reduce


@dataclass
class ReducedMetrics:
    """A step's metrics after the cross-rank reduction, still on the device."""

    totals: dict[str, torch.Tensor]
    """Sums (also of the ``mean`` metrics, before the division) and maxima."""
    counts: dict[str, torch.Tensor]
    """How many values each ``mean`` metric summed over all ranks (0-d float64 tensors, on the device)."""
    reductions: dict[str, str]

    def __contains__(self, name: str) -> bool:
        return name in self.totals

    def tensor(self, name: str) -> torch.Tensor:
        """The reduced value on the device (for a ``mean`` metric: the total; see :meth:`host`)."""
        return self.totals[name]

    def host(self) -> dict[str, Any]:
        """Every metric as Python numbers (lists for vectors), ``mean`` ones divided by their count in float64:
        one device-to-host copy."""
        names = list(self.totals)
        if not names:
            return {}
        counted = list(self.counts)
        device = self.totals[names[0]].device
        parts = [self.totals[k].reshape(-1).double() for k in names]
        flat = torch.cat([*parts, *(self.counts[k].reshape(1).to(device) for k in counted)]).tolist()
        count = dict(zip(counted, flat[len(flat) - len(counted) :]))
        out: dict[str, Any] = {}
        offset = 0
        for k in names:
            t = self.totals[k]
            vals = flat[offset : offset + t.numel()]
            offset += t.numel()
            value: Any = vals[0] if t.dim() == 0 else vals
            if self.reductions[k] == "mean":
                value = value / count[k] if t.dim() == 0 else [v / count[k] for v in value]
            out[k] = value
        return out
