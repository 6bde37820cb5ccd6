"""Uneven all-to-all over one process group: blocking, or launched so that independent work runs while it is in flight.

:func:`all_to_all` is the blocking exchange (autograd-aware), :func:`all_to_all_detached` the same for
tensors that carry no gradient (counts, routing metadata), and :func:`start_all_to_all` launches the
exchange with ``async_op=True`` and returns a :class:`PendingAllToAll` whose ``wait()`` gives the result.
Whatever the caller computes between the two runs while the data moves: the computation/communication
overlap of DeepSeek-V3 (technical report, arXiv 2412.19437, sec. 3.2.1, where each chunk's all-to-all
dispatch and combine are hidden behind another chunk's computation, and sec. 3.2.2, whose all-to-all
kernels leave the SMs to that computation), and of Megatron-Core's ``moe_shared_expert_overlap``, whose
shared experts run while the dispatcher's all-to-alls are in flight.

Autograd. A differentiable exchange is two nodes, :class:`_Launch` and :class:`_Land`, joined by an
empty carrier tensor. Forward: ``_Launch`` starts the exchange, the work done before ``wait()`` records
its nodes after it, ``_Land`` waits. Backward runs the other way: ``_Land``'s backward launches the
reverse exchange of the gradient and returns at once; ``_Launch``'s backward waits for it. Between the
two, the engine runs the backward of the work done during the forward exchange: among the nodes ready to
run it always picks the one created last (the highest sequence number; the CPU and the CUDA ready queues
both), and those nodes were created after ``_Launch``. So that backward overlaps the backward exchange
with nothing set by hand (Megatron-Core sets sequence numbers, ``_set_sequence_nr``, to the same end),
and the gradients reach every tensor in the order the blocking exchange gave: the results are bitwise
those of the blocking path.

Backends. gloo runs an async collective on its worker threads: on CPU the overlap is real, the main
thread computes while a worker copies (they share the cores). NCCL runs it on the process group's
internal stream and ``wait()`` makes the current stream wait for it without blocking the host: the
kernels issued in between (e.g. the shared experts' GEMMs) run on the default stream while NCCL's kernels
run, sharing the SMs. gloo with CUDA tensors goes through host memory: the copy to the host happens
before the launch (synchronous), the copy back after the wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class PendingAllToAll:
    """An uneven all-to-all launched with ``async_op=True`` (no autograd); :meth:`wait` returns its result."""

    def __init__(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> None:
        self._device = x.device if x.is_cuda and dist.get_backend(group) == "gloo" else None
        self._src = (x.detach().cpu() if self._device is not None else x.detach()).contiguous()
        self._out = self._src.new_empty((sum(out_splits), *self._src.shape[1:]))
        self._work = dist.all_to_all_single(
            self._out, self._src, out_splits, in_splits, group=group, async_op=True
        )  # the source stays referenced until the wait

    def wait(self) -> torch.Tensor:
        """Block until the exchange is done (on NCCL: make the current stream wait); its output, on ``x``'s device."""
        self._work.wait()
        out = self._out if self._device is None else self._out.to(self._device)
        del self._src, self._out
        return out


def all_to_all_detached(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    """``dist.all_to_all_single`` with uneven first-dim splits, returning a new tensor without autograd history."""
    return PendingAllToAll(x, out_splits, in_splits, group).wait()


@dataclass
class _Exchange:
    """One differentiable exchange split into a launch and a wait, forward and backward."""

    out_splits: list[int]
    in_splits: list[int]
    group: Any
    forward: PendingAllToAll | None = None
    backward: PendingAllToAll | None = None


class _Launch(torch.autograd.Function):
    """Forward: launch the exchange, return an empty carrier. Backward: wait for the reverse exchange."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, ex: _Exchange) -> torch.Tensor:
        ex.forward = PendingAllToAll(x, ex.out_splits, ex.in_splits, ex.group)
        ctx.ex = ex
        return x.new_empty(0)

    @staticmethod
    def backward(ctx: Any, _carrier: torch.Tensor) -> tuple[torch.Tensor, None]:
        ex: _Exchange = ctx.ex
        assert ex.backward is not None, "the reverse exchange is launched by _Land's backward"
        pending, ex.backward = ex.backward, None
        return pending.wait(), None


class _Land(torch.autograd.Function):
    """Forward: wait for the exchange, return its output. Backward: launch the reverse exchange of the gradient."""

    @staticmethod
    def forward(ctx: Any, _carrier: torch.Tensor, ex: _Exchange) -> torch.Tensor:
        assert ex.forward is not None, "the exchange is launched by _Launch"
        pending, ex.forward = ex.forward, None
        ctx.ex = ex
        return pending.wait()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ex: _Exchange = ctx.ex
        ex.backward = PendingAllToAll(grad.contiguous(), ex.in_splits, ex.out_splits, ex.group)
        return grad.new_empty(0), None


class _DifferentiablePending:
    """A differentiable exchange in flight: :meth:`wait` records the ``_Land`` node."""

    def __init__(self, carrier: torch.Tensor, ex: _Exchange) -> None:
        self._carrier, self._ex = carrier, ex

    def wait(self) -> torch.Tensor:
        return _Land.apply(self._carrier, self._ex)


def start_all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any
) -> PendingAllToAll | _DifferentiablePending:
    """Launch the exchange of :func:`all_to_all`; ``wait()`` on the result returns what it would.

    Autograd-aware when ``x`` needs a gradient: the backward launches the reverse exchange where the
    forward waited and waits where the forward launched (module docstring), so the backward of the
    work done in between overlaps it too.
    """
    if not (x.requires_grad and torch.is_grad_enabled()):
        return PendingAllToAll(x, out_splits, in_splits, group)
    ex = _Exchange(out_splits, in_splits, group)
    return _DifferentiablePending(_Launch.apply(x, ex), ex)


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    """Send ``x[sum(in_splits[:j]) : ...]`` to rank j of ``group``, blocking; autograd-aware when ``x`` needs a
    gradient (the backward is the reverse exchange of the gradient)."""
    return start_all_to_all(x, out_splits, in_splits, group).wait()
