"""Data parallelism of the native engine: one gradient path, torch's composable FSDP2 machinery on the named mesh.

Every parameter's gradient is reduced by a ``torch.distributed`` FSDP2 unit: ``fully_shard`` under
``parallel.fsdp=true`` (ZeRO-3, or ZeRO-2 between micro-batches with ``parallel.fsdp_keep_gathered``), else its
replicated sibling ``replicate`` (``torch.distributed._composable.replicate_with_fsdp``: the same units, hooks and
gradient-divide settings, the parameters replicated and the gradients all-reduced instead of reduce-scattered).
torchtitan's FSDP + EP layout over the context's mesh (:attr:`~moetrain.parallel.context.ParallelContext.mesh`,
named dimensions ``("edp", "ep")``, shape ``(W / ep, ep)``):

- **non-expert part** -- attention, norms, routers, shared experts, embedding, head: one unit per Transformer
  block and one for the root (embedding, final norm, LM head, tied or not), over ``"dp"`` (the two dimensions
  flattened: all W ranks). A gradient becomes the sum over W divided by W (docs/parallelism.md, "Gradient
  scaling").
- **routed experts** -- already split over ``"ep"`` by
  :func:`~moetrain.parallel.expert_parallel.apply_expert_parallel` (each rank holds ``N / ep`` experts); each MoE
  layer's :class:`~moetrain.moe.experts.GroupedExperts` is its own unit over ``"edp"``, the W / ep ranks holding
  the same experts. Their local gradient already sums the EP group's tokens (the all-to-all's backward), so the
  reduction over ``"edp"`` is a sum divided by W, not the mean over ``"edp"``
  (``set_gradient_divide_factor(W)``, docs/parallelism.md "Gradient scaling"). With ``ep == W`` ("edp" of size
  1) the unit only divides by W. With ``ep == 1`` and ``replicate`` the experts are replicated over all W ranks
  like the rest and stay in their block's unit (so the single-process fused dispatch, which reads the expert
  weights outside the experts' own forward, keeps working).

The reductions run in each unit's post-backward hook, as the backward leaves the unit (on a GPU on a stream of
their own, overlapping the backward of the units before it). Between micro-batches (:func:`set_micro_batch_sync`)
no unit reduces: the gradients accumulate unreduced and the last micro-batch's backward reduces the sums, once.
Every parameter of a unit must get a gradient on every rank or on none (FSDP2 skips a unit's parameters without
a gradient when it packs the reduction): moetrain's model uses every parameter in every forward (the grouped
experts run their GEMMs on zero rows too).

Numerics (gloo, fp32): ``replicate`` divides each rank's gradient by W and then sums (FSDP2's single-shard
path), where the flat all-reduce before it summed and then multiplied by 1/W; for W a power of two both are
exact scalings, so the results are bitwise equal; for other W they differ in the last bit.

:func:`~moetrain.parallel.clip.clip_grad_norm` counts each DTensor shard, and each replicated gradient, once; the
loss-free bias (a buffer) and the global-batch counts are untouched by FSDP2.

Precision under ``fully_shard`` (FSDP2's ``MixedPrecisionPolicy``): on a GPU with bf16 (``trainer.precision=bf16``,
or ``auto``) the parameters are all-gathered and computed in bf16 and gradients reduced in fp32, and AdamW steps
the fp32 sharded master copy; each router is its own unit with the default (fp32) policy, so its weight is
gathered in fp32 and the logits stay fp32 (Megatron-Core's ``moe_router_dtype=fp32``), kept gathered from its
forward to its backward (:func:`apply_data_parallel`). The residual stream is fp32 as without FSDP: the units do
not cast their inputs, and the embedding's bf16 output is cast to fp32 (its values are those of the
bf16-gathered table). ``replicate`` keeps fp32 parameters (autocast computes in bf16). CPU runs are fp32
throughout.

Gradient accumulation under ``fully_shard`` (``parallel.fsdp_keep_gathered``, on by default):
:func:`set_micro_batch_sync` also keeps the gathered weights between micro-batches (FSDP2's
``set_reshard_after_forward`` and ``set_reshard_after_backward``, ``False`` but for the last micro-batch): the
same all-gathers as one micro-batch and one reduce-scatter per unit per step, at the cost of holding the
non-expert part's full parameters and gradients through the step (ZeRO-2's memory for them). Off, every
micro-batch reshards and reduce-scatters (ZeRO-3's memory).

Checkpoints (:mod:`moetrain.train.checkpoint`) hold the same entries either way: the DTensors' shards for the
non-expert part (DCP records where each shard lies in the whole tensor) and one entry per global expert for the
routed experts, each written by the ranks holding its rows; :func:`reshard` first puts the sharded parameters,
the ones the optimizer steps, back in the modules.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import ReplicateModule, replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from moetrain.parallel.context import ParallelContext
from moetrain.parallel.expert_parallel import moe_layers, use_unfused_dispatch

RESHARD_AFTER_FORWARD = "moetrain_reshard_after_forward"
"""The attribute on each unit holding its configured ``reshard_after_forward`` (restored for a step's last
micro-batch by :func:`set_micro_batch_sync`); ``False`` for a ``replicate`` unit."""


def _unit(module: nn.Module, mesh: DeviceMesh, shard: bool, reshard_after_forward: bool, **kw: Any) -> FSDPModule:
    """``module`` made one ``fully_shard`` unit (``shard``) or one ``replicate`` unit over ``mesh``."""
    if shard:
        unit = cast(FSDPModule, fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, **kw))
    else:
        unit = cast(FSDPModule, replicate(module, mesh=mesh, **kw))
    setattr(unit, RESHARD_AFTER_FORWARD, shard and reshard_after_forward)
    return unit


def dp_mesh(pc: ParallelContext) -> DeviceMesh:
    """The ``"dp"`` mesh: the context mesh's two dimensions flattened (all W ranks, in rank order)."""
    assert pc.mesh is not None, "data parallelism needs the distributed context's mesh"
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


