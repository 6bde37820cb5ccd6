"""Count the operations that would synchronise a CUDA device with the host, on any device.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` catches a host sync as it
happens; the CPU has no such thing, so this mode records, on CPU tensors, the
aten ops that would make one on CUDA: reading a value (``item``, ``tolist``,
``bool``), ops whose output size depends on the data (``nonzero``, boolean
indexing, ``masked_select``, ``unique``, ``bincount``, ``repeat_interleave``
without ``output_size``), and tensors made from host data (``torch.tensor``,
``new_tensor``: ``lift_fresh``; on CUDA a copy from pageable memory, which waits
for the stream). It is a conservative list of the usual culprits, not a
proof; the CUDA test suite checks the real thing with the debug mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

DATA_DEPENDENT = {
    aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t)
    aten.nonzero.default,
    aten.nonzero_numpy.default,
    aten.masked_select.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.bincount.default,
    aten.histc.default,
    aten.lift_fresh.default,  # torch.tensor(data) / new_tensor(data): a host-to-device copy on CUDA
}


def _is_sync(func: Any, args: tuple, kwargs: dict) -> bool:
    if func in DATA_DEPENDENT:
        return True
    if func.overloadpacket is aten.repeat_interleave and func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None and (len(args) < 2 or args[1] is None)
    if func.overloadpacket is aten.repeat_interleave and func is aten.repeat_interleave.self_Tensor:
        return kwargs.get("output_size") is None
    if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        indices = args[1] if len(args) > 1 else []
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices if i is not None)
    return False


class HostSyncs(TorchDispatchMode):
    """``with HostSyncs() as s: ...`` then ``s.ops``: the names of the would-be synchronising ops, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self._tolist = torch.Tensor.tolist

    def __enter__(self) -> HostSyncs:
        mode = self
        original = self._tolist

        def tolist(t: torch.Tensor) -> Any:  # tolist reads memory directly, without an aten op
            mode.ops.append("tolist")
            return original(t)

        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)
