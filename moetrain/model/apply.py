"""Functions applied to the plain model from outside (torchtitan's ``apply_ac`` / ``apply_compile``).

Activation checkpointing and compilation work block by block, so they compose with
expert parallelism (the dispatcher inside each MoE layer is untouched) and with any
engine; the balanced hash fills the hash-routing tables from the training corpus.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from moetrain.data.packing import token_counts
from moetrain.model.transformer import Transformer
from moetrain.moe.dispatch import LocalDispatcher, default_slot_sum
from moetrain.moe.routing import balanced_hash_table


def all_blocks(model: Transformer) -> list[torch.nn.Module]:
    """The model's Transformer blocks, then its multi-token prediction modules' (``model.mtp_depth``,
    :mod:`moetrain.model.mtp`), which activation checkpointing and compilation treat alike. A pipeline stage
    (:class:`~moetrain.parallel.pipeline_stage.StageModule`) holds its blocks in an ``nn.ModuleDict``."""
    blocks = model.blocks.values() if isinstance(model.blocks, torch.nn.ModuleDict) else model.blocks
    return [*blocks, *(m.block for m in getattr(model, "mtp", ()))]


def apply_activation_checkpointing(model: Transformer) -> Transformer:
    """Recompute each block's activations in the backward pass instead of storing them
    (``trainer.activation_checkpointing``).

    Non-reentrant ``torch.utils.checkpoint`` with the RNG state preserved, so noisy
    routing draws the same noise when recomputed and the routing (hence the
    all-to-all under EP) is identical in both passes. The block's ``forward`` is
    rebound on the instance, so parameter names and checkpoints are unchanged; it takes the block's
    arguments as they come, keyword ones included (non-reentrant checkpointing passes them through). The MTP
    modules' blocks too (:func:`all_blocks`).
    """
    for block in all_blocks(model):
        if getattr(block, "activation_checkpointing", False):
            continue
        inner = block.forward

        def forward(*args: Any, _inner=inner, **kwargs: Any):  # type: ignore[no-untyped-def]
            return checkpoint(_inner, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

        block.forward = forward  # type: ignore[method-assign]
        block.activation_checkpointing = True
    return model


def apply_slot_sum(model: Transformer, device: torch.device) -> Transformer:
    """Give every one-process dispatcher the un-permutation for ``device`` (:func:`~moetrain.moe.dispatch.default_slot_sum`):
    chosen once, when the model is built for its device, not per call. Dispatchers that exchange rows between
    ranks keep their own combine. Returns ``model``."""
    impl = default_slot_sum(device)
    for layer in model.moe_layers().values():
        if isinstance(layer.dispatcher, LocalDispatcher):
            layer.dispatcher.slot_sum = impl
    return model


def apply_compile(model: Transformer, backend: str = "inductor") -> Transformer:
    """``torch.compile`` the model region by region (``trainer.compile``), as torchtitan's ``apply_compile`` does.

    A dense block is compiled whole. In an MoE block each piece without
    data-dependent shapes is compiled on its own, ``fullgraph=True`` (so a graph
    break is an error, not a silent fall back to eager): the norms, the
    attention, the router (scores, top-K, weights) and the shared experts (called
    in two parts, up and down, that the dispatcher overlaps with its all-to-alls:
    one graph each). The dispatch, the grouped experts, the combine and the
    statistics stay eager: their shapes depend on the routing (the rows per
    expert, the all-to-all splits), and the experts are already one grouped GEMM
    per projection. Compile
    time is that of the distinct regions (every block of a kind shares the
    compiled code), not of the whole model. The MTP modules' blocks are compiled the same way (:func:`all_blocks`).
    """
    for block in all_blocks(model):
        if getattr(block, "compiled", False):
            continue
        if not block.is_moe:
            block.compile(backend=backend, fullgraph=True)
        else:
            for module in (block.attn_norm, block.attn, block.ffn_norm, block.ffn.router, block.ffn.shared):
                if module is not None:
                    module.compile(backend=backend, fullgraph=True)
        block.compiled = True
    return model


@torch.no_grad()
def apply_balanced_hash(model: Transformer, train_tokens: Any) -> Transformer:
    """Fill every balanced hash table (``moe.router.hash_table=balanced``) from the training corpus.

    Roller et al. 2021's balanced assignment (:func:`~moetrain.moe.routing.balanced_hash_table`)
    from the token frequencies of ``train_tokens`` (the training split, any array of token
    ids); one table, shared by every MoE layer. Computed the same on every rank (same data),
    before any checkpoint is loaded (which restores the same table).
    """
    layers = [layer for layer in model.moe_layers().values() if layer.router.hash_table is not None]
    if not layers:
        return model
    table = layers[0].router.hash_table
    counts = torch.from_numpy(token_counts(train_tokens, table.shape[0]))  # shard by shard, nothing copied
    balanced = balanced_hash_table(counts, model.moe_cfg.num_experts, model.moe_cfg.top_k)
    for layer in layers:
        layer.router.hash_table.copy_(balanced.to(layer.router.hash_table.device))
    return model
