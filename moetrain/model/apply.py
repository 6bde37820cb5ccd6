"""Wrappers applied to the plain model from outside (torchtitan's ``apply_ac`` / ``apply_compile``).

Both work block by block, so they compose with expert parallelism (the dispatcher
inside each MoE layer is untouched) and with any engine.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from moetrain.model.transformer import Transformer


def apply_activation_checkpointing(model: Transformer) -> Transformer:
    """Recompute each block's activations in the backward pass instead of storing them
    (``trainer.activation_checkpointing``).

    Non-reentrant ``torch.utils.checkpoint`` with the RNG state preserved, so noisy
    routing draws the same noise when recomputed and the routing (hence the
    all-to-all under EP) is identical in both passes. The block's ``forward`` is
    rebound on the instance, so parameter names and checkpoints are unchanged.
    """
    for block in model.blocks:
        if getattr(block, "activation_checkpointing", False):
            continue
        inner = block.forward

        def forward(*args: torch.Tensor, _inner=inner):  # type: ignore[no-untyped-def]
            return checkpoint(_inner, *args, use_reentrant=False, preserve_rng_state=True)

        block.forward = forward  # type: ignore[method-assign]
        block.activation_checkpointing = True
    return model


def apply_compile(model: Transformer, backend: str = "inductor") -> Transformer:
    """``torch.compile`` each block separately (``trainer.compile``), as torchtitan does.

    Per-block compilation keeps compile time bounded by one block and lets the
    data-dependent parts of the MoE layer (expert counts, the all-to-all) fall
    back to eager at graph breaks instead of failing.
    """
    for block in model.blocks:
        block.compile(backend=backend, dynamic=True)
    return model
