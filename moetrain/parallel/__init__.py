"""Parallelism applied to the plain model from outside: process layout, grad sync, expert sharding."""

from moetrain.parallel.context import ParallelContext, init_parallel
from moetrain.parallel.expert_parallel import apply_expert_parallel, expert_parameters, use_unfused_dispatch
from moetrain.parallel.grad_sync import clip_grad_norm, sync_gradients

__all__ = [
    "ParallelContext",
    "apply_expert_parallel",
    "clip_grad_norm",
    "expert_parameters",
    "init_parallel",
    "sync_gradients",
    "use_unfused_dispatch",
]
