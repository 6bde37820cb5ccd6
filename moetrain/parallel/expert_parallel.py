"""Expert parallelism applied to the plain model from outside (torchtitan's ``apply_*`` style).

:func:`apply_expert_parallel` shards every MoE layer's routed experts over the
EP group and installs the all-to-all dispatcher; the model code never asks
whether it is distributed. Build the full model with the same seed on every
rank first, then shard: EP=N then starts from exactly the weights of EP=1.
"""

from __future__ import annotations

import torch
from torch import nn

from moetrain.moe.dispatch import LocalDispatcher
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.fused import FusedLocalDispatcher
from moetrain.moe.layer import MoELayer
from moetrain.parallel.all_to_all import AllToAllDispatcher, local_expert_slice
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


def _holds_local_slice(experts: GroupedExperts, ep_size: int, ep_rank: int) -> bool:
    """Whether ``experts`` already hold exactly EP rank ``ep_rank``'s slice (and are not the whole layer)."""
    lo, e = local_expert_slice(experts.num_global_experts, ep_size, ep_rank)
    sharded = experts.num_experts != experts.num_global_experts
    if sharded and (experts.expert_offset, experts.num_experts) != (lo, e):
        raise ValueError(f"experts hold [{experts.expert_offset}, +{experts.num_experts}), EP rank wants [{lo}, +{e})")
    return sharded


def apply_expert_parallel(
    model: nn.Module,
    pc: ParallelContext,
    max_recv_factor: float | None = None,
    recv_overflow: str = "drop",
    overlap_shared: bool = True,
) -> nn.Module:
    """Shard each MoE layer's experts over ``pc``'s EP group and give it an :class:`AllToAllDispatcher`.

    A no-op when ``pc.ep_size == 1`` (the single-process dispatcher chosen when
    the model was built stays). Call before the optimizer is built (the expert parameters are
    replaced by their local slices). Experts already holding this rank's slice (a model from
    :func:`~moetrain.parallel.meta_init.build_local_model`) are kept as they are. ``overlap_shared``: the
    shared experts run while the all-to-alls are in flight (``parallel.overlap_shared_experts``). Returns
    ``model``.
    """
    if pc.ep_size == 1:
        return model
    for idx, layer in moe_layers(model).items():
        if not _holds_local_slice(layer.experts, pc.ep_size, pc.ep_rank):
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
            overlap_work=overlap_shared,
        )
    return model


def use_unfused_dispatch(model: nn.Module) -> nn.Module:
    """Give every MoE layer that has the CPU fast path (:class:`~moetrain.moe.fused.FusedLocalDispatcher`)
    the plain :class:`~moetrain.moe.dispatch.LocalDispatcher`: the experts' own forward runs on every
    forward (for an engine whose module hooks must see it, e.g. DeepSpeed's). Returns ``model``."""
    for layer in moe_layers(model).values():
        if isinstance(layer.dispatcher, FusedLocalDispatcher):
            layer.dispatcher = LocalDispatcher(layer.dispatcher.num_local_experts, layer.dispatcher.slot_sum)
    return model
