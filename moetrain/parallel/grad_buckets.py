"""Gradient all-reduce in buckets, overlapped with the backward (the native engine's data-parallel sync).

PyTorch DDP's design (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel
Training", VLDB, section 3.2: gradient bucketing, overlapping computation with communication, and skipping
the reduction while gradients accumulate):
many small all-reduces cost more than a few large ones, and one all-reduce after the whole backward leaves the
network idle while the backward computes. So the parameters are grouped into buckets of about
``parallel.bucket_mb`` MiB, and a bucket's all-reduce is launched (``async_op=True``) from a gradient hook as
soon as every one of its gradients is final, while the backward goes on to earlier layers.

- **Reduction groups** are those of :func:`~moetrain.parallel.grad_sync.sync_gradients` (scalings derived in
  its module docstring): non-expert parameters (and the experts, when ``ep == 1``) summed over all W ranks;
  expert shards over their expert-data-parallel (EDP) group; both then scaled by 1/W. With ``ep == W`` there
  is no EDP group: the expert gradients are only divided by W. DTensor parameters (FSDP) are left to FSDP.
- **Buckets** follow DDP's ``compute_bucket_assignment_by_size``: the parameters in reverse registration
  order (about the order the backward produces their gradients), one open bucket per (group, dtype), so a
  bucket never mixes reduction groups or dtypes; a bucket closes once it holds ``bucket_mb`` MiB, the first one
  of each kind at 1 MiB (DDP's first bucket: the first reduction starts early); buckets are then ordered by
  their first parameter.
- **Only the last micro-batch** reduces: earlier micro-batches accumulate locally (DDP's ``no_sync``). The
  hooks (``register_post_accumulate_grad_hook``, which runs once per backward after a leaf's gradient is
  accumulated, with activation checkpointing and per-block ``torch.compile`` too) act only inside
  :meth:`GradReducer.overlap`, which the train module wraps around the last backward.
- **Same collectives, same order, on every rank.** Collectives on a process group are matched by issue
  order, so buckets are launched strictly in bucket order: a ready bucket waits for the ones before it; the
  all-rank buckets use a process group of their own, which nothing else in the backward uses.
  A bucket holding a parameter that got no gradient on this rank is never ready in the backward; it and the
  buckets after it are launched when the backward returns, before anything else can issue a collective. Its
  missing gradients are sent as zeros, and each bucket carries one "has a gradient" flag per parameter in the
  same all-reduce (no extra collective): after the sum, a parameter no rank had a gradient for keeps
  ``grad = None`` (the optimizer skips it, as with the flat sync), one that some ranks had gets the sum.
- **Results equal the flat sync**: each bucket holds the same values as its slice of the flat all-reduce and
  is scaled the same way; on 2 ranks every sum is a + b, bitwise equal whatever the bucketing.

:func:`~moetrain.parallel.grad_sync.sync_gradients` finishes a reduction in flight instead of starting
another, so a caller that syncs after a trainer's backward never reduces twice. The reducer is attached to the
model in a weak-keyed table, as PyTorch's composable ``fully_shard`` keeps its state per module.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moetrain.parallel.context import ParallelContext
from moetrain.parallel.expert_parallel import expert_parameters

MIB = 2**20
FIRST_BUCKET_BYTES = MIB
"""DDP's ``_DEFAULT_FIRST_BUCKET_BYTES``: the first bucket of each kind, small so its reduction starts early."""


