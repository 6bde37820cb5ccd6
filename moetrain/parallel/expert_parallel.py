"""Expert parallelism applied to the plain model from outside (torchtitan's ``apply_*`` style).

:func:`apply_expert_parallel` shards every MoE layer's routed experts over the
EP group and installs the all-to-all dispatcher; the model code never asks
whether it is distributed. Build the full model with the same seed on every
rank first, then shard: EP=N then starts from exactly the weights of EP=1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moetrain.moe.dispatch import LocalDispatcher
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.fused import FusedLocalDispatcher
from moetrain.moe.layer import MoELayer
from moetrain.moe.stats import maxvio
from moetrain.parallel.all_to_all import AllToAllDispatcher, CommStats, local_expert_slice
from moetrain.parallel.context import ParallelContext


def moe_layers(model: nn.Module) -> dict[int, MoELayer]:
    """The model's MoE layers by block index (falls back to module order for models without ``moe_layers``)."""
    if hasattr(model, "moe_layers"):
        return model.moe_layers()  # type: ignore[no-any-return, operator]
    return {i: m for i, m in enumerate(m for m in model.modules() if isinstance(m, MoELayer))}


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Routed-expert weights (sharded under EP); every other parameter is replicated on all ranks."""
    return [p for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()]


@torch.no_grad()
def shard_experts(experts: GroupedExperts, ep_size: int, ep_rank: int) -> None:
    """Keep experts ``[ep_rank * N / ep, (ep_rank + 1) * N / ep)`` of ``w13`` / ``w2``; record their global offset."""
    if experts.num_experts != experts.num_global_experts:
        raise ValueError("experts are already sharded")
    lo, e = local_expert_slice(experts.num_global_experts, ep_size, ep_rank)
    experts.w13 = nn.Parameter(experts.w13[lo : lo + e].clone())
    experts.w2 = nn.Parameter(experts.w2[lo : lo + e].clone())
    experts.num_experts = e
    experts.expert_offset = lo


def apply_expert_parallel(
    model: nn.Module, pc: ParallelContext, max_recv_factor: float | None = None, recv_overflow: str = "drop"
) -> nn.Module:
    """Shard each MoE layer's experts over ``pc``'s EP group and give it an :class:`AllToAllDispatcher`.

    A no-op when ``pc.ep_size == 1`` (the single-process dispatcher chosen when
    the model was built stays). Call before the optimizer is built (the expert parameters are
    replaced by their local slices). Returns ``model``.
    """
    if pc.ep_size == 1:
        return model
    for idx, layer in moe_layers(model).items():
        shard_experts(layer.experts, pc.ep_size, pc.ep_rank)
        layer.dispatcher = AllToAllDispatcher(
            layer.experts.num_global_experts,
            pc.ep_size,
            pc.ep_rank,
            pc.ep_group,
            rank=pc.rank,
            world_size=pc.world_size,
            layer_idx=idx,
            max_recv_factor=max_recv_factor,
            overflow=recv_overflow,
        )
    return model


def use_unfused_dispatch(model: nn.Module) -> nn.Module:
    """Give every MoE layer that has the CPU fast path (:class:`~moetrain.moe.fused.FusedLocalDispatcher`)
    the plain :class:`~moetrain.moe.dispatch.LocalDispatcher`: the experts' own forward runs on every
    forward (for an engine whose module hooks must see it, e.g. DeepSpeed's). Returns ``model``."""
    for layer in moe_layers(model).values():
        if isinstance(layer.dispatcher, FusedLocalDispatcher):
            layer.dispatcher = LocalDispatcher(layer.dispatcher.num_local_experts)
    return model


def comm_scalars(layer_idx: int, comm: CommStats) -> dict[str, torch.Tensor]:
    """One forward's all-to-all counters as the accumulator's summable tensors (``moe/layer_{i}/...``)."""
    p = f"moe/layer_{layer_idx}"
    return {
        f"{p}/comm_rows": comm.rows_sent,
        f"{p}/comm_bytes": comm.bytes_sent,
        f"{p}/comm_local_rows": comm.rows_local,
        f"{p}/comm_total_rows": comm.rows_total,
        f"{p}/recv_rows": comm.recv_rows_W,
        f"{p}/recv_dropped": comm.dropped,
    }


def comm_metrics(host: dict[str, Any], layer_idx: int, prefix: str = "moe") -> dict[str, Any]:
    """Logged communication metrics of layer i from the step's sums over micro-batches and ranks.

    ``comm_rows`` / ``comm_bytes``: (token, rank) rows and payload bytes sent to
    other ranks in the step (all ranks); ``local_frac``: fraction of the
    (token, rank) rows whose destination was the sender itself; ``recv_rows``:
    expert rows each rank computed (list by global rank); ``recv_maxvio``: MaxVio
    of that list (Wang et al. 2024, eq. 4, over ranks instead of experts);
    ``recv_dropped``: assignments dropped by the receive budget.
    """
    p = f"moe/layer_{layer_idx}"
    if f"{p}/comm_rows" not in host:
        return {}
    recv = host[f"{p}/recv_rows"]
    recv = recv if isinstance(recv, list) else [recv]
    q = f"{prefix}/layer_{layer_idx}"
    return {
        f"{q}/comm_rows": round(host[f"{p}/comm_rows"]),
        f"{q}/comm_bytes": round(host[f"{p}/comm_bytes"]),
        f"{q}/local_frac": host[f"{p}/comm_local_rows"] / max(host[f"{p}/comm_total_rows"], 1.0),
        f"{q}/recv_rows": [round(c) for c in recv],
        f"{q}/recv_maxvio": maxvio(torch.tensor(recv)).item(),
        f"{q}/recv_dropped": round(host[f"{p}/recv_dropped"]),
    }


def zero_stats(stats: Any) -> Any:
    """A copy of a stats dataclass (``MoEStats``, ``CommStats``) with every tensor zeroed, recursively.

    A rank whose share of a batch is empty still runs a forward (a dummy row) so
    that it joins its EP group's all-to-alls; adding its zeroed statistics keeps
    the accumulators' keys identical on every rank for the cross-rank reduce.
    """
    import dataclasses

    def zero(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return torch.zeros_like(v)
        if isinstance(v, dict):
            return {k: zero(x) for k, x in v.items()}
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return zero_stats(v)
        return v

    return dataclasses.replace(stats, **{f.name: zero(getattr(stats, f.name)) for f in dataclasses.fields(stats)})
