"""One step's gradient accumulation, shared by every train module: micro-batches, losses, metrics.

Pure of any engine: a train module passes its own ``forward`` (the model, or
DeepSpeed's engine) and ``backward``; this module runs the micro-batches, the
global-batch routing pre-pass and records what each micro-batch produced.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from moetrain.model.mtp import mtp_loss
from moetrain.model.transformer import ModelOutput
from moetrain.moe.layer import MoEStats, global_routing_counts
from moetrain.moe.step_state import step_state
from moetrain.parallel.context import ParallelContext
from moetrain.train.metrics import MetricRecorder
from moetrain.train.moe_metrics import record_moe

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


def accumulate_gradients(
    forward: Forward,
    backward: Callable[[torch.Tensor, int], None],
    micro: list[torch.Tensor],
    rec: MetricRecorder,
    autocast: Callable[[], AbstractContextManager[Any]],
    device: torch.device,
    global_counts: dict[int, dict[str, torch.Tensor]] | None = None,
    last_backward: Callable[[], AbstractContextManager[Any]] | None = None,
) -> None:
    """Forward and backward of each micro-batch; records ``train/loss``, ``train/aux_loss`` (means over
    micro-batches and ranks) and every MoE layer's statistics.

    ``backward(loss, num_micro)`` accumulates the gradient of ``loss / num_micro``, so with equal micro-batch
    sizes the accumulated gradient is that of the mean loss over the rank's sequences. ``last_backward()``, if
    given, is entered around the last micro-batch's backward only, the one that makes the step's final
    gradients (the native engine overlaps their all-reduce with it, :mod:`moetrain.parallel.grad_buckets`).
    ``global_counts`` (the routing pre-pass's) are installed for every forward and backward of the step
    (:func:`~moetrain.moe.step_state.step_state`).
    """
    with step_state(global_counts=global_counts):
        for i, mb in enumerate(micro):
            mb = mb.to(device, non_blocking=True)
            with autocast():
                out = forward(mb[:, :-1])
                loss_lm = lm_loss(out.logits, mb[:, 1:])
                aux = out.aux_loss
                mtp, mtp_k = mtp_loss(out.mtp_logits, mb[:, 1:], out.mtp_lambda)  # 0 and [] without MTP
            with last_backward() if last_backward is not None and i == len(micro) - 1 else nullcontext():
                backward(loss_lm + aux + mtp if mtp_k else loss_lm + aux, len(micro))
            rec.record("train/loss", loss_lm, "mean")
            rec.record("train/aux_loss", aux, "mean")
            for k, loss_k in enumerate(mtp_k, start=1):
                rec.record(f"train/mtp_loss_{k}", loss_k, "mean")  # DeepSeek-V3 eq. 24, unweighted
            record_moe(rec, out.moe_stats)