@dataclass(eq=False)
class Bucket:
    """Parameters reduced by one all-reduce: one process group, one dtype, in backward order."""

    params: list[nn.Parameter]
    group: Any
    """The process group it is all-reduced over."""
    nbytes: int = 0
    ready: int = 0
    """Parameters whose final gradient the armed backward has produced."""
    flat: torch.Tensor | None = field(default=None, repr=False)
    """While in flight: the gradients flattened, then one "has a gradient" flag per parameter."""
    work: Any = field(default=None, repr=False)

    def launch(self) -> None:
        """Flatten the gradients (zeros where a parameter has none) and the flags; start the all-reduce."""
        p0 = self.params[0]
        flags = torch.ones(len(self.params), dtype=p0.dtype, device=p0.device)
        pieces = []
        for i, p in enumerate(self.params):
            if p.grad is None:
                flags[i] = 0  # a device-side fill: no host sync
                pieces.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
            else:
                pieces.append(p.grad.reshape(-1))
        self.flat = torch.cat([*pieces, flags])
        self.work = dist.all_reduce(self.flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

    def finish(self, scale: float) -> None:
        """Wait, scale, write the sums back; a parameter no rank had a gradient for keeps ``None``."""
        assert self.flat is not None
        self.work.wait()
        flat = self.flat.mul_(scale)
        numel = sum(p.numel() for p in self.params)
        # the ranks that had each gradient: one host read, only in a bucket where this rank lacks one
        had = flat[numel:].tolist() if any(p.grad is None for p in self.params) else []
        offset = 0
        for i, p in enumerate(self.params):
            piece = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is not None:
                p.grad.copy_(piece)
            elif had[i] > 0:  # another rank had it: this rank's zeros went into the sum
                p.grad = piece.clone()
        self.flat = self.work = None
        self.ready = 0


def reduction_plan(
    model: nn.Module, pc: ParallelContext, all_ranks: Any = None
) -> tuple[list[tuple[nn.Parameter, Any]], list[nn.Parameter]]:
    """``([(parameter, process group), ...] in model order, local)``: what
    :func:`~moetrain.parallel.grad_sync.sync_gradients` all-reduces over which group (``all_ranks`` for the
    replicated parameters), and the expert parameters that are only divided by W (``ep == W``: no EDP group)."""
    expert_ids = {id(p) for p in expert_parameters(model)} if pc.ep_size > 1 else set()  # ep == 1: replicated
    plan: list[tuple[nn.Parameter, Any]] = []
    local: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad or isinstance(p, DTensor):  # FSDP reduce-scatters the DTensors itself
            continue
        if id(p) not in expert_ids:
            plan.append((p, all_ranks))
        elif pc.edp_group is not None:
            plan.append((p, pc.edp_group))
        else:  # this rank alone holds its expert shard
            local.append(p)
    return plan, local


def assign_buckets(plan: list[tuple[nn.Parameter, Any]], cap_bytes: int) -> list[Bucket]:
    """DDP's bucket assignment over ``plan`` reversed: one open bucket per (group, dtype), closed once it holds
    ``cap_bytes`` (the first of each kind ``min(FIRST_BUCKET_BYTES, cap_bytes)``), sorted by first parameter."""
    open_: dict[tuple[int, torch.dtype], Bucket] = {}
    first: dict[int, int] = {}  # id(bucket) -> position of its first parameter in backward order
    started: set[tuple[int, torch.dtype]] = set()  # kinds whose first bucket is closed
    out: list[Bucket] = []
    for pos, (p, group) in enumerate(reversed(plan)):
        key = (id(group), p.dtype)
        if key not in open_:
            open_[key] = Bucket([], group)
            first[id(open_[key])] = pos
        b = open_[key]
        b.params.append(p)
        b.nbytes += p.numel() * p.element_size()
        if b.nbytes >= (cap_bytes if key in started else min(FIRST_BUCKET_BYTES, cap_bytes)):
            started.add(key)
            out.append(open_.pop(key))
    out += open_.values()
    return sorted(out, key=lambda b: first[id(b)])


class GradReducer:
    """One model's buckets, and the hooks that launch them during the last backward of a step (module docstring).

    Use: ``with reducer.overlap(): loss.backward()`` for the last micro-batch, then :meth:`finish` (through
    :func:`~moetrain.parallel.grad_sync.sync_gradients`) before reading the gradients.
    """

    def __init__(self, buckets: list[Bucket], local: list[nn.Parameter], world_size: int) -> None:
        self.buckets, self.local, self.world_size = buckets, local, world_size
        self._armed = self._in_flight = False
        self._next = 0  # the first bucket not launched yet
        self._seen: set[int] = set()  # parameters whose hook ran in the armed backward
        self._handles = [
            p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, b)) for b in buckets for p in b.params
        ]

    @property
    def in_flight(self) -> bool:
        """The last backward launched this step's reduction and :meth:`finish` has not run yet."""
        return self._in_flight

    @contextmanager
    def overlap(self) -> Iterator[None]:
        """Arm the hooks for the backward run inside; when it returns, launch the buckets not launched yet (a
        parameter without a gradient on this rank held them back), so every rank has issued every bucket."""
        if self._armed or self._in_flight:
            raise RuntimeError("a gradient reduction is already in flight: sync_gradients() before the next one")
        self._armed = True
        try:
            yield
        except BaseException:
            self._reset()
            raise
        self._armed = False
        self._launch_ready(force=True)
        self._in_flight = True

    def finish(self) -> None:
        """Wait for every bucket in launch order, scale by 1/W, write back; divide the EP-local experts by W."""
        if not self._in_flight:
            raise RuntimeError("no gradient reduction in flight: run the last backward inside overlap() first")
        scale = 1.0 / self.world_size
        for b in self.buckets:
            b.finish(scale)
        for p in self.local:
            if p.grad is not None:
                p.grad.div_(self.world_size)  # as sync_gradients: div, not mul by 1/W (equal only for W = 2^k)
        self._reset()

    def remove(self) -> None:
        """Remove the hooks (the reducer does nothing afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on_grad(self, bucket: Bucket, p: torch.Tensor) -> None:
        if not self._armed:  # an earlier micro-batch, or a backward outside the train step: accumulate only
            return
        if id(p) in self._seen:
            raise RuntimeError("a gradient was accumulated twice in one backward (reentrant checkpointing?)")
        self._seen.add(id(p))
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch_ready()

    def _launch_ready(self, force: bool = False) -> None:
        """Launch buckets in order while the next one is complete (``force``: all the rest)."""
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
            if not force and b.ready < len(b.params):
                return
            b.launch()
            self._next += 1

    def _reset(self) -> None:
        for b in self.buckets:
            b.ready, b.flat, b.work = 0, None, None
        self._armed = self._in_flight = False
        self._next = 0
        self._seen.clear()


_REDUCERS: weakref.WeakKeyDictionary[nn.Module, GradReducer] = weakref.WeakKeyDictionary()
"""Each model's reducer, weakly keyed (the model owns its reducer's lifetime)."""


def apply_grad_buckets(model: nn.Module, pc: ParallelContext, bucket_mb: float) -> GradReducer | None:
    """Bucket ``model``'s gradient all-reduce (buckets of ``bucket_mb`` MiB) and hook it to the backward; after
    :func:`~moetrain.parallel.fsdp.apply_fsdp` (its DTensors are left out). ``None`` on one process."""
    remove_grad_buckets(model)
    if not pc.distributed:
        return None
    # A group of its own over all ranks: the backward's all-to-alls may run on the default group (a DeviceMesh
    # dimension spanning every rank is the default group), and whether a bucket launches before or after one of
    # them can differ between ranks (a parameter without a gradient holds its bucket back), while the
    # collectives of one group must be issued in the same order on every rank.
    plan, local = reduction_plan(model, pc, pc.own_group("grad_buckets"))
    reducer = GradReducer(assign_buckets(plan, int(bucket_mb * MIB)), local, pc.world_size)
    _REDUCERS[model] = reducer
    return reducer


def grad_reducer(model: nn.Module) -> GradReducer | None:
    """The reducer :func:`apply_grad_buckets` attached to ``model``, if any."""
    return _REDUCERS.get(model)


def remove_grad_buckets(model: nn.Module) -> None:
    """Detach ``model``'s reducer: its gradients go back to the flat sync after the backward."""
    reducer = _REDUCERS.pop(model, None)
    if reducer is not None:
        reducer.remove()
