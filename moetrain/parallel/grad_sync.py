"""Gradient synchronisation and clipping for data x expert parallelism.

Scaling (docs/parallelism.md, "Gradient scaling"). Each rank r's loss L_r is the mean
over its own tokens (its micro-batches' mean losses, averaged); the loss of
the step is the mean over ranks, L = (1/W) sum_r L_r. So dL/dtheta =
(1/W) sum_r dL_r/dtheta:

- a replicated (non-expert) parameter has dL_r/dtheta on each rank r: all-reduce
  sum over all W ranks, divide by W (the usual DP average);
- an expert shard's local gradient on rank r already holds the contributions
  of *every* rank of its EP group (the backward of the all-to-all brings back
  the gradients of the tokens other ranks sent to it), i.e.
  sum_{r' in EP group} dL_{r'}/dtheta. Summing that over the expert-data-parallel
  group (the W/ep groups' copies of the shard) gives sum over all W ranks; divide
  by W. Averaging over the EDP group alone would be wrong by a factor ep.

With these scalings EP=N training equals EP=1 on the same global batch. Under FSDP
(:mod:`moetrain.parallel.fsdp`) the non-expert parameters, and the experts when ``W / ep > 1``, are DTensors
whose gradients FSDP already reduce-scattered with the same scalings; they are skipped here and their shards'
norms summed over all ranks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moetrain.parallel.context import ParallelContext
from moetrain.parallel.expert_parallel import expert_parameters
from moetrain.parallel.grad_buckets import grad_reducer


def _flat_all_reduce(grads: list[torch.Tensor], group: object, scale: float) -> None:
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if group is not None or dist.is_initialized():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)  # type: ignore[arg-type]
    flat.mul_(scale)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated or FSDP-sharded, expert) trainable parameters."""
    expert_ids = {id(p) for p in expert_parameters(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) not in expert_ids], [p for p in params if id(p) in expert_ids]


def _plain_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[DTensor]]:
    """(replicated, EP-sharded expert, FSDP DTensor) trainable parameters."""
    dense, experts = split_parameters(model)
    sharded = [p for p in dense + experts if isinstance(p, DTensor)]
    return [p for p in dense if not isinstance(p, DTensor)], [p for p in experts if not isinstance(p, DTensor)], sharded


def sync_gradients(model: nn.Module, pc: ParallelContext) -> None:
    """Non-expert grads: sum over all W ranks / W. Expert grads: sum over the EDP group / W (module docstring).
    DTensor (FSDP) parameters are skipped: FSDP reduce-scattered their gradients in the backward."""
    if not pc.distributed:
        return
    reducer = grad_reducer(model)
    if reducer is not None and reducer.in_flight:  # the last backward launched this sync in buckets: finish it
        reducer.finish()  # (moetrain.parallel.grad_buckets); reducing again would double-reduce
        return
    dense, experts, _ = _plain_split(model)
    if pc.ep_size == 1:  # experts are replicated too: one flat all-reduce of everything
        dense, experts = dense + experts, []
    _flat_all_reduce([p.grad for p in dense if p.grad is not None], None, 1.0 / pc.world_size)
    expert_grads = [p.grad for p in experts if p.grad is not None]
    if expert_grads:
        if pc.edp_group is not None:
            _flat_all_reduce(expert_grads, pc.edp_group, 1.0 / pc.world_size)
        else:  # this rank alone holds its shard (ep == W)
            for g in expert_grads:
                g.div_(pc.world_size)


def _sq_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squares of every gradient, in fp32: one multi-tensor norm kernel (``_foreach_norm``), no
    per-parameter launches."""
    if not grads:
        return torch.zeros((), device=device, dtype=torch.float32)
    norms = torch._foreach_norm([g.detach() for g in grads], 2.0, dtype=torch.float32)
    return torch.stack(norms).square().sum()


@torch.no_grad()
def clip_grad_norm(model: nn.Module, pc: ParallelContext, max_norm: float) -> torch.Tensor:
    """Clip by the true global gradient norm (after :func:`sync_gradients`); return the norm before clipping.

    ||g||^2 = ||g_dense||^2 (identical on every rank, counted once) + sum over
    the EP group of ||g_shard||^2 (each expert shard counted once; the EDP copies
    are identical after the sync); FSDP-sharded gradients add their local shards' squares summed over the
    mesh. ``max_norm <= 0`` or ``inf`` only measures.
    """
    dense, experts, fsdp = _plain_split(model)
    sharded = [p.grad.to_local() for p in fsdp if isinstance(p.grad, DTensor)]
    if pc.ep_size == 1:
        dense, experts = dense + experts, []
    device = next(model.parameters()).device
    sq_dense = _sq_norm([p.grad for p in dense if p.grad is not None], device)
    if sharded:  # every DTensor shard (FSDP's "dp" and "edp" meshes) is held by exactly one rank
        sq_sharded = _sq_norm(sharded, device)
        dist.all_reduce(sq_sharded, op=dist.ReduceOp.SUM)
        sq_dense = sq_dense + sq_sharded
    sq_expert = _sq_norm([p.grad for p in experts if p.grad is not None], device)
    if pc.ep_size > 1 and pc.ep_group is not None:
        dist.all_reduce(sq_expert, op=dist.ReduceOp.SUM, group=pc.ep_group)
    norm = (sq_dense + sq_expert).sqrt()
    if max_norm > 0 and not math.isinf(max_norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # the same rule as torch.nn.utils.clip_grad_norm_
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        every = [p.grad for p in dense + experts if p.grad is not None] + sharded
        for g in every:
            by_dtype.setdefault(g.dtype, []).append(g)
        for dtype, grads in by_dtype.items():
            torch._foreach_mul_(grads, coef.to(dtype))
    return norm
