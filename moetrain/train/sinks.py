"""Metric sinks: every logged event goes to ``metrics.jsonl``, W&B and the console alike.

Only rank 0 builds sinks. Each sink gets the same flat dict of the DESIGN.md
keys (``train/loss``, ``moe/layer_{i}/load``, ...); values are floats or lists.
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Protocol

from moetrain.config import WandbConfig


class MetricSink(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def close(self, exit_code: int = 0) -> None: ...


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the line parseable
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


class JSONLSink:
    """Appends one JSON object per event to ``metrics.jsonl``, flushed at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self, exit_code: int = 0) -> None:
        self._f.close()


def wandb_mode(cfg: WandbConfig) -> str:
    """``auto`` is online when an API key is set in the environment, offline otherwise."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if cfg.mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return cfg.mode


class WandbSink:
    """Logs to Weights & Biases; offline runs land in ``RUN_DIR/wandb`` for ``wandb sync``.

    Per-expert loads are logged as lists under their DESIGN.md keys and, for a
    person to read at a glance, as one heatmap per log step of every MoE layer's load
    (``moe/load_by_layer``, :func:`load_pictures`).
    """

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        self._wandb = wandb
        self.cfg = cfg
        self._load_history: list[dict[str, Any]] = []
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            tags=list(cfg.tags) or None,
            name=cfg.name or run_dir.name,
            dir=str(run_dir),
            mode=wandb_mode(cfg),
            config=config,
            settings=wandb.Settings(console="off", quiet=True),
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        data: dict[str, Any] = dict(metrics)
        if self.cfg.load_charts:
            data.update(load_pictures(self._wandb, step, metrics))
        loads = {k: v for k, v in metrics.items() if k.startswith("moe/layer_") and k.endswith("/load")}
        if loads:
            self._load_history.append({"step": step, **loads})
        if "val/loss" in metrics and self._load_history and self.cfg.load_charts:
            heatmap = self._heatmap()
            if heatmap is not None:
                data["moe/load_heatmap"] = heatmap
        self.run.log(data, step=step)

    def _heatmap(self) -> Any:
        """The per-layer expert-load heatmap of the run so far (``moetrain-plot``'s), as an image."""
        try:
            import matplotlib.pyplot as plt

            from moetrain.plot import load_heatmap_figure
        except ImportError:
            return None  # matplotlib is the optional `plot` extra
        fig = load_heatmap_figure(self._load_history)
        image = self._wandb.Image(fig)
        plt.close(fig)
        return image

    def close(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def load_pictures(wandb: Any, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """``{"moe/load_by_layer": image}``: the step's per-expert load of every MoE layer in one heatmap
    (layers x experts; one picture per log step however many layers), or ``{}`` without matplotlib
    (the ``plot`` extra) or without loads."""
    loads = {k: v for k, v in metrics.items() if k.startswith("moe/layer_") and k.endswith("/load")}
    loads = {k: v for k, v in loads.items() if isinstance(v, list) and v}
    if not loads:
        return {}
    try:
        import matplotlib.pyplot as plt

        from moetrain.plot import step_load_figure
    except ImportError:
        return {}
    fig = step_load_figure(loads, step)
    image = wandb.Image(fig)
    plt.close(fig)
    return {"moe/load_by_layer": image}


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
