"""FSDP2 (``torch.distributed.fsdp.fully_shard``, DTensor) for ``parallel.fsdp=true``: torchtitan's FSDP + EP layout.

The context's mesh (:attr:`~moetrain.parallel.context.ParallelContext.mesh`) has the named dimensions
``("edp", "ep")``, shape ``(W / ep, ep)``:

- **non-expert part** -- attention, norms, routers, shared experts, embedding, head: sharded over ``"dp"``, the
  two dimensions flattened (all W ranks). Each Transformer block is one ``fully_shard`` unit, the root (embedding,
  final norm, LM head, tied or not) another. A gradient is reduce-scattered as the average over W, the same
  ``sum / W`` :func:`~moetrain.parallel.grad_sync.sync_gradients` applies to a replicated parameter.
- **routed experts** -- already split over ``"ep"`` by :func:`~moetrain.parallel.expert_parallel.apply_expert_parallel`
  (each rank holds ``N / ep`` experts); each MoE layer's :class:`~moetrain.moe.experts.GroupedExperts` is its own
  ``fully_shard`` unit over ``"edp"``, the W / ep ranks holding the same experts, sharded on the stacked expert
  dimension. Their local gradient already sums the EP group's tokens (the all-to-all's backward), so the
  reduction over ``"edp"`` must be a sum divided by W, not the mean over ``"edp"``
  (``set_gradient_divide_factor(W)``, docs/parallelism.md "Gradient scaling"). With ``ep == W`` ("edp" of size 1) they stay
  plain tensors, left out of the blocks' units.

:func:`~moetrain.parallel.grad_sync.clip_grad_norm` sums the DTensor shards' squares over all ranks; the
loss-free bias (a buffer) and the global-batch counts are untouched by FSDP.

Precision (FSDP2's ``MixedPrecisionPolicy``): on a GPU with bf16 (``trainer.precision=bf16``, or ``auto``) the
parameters are all-gathered and computed in bf16 and gradients reduced in fp32, and AdamW steps the fp32
sharded master copy; each router is its own unit with the default (fp32) policy, so its weight is gathered in
fp32 and the logits stay fp32 (Megatron-Core's ``moe_router_dtype=fp32``), kept gathered from its forward to its
backward (:func:`apply_fsdp`). The residual stream is fp32 as without FSDP: the units do not cast their inputs,
and the embedding's bf16 output is cast to fp32 (its values are those of the bf16-gathered table). CPU runs are
fp32 throughout.

Gradient accumulation (``parallel.fsdp_keep_gathered``, on by default): :func:`set_micro_batch_sync` keeps the
gathered weights and the unsharded gradients between micro-batches (FSDP2's ``set_reshard_after_forward``,
``set_reshard_after_backward`` and ``set_requires_gradient_sync``, all ``False`` but for the last micro-batch):
the same all-gathers as one micro-batch and one reduce-scatter per unit per step instead of per micro-batch,
at the cost of holding the non-expert part's full parameters and gradients through the step (ZeRO-2's memory
for them). Off, every micro-batch reshards and reduce-scatters (ZeRO-3's memory).

Checkpoints (:mod:`moetrain.train.checkpoint`) hold the same entries with or without FSDP: the DTensors' shards
for the non-expert part (DCP records where each shard lies in the whole tensor) and one entry per global expert
for the routed experts, each written by the ranks holding its rows; :func:`reshard` first puts the sharded
parameters, the ones the optimizer steps, back in the modules.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from moetrain.parallel.context import ParallelContext
from moetrain.parallel.expert_parallel import moe_layers, use_unfused_dispatch

RESHARD_AFTER_FORWARD = "moetrain_reshard_after_forward"
"""The attribute on each unit holding its configured ``reshard_after_forward`` (restored for a step's last
micro-batch by :func:`set_micro_batch_sync`)."""


def _shard(module: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True, **kw: Any) -> FSDPModule:
    unit = cast(FSDPModule, fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, **kw))
    setattr(unit, RESHARD_AFTER_FORWARD, reshard_after_forward)
    return unit


def dp_mesh(pc: ParallelContext) -> DeviceMesh:
    """The ``"dp"`` mesh: the context mesh's two dimensions flattened (all W ranks, in rank order)."""
    assert pc.mesh is not None, "FSDP needs the distributed context's mesh"
    return pc.mesh["edp", "ep"]._flatten("dp")  # torchtitan's way to name a flattened dimension


