"""Metric sinks: every logged event goes to ``metrics.jsonl``, W&B and the console alike.

Only rank 0 builds sinks. Each sink gets the same flat dict of the docs/metrics.md
keys (``train/loss``, ``moe/layer_{i}/load``, ...); values are floats or lists.
The console and ``train.log`` lines are :class:`moetrain.train.console.LogSink`'s.
To add a sink, implement :class:`MetricSink` and open it in ``Trainer._open_sinks``.
"""

from __future__ import annotations

import json
import logging
import math
import os
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

    Per-expert loads are logged as lists under their docs/metrics.md keys and, for a
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

            from moetrain.tools.plot import load_heatmap_figure
        except ImportError:
            say_no_pictures()
            return None
        fig = load_heatmap_figure(self._load_history)
        image = self._wandb.Image(fig)
        plt.close(fig)
        return image

    def close(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


_SAID_NO_PICTURES: list[bool] = []


def say_no_pictures() -> None:
    """Once per process: W&B gets no load pictures, and why (matplotlib, a default dependency, is missing)."""
    if _SAID_NO_PICTURES:
        return
    _SAID_NO_PICTURES.append(True)
    from moetrain.extras import install_hint

    logging.getLogger("moetrain").warning(
        f"moetrain: note: W&B gets no load pictures (moe/load_heatmap, moe/load_by_layer): matplotlib is missing; "
        f"{install_hint('matplotlib')}"
    )


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

        from moetrain.tools.plot import step_load_figure
    except ImportError:
        say_no_pictures()
        return {}
    fig = step_load_figure(loads, step)
    image = wandb.Image(fig)
    plt.close(fig)
    return {"moe/load_by_layer": image}
