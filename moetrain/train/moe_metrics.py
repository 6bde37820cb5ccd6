"""The MoE layers' statistics as recorded metrics, and the logged keys (docs/metrics.md) derived from their reduced values.

:func:`record_moe` records one forward's :class:`~moetrain.moe.layer.MoEStats`
per layer under raw names (loads and counts as sums, per-token means as means);
after the cross-rank reduction :func:`moe_log_metrics` derives the logged keys
(``moe/layer_{i}/load``, ``maxvio``, ``drop_frac``, ``device_load``, the
all-to-all traffic, ``moe/maxvio``) and :func:`val_moe_metrics` the validation
MaxVio of the load summed over the whole split.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from moetrain.moe.layer import MoEStats
from moetrain.moe.stats import device_load, maxvio
from moetrain.train.metrics import MetricRecorder, ReducedMetrics

COMM_SUMS = {
    "comm_rows": "rows_sent",
    "comm_bytes": "bytes_sent",
    "comm_local_rows": "rows_local",
    "comm_total_rows": "rows_total",
    "recv_rows": "recv_rows_W",
    "recv_dropped": "dropped",
}
"""Raw all-to-all counters (summed over micro-batches and ranks) -> :class:`CommStats` fields."""


def load_key(layer: int, prefix: str = "moe") -> str:
    """The key of MoE layer ``layer``'s per-expert load: ``moe/layer_{i}/load`` (``val/layer_{i}/load`` in
    evaluation), the one place it is spelled."""
    return f"{prefix}/layer_{layer}/load"


def layer_load(reduced: ReducedMetrics, layer: int) -> torch.Tensor:
    """MoE layer ``layer``'s per-expert load of the step, summed over its micro-batches and all ranks: the
    same on every rank (what the loss-free bias update reads)."""
    return reduced.tensor(load_key(layer))


def record_moe(rec: MetricRecorder, stats: dict[int, MoEStats], prefix: str = "moe") -> None:
    """Record one forward's statistics of every MoE layer."""
    for i, s in stats.items():
        p = f"{prefix}/layer_{i}"
        rec.record(load_key(i, prefix), s.load_N, "sum")
        for name, value in (("selected", s.num_selected), ("dropped", s.num_dropped)):
            if value is not None:
                rec.record(f"{p}/{name}", value, "sum")
        for name, value in (("devices_per_token", s.devices_per_token), ("router_entropy", s.router_entropy)):
            if value is not None:
                rec.record(f"{p}/{name}", value, "mean")
        if s.comm is not None:  # expert parallelism: all-to-all counters (recv_rows is a [W] vector)
            for name, attr in COMM_SUMS.items():
                rec.record(f"{p}/{name}", getattr(s.comm, attr), "sum")
        for name, value in s.losses.items():
            rec.record(f"{p}/loss/{name}", value, "mean")


def record_val(
    rec: MetricRecorder,
    logits_BSV: torch.Tensor | None,
    tokens_BS: torch.Tensor,
    stats: dict[int, MoEStats],
    empty: bool,
) -> None:
    """One validation batch's sums: ``val/loss_sum`` (cross-entropy summed in float64 terms), ``val/tokens`` and
    each MoE layer's load; zeros when ``empty`` (a stand-in row) and, for the loss, without ``logits_BSV`` (a
    pipeline rank without the last stage)."""
    zero = torch.zeros((), dtype=torch.float64, device=tokens_BS.device)
    if empty or logits_BSV is None:
        rec.record("val/loss_sum", zero, "sum")
        rec.record("val/tokens", zero, "sum")
    else:
        targets = tokens_BS[:, 1:].flatten()
        ce = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets, reduction="sum")
        rec.record("val/loss_sum", ce.double(), "sum")
        rec.record("val/tokens", zero + targets.numel(), "sum")
    for i, s in stats.items():
        rec.record(load_key(i, "val"), torch.zeros_like(s.load_N) if empty else s.load_N, "sum")