def mixed_precision(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """Parameters all-gathered and computed in ``param_dtype`` (bf16 on a GPU), gradients reduced in fp32; the
    default policy (fp32 throughout) for ``None``. The units' inputs are left in their dtype
    (``cast_forward_inputs=False``): FSDP would otherwise cast every floating input of a unit to ``param_dtype``
    -- the residual stream entering each block, the RoPE tables, the global-batch counts and the experts'
    fp32 combine weights -- where autocast already computes the GEMMs in bf16 and leaves the rest fp32."""
    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def _fp32_output(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    """A forward hook: the module's output in fp32 (the embedding's, gathered in bf16: the residual stream starts
    fp32, as without FSDP)."""
    return out.float()


def apply_fsdp(model: nn.Module, pc: ParallelContext, param_dtype: torch.dtype | None = None) -> nn.Module:
    """``fully_shard`` the routed experts of each MoE layer over ``"edp"``, each router (fp32 always), each block
    and then the root over ``"dp"`` (module docstring), with :func:`mixed_precision` of ``param_dtype``. After
    :func:`~moetrain.parallel.expert_parallel.apply_expert_parallel`, activation checkpointing and compile, and
    before the optimizer is built (it must see the DTensor parameters). A no-op on one process. Returns
    ``model``."""
    if pc.world_size == 1:
        return model
    assert pc.mesh is not None, "FSDP needs the distributed context's mesh"
    mp, edp, mesh = mixed_precision(param_dtype), pc.mesh["edp"], dp_mesh(pc)
    ignored: set[nn.Parameter] = set()
    if edp.size() > 1:
        use_unfused_dispatch(model)  # the fused CPU path reads the weights outside the experts' forward
    for layer in moe_layers(model).values():
        if edp.size() > 1:
            layer.experts.cache_casts = False  # FSDP refills the gathered weights in place: no cached cast
            experts = _shard(layer.experts, edp, mp_policy=mp)
            experts.set_gradient_divide_factor(float(pc.world_size))  # sum over EDP / W
            if pc.backend == "gloo":  # no PREMUL_SUM in gloo: reduce-scatter a sum, then divide
                experts.set_force_sum_reduction_for_comms(True)
        else:
            ignored |= set(layer.experts.parameters())
        if param_dtype is not None:  # the router's weight is all-gathered and used in fp32 (fp32 logits)
            # Not resharded after forward: on torch 2.11 a unit nested in a block's unit is not gathered again
            # for its backward (its gradient's storage is freed: "setStorage ... storage of size 0"). The weight
            # is dim x experts fp32, small beside the block's; it is freed after backward like every unit's.
            _shard(layer.router, mesh, False, mp_policy=mixed_precision(None))
    if param_dtype is not None:  # the residual stream stays fp32 (mixed_precision): from the embedding on
        model.embed.register_forward_hook(_fp32_output)  # type: ignore[union-attr]
    blocks: nn.ModuleList = model.blocks  # type: ignore[assignment]
    for i, block in enumerate(blocks):
        # the last block's parameters are needed at once by the backward: keep them gathered after forward
        last = i == len(blocks) - 1
        _shard(block, mesh, not last, ignored_params=ignored, mp_policy=mp)
    _shard(model, mesh, False, ignored_params=ignored, mp_policy=mp)  # the root keeps its weights for backward
    return model


def fsdp_units(model: nn.Module) -> list[FSDPModule]:
    """Every ``fully_shard`` unit of the model (blocks, expert modules, routers, the root)."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model: nn.Module) -> None:
    """Register every unit's sharded parameters again. An evaluation forward leaves the root and the last block
    holding their gathered (plain) parameters until the next backward (they are not resharded after forward);
    a checkpoint reads and writes the sharded DTensors, the objects the optimizer's state is keyed by. A no-op
    for a model without FSDP units or already sharded."""
    for unit in fsdp_units(model):
        unit.reshard()


def set_micro_batch_sync(model: nn.Module, last: bool) -> None:
    """Before a forward of the step: unless it is the ``last`` micro-batch's, the units keep their gathered weights
    after forward and backward and their unsharded gradients (no reduce-scatter); the last reshards after
    forward as configured (to save memory while the backward walks back), re-gathers in backward and
    reduce-scatters the accumulated gradients (module docstring). A no-op for a model without FSDP units."""
    for unit in fsdp_units(model):
        unit.set_requires_gradient_sync(last, recurse=False)
        unit.set_reshard_after_backward(last, recurse=False)
        unit.set_reshard_after_forward(last and getattr(unit, RESHARD_AFTER_FORWARD), recurse=False)
