"""Reading an offline W&B run back (the tests check what the W&B sink logged)."""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path
from typing import Any


def read_wandb_records(run_dir: str | Path) -> list[Any]:
    """The protobuf records of the newest W&B run under ``run_dir/wandb`` (offline or synced),
    read from its ``.wandb`` transaction log (LevelDB log format after a 7-byte header:
    32 KiB blocks of chunks, each with a 7-byte header: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    paths = sorted(glob.glob(str(Path(run_dir) / "wandb" / "*run-*" / "*.wandb")))
    if not paths:
        raise FileNotFoundError(f"no W&B run under {run_dir}/wandb")
    data = Path(paths[-1]).read_bytes()
    block, pos, pending, chunks = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    records = []
    for raw in chunks:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def read_wandb_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The history rows (one per ``log`` call) of the W&B run under ``run_dir``, values decoded from JSON."""
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in read_wandb_records(run_dir)
        if r.WhichOneof("record_type") == "history"
    ]


def read_wandb_run(run_dir: str | Path) -> dict[str, Any]:
    """Name, project and group of the W&B run under ``run_dir``."""
    for r in read_wandb_records(run_dir):
        if r.WhichOneof("record_type") == "run":
            return {"name": r.run.display_name, "project": r.run.project, "group": r.run.run_group}
    raise ValueError(f"no run record in the W&B run under {run_dir}")