def _expert_units(model: nn.Module, pc: ParallelContext, shard: bool, mp: MixedPrecisionPolicy) -> None:
    """Each MoE layer's routed experts one unit over ``"edp"``, their reduction divided by W (module docstring)."""
    assert pc.mesh is not None
    for layer in moe_layers(model).values():
        layer.experts.cache_casts = False  # the units refill the gathered weights in place: no cached cast
        experts = _unit(layer.experts, pc.mesh["edp"], shard, True, mp_policy=mp)
        experts.set_gradient_divide_factor(float(pc.world_size))  # sum over EDP / W
        # No PREMUL_SUM in gloo: reduce-scatter a sum, then divide. Not on an "edp" of one rank (ep == W): there
        # FSDP2 (torch 2.13) divides by the factor before its local copy and, forced to sum, again after it.
        if shard and pc.backend == "gloo" and pc.edp_size > 1:
            experts.set_force_sum_reduction_for_comms(True)


def apply_data_parallel(
    model: nn.Module, pc: ParallelContext, *, shard: bool, param_dtype: torch.dtype | None = None
) -> nn.Module:
    """Make the routed experts of each MoE layer one unit over ``"edp"``, each router (fp32 always, under a bf16
    ``fully_shard`` policy), each block and then the root one unit over ``"dp"`` (module docstring):
    ``fully_shard`` units when ``shard``, else ``replicate`` units; :func:`mixed_precision` of ``param_dtype``
    (``fully_shard`` only). After :func:`~moetrain.parallel.expert_parallel.apply_expert_parallel`, activation
    checkpointing and compile, and before the optimizer is built (it must see the DTensor parameters). A no-op
    on one process. Returns ``model``."""
    if pc.world_size == 1:
        return model
    if not shard and param_dtype is not None:
        raise ValueError("replicate keeps fp32 parameters (autocast computes in bf16): param_dtype is for fully_shard")
    mp, mesh = mixed_precision(param_dtype), dp_mesh(pc)
    if shard or pc.ep_size > 1:  # replicated experts (ep == 1) are reduced like the rest: in their block's unit
        use_unfused_dispatch(model)  # the fused CPU path reads the expert weights outside the experts' forward
        _expert_units(model, pc, shard, mp)
    if param_dtype is not None:  # the router's weight is all-gathered and used in fp32 (fp32 logits)
        for layer in moe_layers(model).values():
            # Not resharded after forward: on torch 2.11 a unit nested in a block's unit is not gathered again
            # for its backward (its gradient's storage is freed: "setStorage ... storage of size 0"). The weight
            # is dim x experts fp32, small beside the block's; it is freed after backward like every unit's.
            _unit(layer.router, mesh, shard, False, mp_policy=mixed_precision(None))
        if model.embed is not None:  # a pipeline stage after the first has none
            model.embed.register_forward_hook(_fp32_output)  # type: ignore[union-attr]  # the residual stream: fp32
    blocks = list(model.blocks.values() if isinstance(model.blocks, nn.ModuleDict) else model.blocks)  # type: ignore[operator]
    dense = [_unit(b, mesh, shard, i != len(blocks) - 1, mp_policy=mp) for i, b in enumerate(blocks)]  # the last
    dense.append(_unit(model, mesh, shard, False, mp_policy=mp))  # block and the root keep their weights for backward
    if not shard:  # sum over all W ranks / W as an all-reduce of sums (gloo has no AVG); the experts' is set above
        for unit in dense:
            unit.set_gradient_divide_factor(float(pc.world_size))
    return model


def fsdp_units(model: nn.Module) -> list[FSDPModule]:
    """Every ``fully_shard`` or ``replicate`` unit of the model (blocks, expert modules, routers, the root)."""
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
    after forward and backward and their unreduced gradients (no reduction); the last reshards after forward as
    configured (to save memory while the backward walks back), re-gathers in backward and reduces the
    accumulated gradients (module docstring). A no-op for a model without units."""
    for unit in fsdp_units(model):
        unit.set_requires_gradient_sync(last, recurse=False)
        if isinstance(unit, ReplicateModule):  # nothing is gathered: its parameters are whole
            continue
        unit.set_reshard_after_backward(last, recurse=False)
        unit.set_reshard_after_forward(last and getattr(unit, RESHARD_AFTER_FORWARD), recurse=False)
