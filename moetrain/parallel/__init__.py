"""Parallelism applied to the plain model from outside: process layout, expert sharding, data parallelism, clipping."""

from moetrain.parallel.clip import clip_grad_norm
from moetrain.parallel.context import ParallelContext, init_parallel
from moetrain.parallel.data_parallel import apply_data_parallel
from moetrain.parallel.expert_parallel import apply_expert_parallel, expert_parameters, use_unfused_dispatch

__all__ = [
    "ParallelContext",
    "apply_data_parallel",
    "apply_expert_parallel",
    "clip_grad_norm",
    "expert_parameters",
    "init_parallel",
    "use_unfused_dispatch",
]
