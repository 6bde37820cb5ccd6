"""FSDP2's DTensors as checkpoint entries: each rank reads and writes its own shard, never the whole tensor.

Under the native engine on several ranks (:mod:`moetrain.parallel.data_parallel`) a parameter and its AdamW moments
are DTensors: ``Shard(0)`` under ``parallel.fsdp=true`` (their ``shape`` is the whole tensor's, ``to_local()`` this
rank's rows), ``Replicate()`` otherwise (``to_local()`` is the whole tensor, as a plain one's).

* A **non-expert** entry is the DTensor itself. DCP writes each rank's shard with its offset in the whole
  tensor; on load it reads into a plain tensor (the whole, for a run without FSDP) or into a DTensor of any
  layout (this rank's part), so the entry is the same as a replicated run's and reshards freely.
* A **stacked expert** tensor ``[E, ...]`` (the EP-local experts) sharded over ``"edp"`` holds a run of rows on
  each rank (torch.chunk's split: the last ranks may hold fewer, or none). :func:`local_rows` gives them with
  their first row, so each rank writes, and reads into, the per-global-expert entries of the rows it holds
  (:mod:`moetrain.train.checkpoint.entries`).

Buffers read into (:func:`empty_buffer`) are a plain tensor's whole shape on the CPU, but for a DTensor only
this rank's shard, on the mesh's device (DTensor keeps its local tensor there).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a DTensor, a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_rows(t: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``(first, rows)``: the rows of a stacked tensor this rank holds (views, no copies) and the index of the
    first in the whole stack; all of a plain tensor's, or of a replicated DTensor's (first 0)."""
    if not isinstance(t, DTensor):
        return 0, t
    if all(isinstance(p, Replicate) for p in t.placements):  # FSDP2's replicate: every EDP rank holds them all
        return 0, t.to_local()
    if tuple(t.placements) != (Shard(0),):
        raise ValueError(f"stacked expert tensor with placements {t.placements}; expected (Shard(dim=0),)")
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return int(offset[0]), t.to_local()


def with_layout_of(target: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's part) as a tensor laid out like ``target``: for a DTensor target a DTensor of the
    same mesh, placements and whole shape (on the mesh's device); for a plain target ``local`` itself."""
    if not isinstance(target, DTensor):
        return local
    return DTensor.from_local(
        local, target.device_mesh, target.placements, run_check=False, shape=target.shape, stride=target.stride()
    )


def empty_buffer(t: torch.Tensor) -> torch.Tensor:
    """A fresh tensor to read ``t``'s entry into: the whole shape on the CPU for a plain tensor; this rank's
    shard only (same layout) for a DTensor."""
    if isinstance(t, DTensor):
        return with_layout_of(t, torch.empty_like(t.to_local()))
    return torch.empty(t.shape, dtype=t.dtype, device="cpu")


def owns_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` (a DTensor: its shard) is its storage's only view (DCP writes a view's whole storage)."""
    local = local_tensor(t)
    return local.untyped_storage().nbytes() == local.numel() * local.element_size()


def owned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it when it views a larger storage (a per-expert row, FSDP's padded shard)."""
    return t if owns_storage(t) else with_layout_of(t, local_tensor(t).clone())


@torch.no_grad()
def copy_local(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copy ``source`` into ``target``, shard into shard for DTensors of one layout (no communication)."""
    local_tensor(target).copy_(local_tensor(source))


def restored(fresh: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """A new tensor laid out like ``fresh`` (device, dtype, DTensor layout) holding ``source``'s values
    (``source``: a tensor of the same layout, or ``fresh``'s local part)."""
    local = local_tensor(fresh)
    return with_layout_of(fresh, local_tensor(source).to(device=local.device, dtype=local.dtype).clone())
