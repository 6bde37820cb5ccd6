"""Gradient clipping by the true global norm over replicated, EP-sharded and FSDP-sharded gradients.

torchtitan's EP-aware ``clip_grad_norm_`` (``torchtitan/distributed/utils.py``, ``_clip_grad_norm_with_ep``)
splits the parameters into the expert-parallel ones and the rest, takes each part's norm over its DTensor
placements and adds the squares. Here the experts are split over ``"ep"`` by moetrain itself (not a DTensor
dimension), so each gradient's local squares are summed over the ranks that hold different pieces of it
(docs/parallelism.md, "Gradient scaling"):

- a replicated gradient (a plain tensor or a ``Replicate`` DTensor) of a non-expert parameter is the same on
  every rank: counted once, no collective;
- a ``Shard`` DTensor (``fully_shard``) holds one piece per rank of its mesh; an expert's pieces are also split
  over the EP group, so the shards of both kinds are summed over all W ranks;
- a replicated expert gradient is this EP rank's slice of the layer, the same on its EDP copies: summed over the
  EP group.

With ``ep == 1`` the experts are replicated like the rest and counted with it. Under pipeline parallelism ``pc`` is
the stage's view (:meth:`~moetrain.parallel.context.ParallelContext.stage_view`): the three parts are the stage's,
and their total is summed over the pipeline group, so every stage counts once. The sums of squares are fp32 and
use one multi-tensor norm kernel per kind; clipping multiplies every local gradient by the same coefficient.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from moetrain.parallel.context import ParallelContext
from moetrain.parallel.expert_parallel import expert_parameters


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(non-expert, routed-expert) trainable parameters, each in model order."""
    expert_ids = {id(p) for p in expert_parameters(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) not in expert_ids], [p for p in params if id(p) in expert_ids]


def _sharded(g: torch.Tensor) -> bool:
    return isinstance(g, DTensor) and any(isinstance(pl, Shard) for pl in g.placements)


def _local(g: torch.Tensor) -> torch.Tensor:
    return g.to_local() if isinstance(g, DTensor) else g


def _sq_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squares of every gradient, in fp32: one multi-tensor norm kernel (``_foreach_norm``), no
    per-parameter launches."""
    if not grads:
        return torch.zeros((), device=device, dtype=torch.float32)
    norms = torch._foreach_norm([g.detach() for g in grads], 2.0, dtype=torch.float32)
    return torch.stack(norms).square().sum()


def grad_norm_parts(
    model: nn.Module, pc: ParallelContext
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """This rank's local gradients in three lists (module docstring): counted once, summed over all ranks
    (``Shard`` DTensors), summed over the EP group (replicated experts). With ``ep == 1`` the experts join
    the first list, after the non-expert gradients."""
    dense, experts = split_parameters(model)
    if pc.ep_size == 1:
        dense, experts = dense + experts, []
    expert_ids = {id(p) for p in experts}
    grads = [(p.grad, id(p) in expert_ids) for p in dense + experts if p.grad is not None]
    once = [_local(g) for g, expert in grads if not expert and not _sharded(g)]
    world = [_local(g) for g, _ in grads if _sharded(g)]
    ep = [_local(g) for g, expert in grads if expert and not _sharded(g)]
    return once, world, ep


@torch.no_grad()
def clip_grad_norm(model: nn.Module, pc: ParallelContext, max_norm: float) -> torch.Tensor:
    """Clip by the true global gradient norm (the gradients already reduced); return the norm before clipping.

    ||g||^2 = (the replicated non-expert gradients' squares + the ``Shard`` pieces' squares summed over all
    ranks) + the replicated experts' squares summed over the EP group; under PP, that of each stage summed over
    the pipeline group. ``max_norm <= 0`` or ``inf`` only
    measures.
    """
    once, world, ep = grad_norm_parts(model, pc)
    device = next(model.parameters()).device
    sq = _sq_norm(once, device)
    if world:  # every Shard piece (fully_shard's "dp" and "edp" units) is held by exactly one rank
        sq_world = _sq_norm(world, device)
        pc.all_reduce_sum(sq_world)  # all W ranks; the stage's ranks under PP
        sq = sq + sq_world
    sq_ep = _sq_norm(ep, device)
    if pc.ep_size > 1 and pc.ep_group is not None:
        dist.all_reduce(sq_ep, op=dist.ReduceOp.SUM, group=pc.ep_group)
    sq = sq + sq_ep
    if pc.pp_group is not None:  # every stage's squares (pipeline parallelism)
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=pc.pp_group)
    norm = sq.sqrt()
    if max_norm > 0 and not math.isinf(max_norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # the same rule as torch.nn.utils.clip_grad_norm_
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in once + world + ep:
            by_dtype.setdefault(g.dtype, []).append(g)
        for dtype, grads in by_dtype.items():
            torch._foreach_mul_(grads, coef.to(dtype))
    return norm
