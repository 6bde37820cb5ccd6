"""The pieces of a training step shared by every train module: a micro-batch's losses, the routing pre-pass.

Pure of any engine: a train module passes its own ``forward`` (the model, or
DeepSpeed's engine); the micro-batch loop is :meth:`moetrain.train.module.TrainModule.train_batch`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F

from moetrain.model.mtp import mtp_loss
from moetrain.model.transformer import ModelOutput
from moetrain.moe.layer import MoEStats, global_routing_counts
from moetrain.parallel.context import ParallelContext

Forward = Callable[..., ModelOutput]
"""``forward(tokens_BS)`` -> the model's output."""


def staged_for(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``batch`` in page-locked host memory when it goes to a CUDA device (one copy per step), else as it is.

    Each micro-batch is then copied with ``to(device, non_blocking=True)`` asynchronously; from pageable memory
    the copy first waits for the stream (a host synchronisation per micro-batch, and again in the routing
    pre-pass). The micro-batches are views of the pinned batch, so they are pinned too."""
    if device.type != "cuda" or batch.is_pinned():
        return batch
    return batch.pin_memory()


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (nats/token)."""
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())


def routing_prepass(
    forward: Forward,
    micro: list[torch.Tensor],
    pc: ParallelContext,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> dict[int, dict[str, torch.Tensor]]:
    """The step's f-type routing counts per MoE layer over all micro-batches and ranks (global-batch balance,
    Qiu et al. 2025, arXiv 2501.11873), from a no-grad routing pass under a forked RNG, so the real pass
    draws the same noise (noisy top-K) and routes identically. Costs one extra forward per micro-batch."""

    def routing_forward(mb: torch.Tensor) -> dict[int, MoEStats]:
        with autocast():
            return forward(mb.to(pc.device, non_blocking=True)[:, :-1]).moe_stats

    rng_devices = [pc.device.index or 0] if pc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        return global_routing_counts(routing_forward, micro, pc.all_reduce_sum)


def micro_batch_loss(
    forward: Forward,
    mb: torch.Tensor,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> tuple[ModelOutput, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One micro-batch of token ids ``[B, S + 1]`` forward: ``(output, LM loss, balance losses, MTP loss, the
    MTP depths' unweighted losses)``; the train module's loop (:meth:`moetrain.train.module.TrainModule.train_batch`)
    backpropagates the sum of the three losses. The MTP loss is 0 and the list empty without multi-token
    prediction. The layers read the step's global-batch counts from :func:`~moetrain.moe.step_state.step_state`,
    which the loop installs around every forward and backward of the step (a checkpointed block's recompute
    runs in the backward)."""
    mb = mb.to(device, non_blocking=True)
    with autocast():
        out = forward(mb[:, :-1])
        loss_lm = lm_loss(out.logits, mb[:, 1:])
        aux = out.aux_loss
        mtp, mtp_k = mtp_loss(out.mtp_logits, mb[:, 1:], out.mtp_lambda)  # 0 and [] without MTP
    return out, loss_lm, aux, mtp, mtp_k
