"""AdamW with decoupled weight decay on matrices only, and warmup + cosine schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from moetrain.config import OptimConfig

NO_DECAY_SUFFIXES = ("embed.weight",)
FSDP_GROUP_SUFFIX = "_fsdp"
"""Under FSDP a param group's DTensor half is named ``<group>_fsdp``: the same role as ``<group>``."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay every matrix (and stacked expert tensor) except embeddings; never norms or biases. Under FSDP
    each group is split in two: the plain (expert) parameters and the FSDP-sharded DTensors (``_fsdp``)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2 or name.endswith(NO_DECAY_SUFFIXES):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)]
    if any(isinstance(p, DTensor) for p in decay + no_decay):  # FSDP: a foreach kernel takes one kind only
        groups = [
            (name + suffix, [p for p in params if isinstance(p, DTensor) == sharded], wd)
            for name, params, wd in groups
            for sharded, suffix in ((False, ""), (True, FSDP_GROUP_SUFFIX))
        ]
    return [{"name": name, "params": params, "weight_decay": wd} for name, params, wd in groups]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return adamw(param_groups(model, cfg.weight_decay), cfg)


def adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over prepared parameter groups (the DeepSpeed engine splits the expert ones out first)."""
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        foreach=True,
    )


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup over ``warmup_steps`` to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``.

    ``step`` counts optimizer steps already taken (0 for the first step).
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg, max_steps))


def group_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's hyperparameters (all but its parameters), as this run's config built them."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def restart_schedule(
    optimizer: torch.optim.Optimizer, scheduler: Any, step: int, fresh: list[dict[str, Any]] | None = None
) -> None:
    """Put the warmup + cosine schedule at ``step`` optimizer steps taken, from this run's config: each group's
    ``lr`` = its ``initial_lr`` (``optim.lr``) x the multiplier at ``step`` (the lambdas are this run's,
    ``trainer.max_steps`` included). ``fresh`` (:func:`group_hyperparameters` taken before a checkpoint was
    loaded) replaces whatever hyperparameters the load restored (DeepSpeed's loader restores betas, eps and
    weight decay with the optimizer state). Used on resume, so that a change allowed by
    ``trainer.resume_allow_changes`` is in force from the first resumed step; torch's ``LambdaLR.step``
    computes ``base_lr * lr_lambda(last_epoch)`` the same way."""
    groups = optimizer.param_groups
    if fresh is not None:
        if len(fresh) != len(groups):
            raise RuntimeError(f"{len(groups)} optimizer param groups after the load, {len(fresh)} before")
        for group, hyper in zip(groups, fresh):
            group.update({k: v for k, v in hyper.items() if k != "lr"})
    scheduler.base_lrs = [float(g["initial_lr"]) for g in groups]
    scheduler.last_epoch = step
    scheduler._step_count = step + 1  # as after ``step`` calls of ``scheduler.step()`` (no order warning)
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
