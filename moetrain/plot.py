"""``moetrain-plot RUN_DIR [RUN_DIR ...]``: PNG figures from ``metrics.jsonl``.

Figures (in ``--out``, default ``RUN_DIR/plots`` for one run, ``./plots`` for several):

* ``loss.png``               train and validation loss against steps;
* ``maxvio.png``             MaxVio per MoE layer against steps (one panel per run);
* ``load_heatmap[_RUN].png`` per layer, each expert's share of the step's tokens over steps;
* ``drop_frac.png``          fraction of assignments dropped by capacity (when logged);
* ``devices_per_token.png``  distinct device groups per token (when logged).

Several run directories (or a sweep directory, whose job folders are expanded)
are overlaid, labelled by folder name. ``load_heatmap_figure`` is also what the
W&B sink logs as an image during training.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from moetrain.errors import guarded_main

LAYER_KEY = re.compile(r"^moe/layer_(\d+)/(load|maxvio|drop_frac|devices_per_token)$")


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit("moetrain-plot needs matplotlib: pip install 'moetrain[plot]'") from e
    return plt


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl`` (a line cut by a crash is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {run_dir} a moetrain run directory?)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of a scalar key."""
    pts = [(r["step"], float(r[key])) for r in records if key in r and isinstance(r[key], (int, float))]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def moe_layers(records: list[dict[str, Any]]) -> list[int]:
    return sorted({int(m.group(1)) for r in records for k in r if (m := LAYER_KEY.match(k))})


def load_matrix(records: list[dict[str, Any]], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps [S] and each expert's share of the step's assignments [N, S] for one layer."""
    key = f"moe/layer_{layer}/load"
    rows = [(r["step"], r[key]) for r in records if key in r]
    steps = np.array([s for s, _ in rows])
    loads = np.array([v for _, v in rows], dtype=float).T  # [N, S]
    totals = loads.sum(axis=0, keepdims=True)
    return steps, np.divide(loads, totals, out=np.zeros_like(loads), where=totals > 0)


def load_heatmap_figure(records: list[dict[str, Any]], title: str = "") -> Any:
    """One heatmap per MoE layer: experts (rows) x logged steps (columns), colour = share of tokens."""
    plt = _pyplot()
    layers = moe_layers(records)
    fig, axes = plt.subplots(len(layers), 1, figsize=(10, 2.2 + 1.6 * len(layers)), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        steps, share = load_matrix(records, layer)
        n = share.shape[0]
        im = ax.imshow(
            share,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            vmin=0.0,
            extent=(steps[0] - 0.5, steps[-1] + 0.5, n - 0.5, -0.5) if len(steps) else None,
        )
        ax.set_ylabel(f"layer {layer}\nexpert")
        fig.colorbar(im, ax=ax, label=f"share (1/N = {1 / max(n, 1):.3f})")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title or "tokens per expert (share of the step's assignments)")
    fig.tight_layout()
    return fig


def _lines(plt: Any, runs: dict[str, list[dict]], keys: list[str], ylabel: str, out: Path, logy: bool = False) -> bool:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for name, records in runs.items():
        for key in keys:
            steps, values = series(records, key)
            if len(steps):
                label = key if len(runs) == 1 else f"{name}: {key}"
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=label)
                drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def expand_runs(paths: list[Path]) -> dict[str, Path]:
    """Run directories by label: a sweep directory expands to its job folders."""
    runs: dict[str, Path] = {}
    for p in paths:
        if (p / "metrics.jsonl").is_file():
            runs[p.name] = p
        else:
            jobs = sorted(q.parent for q in p.glob("*/metrics.jsonl"))
            if not jobs:
                raise SystemExit(f"moetrain-plot: {p}: no metrics.jsonl here or in its subfolders")
            for j in jobs:
                runs[f"{p.name}/{j.name}"] = j
    return runs


def plot_runs(paths: list[Path], out: Path) -> list[Path]:
    """Write the figures for one or several runs; return the files written."""
    plt = _pyplot()
    runs = {name: read_metrics(d) for name, d in expand_runs(paths).items()}
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if _lines(plt, runs, ["train/loss", "val/loss"], "loss (nats/token)", out / "loss.png"):
        written.append(out / "loss.png")

    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 3.2 * len(runs)), squeeze=False)
    for ax, (name, records) in zip(axes[:, 0], runs.items()):
        for layer in moe_layers(records):
            steps, values = series(records, f"moe/layer_{layer}/maxvio")
            ax.plot(steps, values, label=f"layer {layer}")
        steps, values = series(records, "moe/maxvio")
        ax.plot(steps, values, "k--", lw=1.5, label="mean")
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("MaxVio")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "maxvio.png", dpi=110)
    plt.close(fig)
    written.append(out / "maxvio.png")

    for name, records in runs.items():
        if not moe_layers(records) or not any(k.endswith("/load") for r in records for k in r):
            continue
        fname = "load_heatmap.png" if len(runs) == 1 else f"load_heatmap_{name.replace('/', '_')}.png"
        fig = load_heatmap_figure(records, title=f"{name}: tokens per expert")
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(out / fname)

    for metric, ylabel in (("drop_frac", "dropped fraction"), ("devices_per_token", "device groups per token")):
        keys = sorted({k for r in runs.values() for rec in r for k in rec if k.endswith(f"/{metric}")})
        if keys and _lines(plt, runs, keys, ylabel, out / f"{metric}.png"):
            written.append(out / f"{metric}.png")
    return written


def _main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="PNG figures from moetrain run directories (metrics.jsonl).")
    p.add_argument("runs", nargs="+", type=Path, help="run directories, or a sweep directory")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/plots, or ./plots)")
    args = p.parse_args(argv)
    out = args.out or (args.runs[0] / "plots" if len(args.runs) == 1 else Path("plots"))
    for path in plot_runs(args.runs, out):
        print(path)


def main(argv: list[str] | None = None) -> None:
    """``moetrain-plot``: a user's mistake (bad path, unreadable checkpoint, full disk) is one line and exit 2."""
    guarded_main("moetrain-plot", lambda: _main(argv))


if __name__ == "__main__":
    main()
