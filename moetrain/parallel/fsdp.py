"""FSDP2 over the data-parallel ranks for the non-expert part of the model (``parallel.fsdp=true``).

Each Transformer block is one ``fully_shard`` unit and the root (embedding, final norm, LM head, tied or not)
another, over a one-dimensional ``DeviceMesh`` named ``dp`` spanning all W ranks: every non-expert parameter
becomes a DTensor sharded on dim 0, gathered for its block's forward and backward, and its gradient is
reduce-scattered as the average over W -- the same ``sum / W`` :func:`~moetrain.parallel.grad_sync.sync_gradients`
applies to a replicated parameter. The routed experts are left out (``ignored_params``): they stay sharded over
EP and :func:`~moetrain.parallel.grad_sync.sync_gradients` still reduces them over their EDP group.
:func:`~moetrain.parallel.grad_sync.clip_grad_norm` adds the DTensor shards' squared norms over the mesh.

fp32 throughout (the CPU case); FSDP2's ``MixedPrecisionPolicy`` for bf16 on GPU is not wired yet.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

from moetrain.parallel.context import ParallelContext
from moetrain.parallel.expert_parallel import expert_parameters


def dp_mesh(pc: ParallelContext) -> DeviceMesh:
    """The data-parallel mesh over every rank (the non-expert parameters are replicated over all W)."""
    return init_device_mesh(pc.device.type, (pc.world_size,), mesh_dim_names=("dp",))


def apply_fsdp(model: nn.Module, pc: ParallelContext) -> nn.Module:
    """``fully_shard`` each block, then the root, over :func:`dp_mesh`, the routed experts ignored; after
    :func:`~moetrain.parallel.expert_parallel.apply_expert_parallel`, activation checkpointing and compile, and
    before the optimizer is built (it must see the DTensor parameters). A no-op on one process. Returns
    ``model``."""
    if pc.world_size == 1:
        return model
    mesh = dp_mesh(pc)
    ignored = set(expert_parameters(model))
    blocks: nn.ModuleList = model.blocks  # type: ignore[assignment]
    for i, block in enumerate(blocks):
        # the last block's parameters are needed at once by the backward: keep them gathered after forward
        fully_shard(block, mesh=mesh, ignored_params=ignored, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return model
