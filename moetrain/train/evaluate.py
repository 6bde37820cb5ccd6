"""Evaluation: the loss over the whole validation split, and MaxVio of the load summed over it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from moetrain.data import val_batches
from moetrain.parallel.context import ParallelContext
from moetrain.train.metrics import MetricRecorder
from moetrain.train.module import TrainModule
from moetrain.train.moe_metrics import val_moe_metrics


@torch.no_grad()
def evaluate(
    module: TrainModule,
    val: np.ndarray,
    micro_batch_size: int,
    pc: ParallelContext,
    bits_per_byte: bool,
    stop: Callable[[], object] | None = None,
) -> dict[str, Any] | None:
    """``val/loss`` (nats per token over every validation token, float64 sums), ``val/ppl``, ``val/bpb`` for the
    byte tokenizer, and ``val/maxvio_global`` (Wang et al. 2024) with its per-layer values.

    Each rank evaluates its share of every global batch of ``micro_batch_size x W`` sequences (under pipeline
    parallelism each pipeline, of ``W / pp`` ones, a forward-only pass through the stages: the loss from the
    last stage, every layer's load from its stage, all summed over the ranks so every rank returns the same); a rank whose
    share is empty still runs a one-row forward (it joins its EP group's all-to-alls) and records zeros.
    ``stop`` is asked before each batch (the same answer on every rank: the trainer's signal vote); when it
    is true the evaluation ends there and returns ``None``, so a SIGTERM does not wait for the whole split.
    """
    model = module.model
    model.eval()
    whole = module.whole
    layers = sorted(i for i in whole.moe_layers() if i < whole.cfg.n_layers)  # MTP blocks are training only
    rec = MetricRecorder()
    for batch in val_batches(val, micro_batch_size * pc.dp_size, pc.dp_rank, pc.dp_size):
        if stop is not None and stop():
            model.train()
            return None
        empty = batch.shape[0] == 0
        tokens = torch.as_tensor(val[:1], dtype=torch.long) if empty else batch
        module.eval_step(tokens.to(pc.device), empty, rec)
    reduced = module.reduce_metrics(rec, "val")
    loss = 0.0
    if "val/loss_sum" in reduced:
        loss = (reduced.tensor("val/loss_sum") / reduced.tensor("val/tokens").clamp_min(1)).item()
    metrics: dict[str, Any] = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
    if bits_per_byte:
        metrics["val/bpb"] = loss / math.log(2)
    metrics.update(val_moe_metrics(reduced, layers))
    model.train()
    return metrics