def stacked_loads(reduced: ReducedMetrics, layers: list[int], prefix: str = "moe") -> torch.Tensor | None:
    """The reduced per-expert loads as one ``[L, N]`` tensor (``None`` without MoE layers)."""
    loads = [reduced.tensor(load_key(i, prefix)) for i in layers if load_key(i, prefix) in reduced]
    return torch.stack(loads) if loads else None


def moe_log_metrics(
    reduced: ReducedMetrics, host: dict[str, Any], layers: list[int], groups: dict[int, int]
) -> dict[str, Any]:
    """The logged keys (docs/metrics.md) of a training step (``host`` = ``reduced.host()``)."""
    load_LN = stacked_loads(reduced, layers)
    if load_LN is None:
        return {}
    vio_L = maxvio(load_LN)
    out: dict[str, Any] = {}
    for j, i in enumerate(layers):
        p = f"moe/layer_{i}"
        out[f"{p}/load"] = [round(c) for c in load_LN[j].tolist()]
        out[f"{p}/maxvio"] = vio_L[j].item()
        out[f"{p}/drop_frac"] = host.get(f"{p}/dropped", 0.0) / max(host.get(f"{p}/selected", 0.0), 1.0)
        for name in ("devices_per_token", "router_entropy"):
            if f"{p}/{name}" in host:
                out[f"{p}/{name}"] = host[f"{p}/{name}"]
        if groups.get(i, 1) > 1:
            dev_load_G = device_load(load_LN[j], groups[i])
            out[f"{p}/device_load"] = [round(c) for c in dev_load_G.tolist()]
            out[f"{p}/device_maxvio"] = maxvio(dev_load_G).item()
        out.update(comm_metrics(host, p))
        out.update({k: v for k, v in host.items() if k.startswith(f"{p}/loss/")})
    out["moe/maxvio"] = vio_L.mean().item()
    return out


def comm_metrics(host: dict[str, Any], p: str) -> dict[str, Any]:
    """Logged communication metrics of one layer from the step's sums over micro-batches and ranks.

    ``comm_rows`` / ``comm_bytes``: (token, rank) rows and payload bytes sent to
    other ranks in the step (all ranks); ``local_frac``: fraction of the
    (token, rank) rows whose destination was the sender itself; ``recv_rows``:
    expert rows each rank computed (list by global rank); ``recv_maxvio``: MaxVio
    of that list (Wang et al. 2024, eq. 4, over ranks instead of experts);
    ``recv_dropped``: assignments dropped by the receive budget.
    """
    if f"{p}/comm_rows" not in host:
        return {}
    recv = host[f"{p}/recv_rows"]
    recv = recv if isinstance(recv, list) else [recv]
    return {
        f"{p}/comm_rows": round(host[f"{p}/comm_rows"]),
        f"{p}/comm_bytes": round(host[f"{p}/comm_bytes"]),
        f"{p}/local_frac": host[f"{p}/comm_local_rows"] / max(host[f"{p}/comm_total_rows"], 1.0),
        f"{p}/recv_rows": [round(c) for c in recv],
        f"{p}/recv_maxvio": maxvio(torch.tensor(recv)).item(),
        f"{p}/recv_dropped": round(host[f"{p}/recv_dropped"]),
    }


def val_moe_metrics(reduced: ReducedMetrics, layers: list[int]) -> dict[str, Any]:
    """``val/layer_{i}/maxvio_global`` and their mean ``val/maxvio_global``: MaxVio of the load summed over the
    whole validation split (Wang et al. 2024's MaxVio_global)."""
    load_LN = stacked_loads(reduced, layers, prefix="val")
    if load_LN is None:
        return {}
    vio = maxvio(load_LN)
    out: dict[str, Any] = {f"val/layer_{i}/maxvio_global": vio[j].item() for j, i in enumerate(layers)}
    out["val/maxvio_global"] = vio.mean().item()
    return out
