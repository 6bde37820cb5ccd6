"""Parallelism applied to the plain model from outside: process layout, grad sync, expert sharding."""

from moetrain.parallel.context import ParallelContext, init_parallel

__all__ = ["ParallelContext", "init_parallel"]
