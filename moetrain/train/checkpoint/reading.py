"""Reading checkpoints safely: nothing is unpickled but tensors and DCP's own index classes.

Tensor data is read by DCP with ``torch.load(weights_only=True)``, and the DCP
index (a pickle) with an unpickler that admits only DCP's metadata classes,
torch dtypes and sizes. Every wanted entry is checked (present, same shape,
data files long enough) and read into fresh tensors first: a bad checkpoint
raises :class:`CheckpointError` with one line naming the file and the mismatch,
and leaves the model and optimizer untouched. A DTensor (FSDP) target is checked
by its whole shape and read into a fresh buffer of its own layout, this rank's
shard only (:func:`~moetrain.train.checkpoint.sharded.empty_buffer`).
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from moetrain.train.checkpoint.layout import (
    CheckpointError,
    agree,
    one_line,
)
from moetrain.train.checkpoint.sharded import empty_buffer

SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"
"""DCP warns on every single-process save/load that it assumes one process; that is the intent here."""


@contextmanager
def quiet_dcp() -> Iterator[None]:
    """Silence :data:`SINGLE_PROCESS_WARNING` around one of moetrain's own DCP calls (no process-wide filter)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
        yield


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` index: only DCP metadata classes, torch dtypes/sizes and paths."""

    _MODULES: ClassVar[tuple[str, ...]] = ("torch.distributed.checkpoint.metadata",)
    _GLOBALS: ClassVar[set[tuple[str, str]]] = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module in self._MODULES or (module, name) in self._GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.memory_format):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint index")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with a restricted unpickler for the index (tensors already load weights-only)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(str(self.path)) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _SafeUnpickler(io.BytesIO(f.read())).load()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing") from None
        except Exception as e:  # truncated / corrupt / hostile pickle
            raise CheckpointError(f"{path}: unreadable checkpoint index ({one_line(e)})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not a DCP checkpoint index")
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def check_entries(ckpt: Path, metadata: Metadata, wanted: dict[str, torch.Tensor]) -> None:
    """Every wanted entry exists with the same (whole, for a DTensor) shape, and every data file is long enough."""
    index = metadata.state_dict_metadata
    for key, t in wanted.items():
        md = index.get(key)
        if md is None:
            raise CheckpointError(f"{ckpt / '.metadata'}: no entry {key!r} (the checkpoint was saved by another model)")
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{ckpt / '.metadata'}: entry {key!r} is not a tensor")
        if tuple(md.size) != tuple(t.shape):
            raise CheckpointError(
                f"{ckpt / '.metadata'}: {key} has shape {tuple(md.size)} in the checkpoint, "
                f"{tuple(t.shape)} in this run"
            )
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = str(info.relative_path)
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, length in sorted(need.items()):
        f = ckpt / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing data file")
        size = f.stat().st_size
        if size < length:
            raise CheckpointError(f"{f}: truncated ({size} bytes, the index needs {length})")


def read_entries(
    ckpt: Path,
    wanted: dict[str, torch.Tensor],
    optional: tuple[str, ...] = (),
    group: Any = None,
    distributed: bool = False,
) -> dict[str, torch.Tensor]:
    """Validate and read ``wanted`` (plus any ``optional`` keys present) into fresh tensors (CPU; a DTensor's
    shard on its device).

    Raises :class:`CheckpointError` on every rank if any rank finds a problem;
    nothing of the caller's is touched.
    """
    reader = SafeFileSystemReader(str(ckpt))
    error = None
    buffers: dict[str, torch.Tensor] = {}
    try:
        metadata = reader.read_metadata()
        check_entries(ckpt, metadata, wanted)
        buffers = {k: empty_buffer(v) for k, v in wanted.items()}
        for key in optional:
            md = metadata.state_dict_metadata.get(key)
            if isinstance(md, TensorStorageMetadata):
                buffers[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    except CheckpointError as e:
        error = str(e)
    agree(error, group, distributed)
    try:
        with quiet_dcp():
            dcp.load(buffers, storage_reader=reader, process_group=group, no_dist=not distributed)
    except Exception as e:
        raise CheckpointError(f"{ckpt}: cannot read tensor data ({one_line(e)})") from None
    return buffers
