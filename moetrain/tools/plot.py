"""``moetrain-plot RUN_DIR [RUN_DIR ...]``: PNG figures from ``metrics.jsonl``.

Figures (in ``--out``, default ``RUN_DIR/plots`` for one run, ``./plots`` for several):

* ``loss.png``               train and validation loss against steps;
* ``maxvio.png``             MaxVio per MoE layer against steps (one panel per run);
* ``load_heatmap[_RUN].png`` per layer, each expert's share of the step's tokens over steps;
* ``drop_frac.png``          fraction of assignments dropped by capacity (when logged);
* ``devices_per_token.png``  distinct device groups per token (when logged).

Several run directories (or a sweep directory of any Hydra launcher, whose job
folders are expanded) are overlaid, each labelled by what sets it apart: the
overrides the runs do not share (``job.json`` or Hydra's ``.hydra/overrides.yaml``),
else the ``config.yaml`` keys whose values differ, else the folder name. A
drop-fraction figure is drawn only for layers where something was dropped.
``--html`` also writes ``report.html``: one page with the figures and the
run's config (:mod:`moetrain.tools.report`). ``load_heatmap_figure`` is also what the
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
from moetrain.extras import require
from moetrain.tools.run_records import read_metrics

LAYER_KEY = re.compile(r"^moe/layer_(\d+)/(load|maxvio|drop_frac|devices_per_token)$")


def _pyplot() -> Any:
    """matplotlib's pyplot (Agg), or one line naming the command that installs it (:mod:`moetrain.extras`)."""
    require("matplotlib", "moetrain-plot draws with it").use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


BALANCE_CMAP = "RdBu_r"
"""Diverging: blue = under-loaded, white = the balanced share 1/N, red = over-loaded."""


def balance_norm(share: np.ndarray, n: int) -> Any:
    """A colour scale centred on the balanced share ``1/N`` (white), from 0 (deep blue, an idle expert) to at
    least ``2/N`` (deep red), so over- and under-loaded experts read at a glance in any run."""
    from matplotlib.colors import TwoSlopeNorm

    even = 1 / max(n, 1)
    top = max(float(share.max()) if share.size else 0.0, 2 * even)
    return TwoSlopeNorm(vmin=0.0, vcenter=even, vmax=top)


def balance_colorbar(fig: Any, im: Any, ax: Any, n: int) -> Any:
    """The colour bar of a load heatmap, with ticks at 0, 1/N (labelled) and the top of the scale."""
    bar = fig.colorbar(im, ax=ax, label="share of tokens", pad=0.01)
    top = im.norm.vmax
    bar.set_ticks([0.0, 1 / max(n, 1), top], labels=["0", f"1/N={1 / max(n, 1):.3f}", f"{top:.2f}"])
    return bar


def balance_label(n: int) -> str:
    return f"share of tokens (white = 1/N = {1 / max(n, 1):.3f}; red over, blue under)"


def load_heatmap_figure(records: list[dict[str, Any]], title: str = "") -> Any:
    """One heatmap per MoE layer: experts (rows) x logged steps (columns), colour = share of tokens on a
    diverging scale centred on 1/N (:func:`balance_norm`); the layers share the step axis."""
    plt = _pyplot()
    layers = moe_layers(records)
    fig, axes = plt.subplots(
        len(layers), 1, figsize=(10, 1.6 + 1.7 * len(layers)), squeeze=False, sharex=True, layout="constrained"
    )
    for ax, layer in zip(axes[:, 0], layers):
        steps, share = load_matrix(records, layer)
        n = share.shape[0]
        im = ax.imshow(
            share,
            aspect="auto",
            interpolation="nearest",
            cmap=BALANCE_CMAP,
            norm=balance_norm(share, n),
            extent=(steps[0] - 0.5, steps[-1] + 0.5, n - 0.5, -0.5) if len(steps) else None,
        )
        ax.set_ylabel(f"layer {layer}\nexpert")
        balance_colorbar(fig, im, ax, n)
    axes[-1, 0].set_xlabel("step")
    n = load_matrix(records, layers[0])[1].shape[0] if layers else 1
    fig.suptitle(f"{title or 'tokens per expert'}: {balance_label(n)}", fontsize=10)
    return fig


def step_load_figure(loads: dict[str, list[float]], step: int) -> Any:
    """One step's load as one heatmap: MoE layers (rows) x experts (columns), colour = share of the layer's
    assignments (what W&B shows at every log step, instead of a bar chart per layer)."""
    plt = _pyplot()
    keys = sorted(loads, key=lambda k: int(LAYER_KEY.match(k).group(1)))  # type: ignore[union-attr]
    counts = np.array([loads[k] for k in keys], dtype=float)  # [L, N]
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    n_layers, n = share.shape
    size = (min(max(6.5, 3 + 0.18 * n), 14), min(max(3.0, 1.6 + 0.22 * n_layers), 14))
    fig, ax = plt.subplots(figsize=size, layout="constrained")  # constrained: no label clipped in W&B's image
    im = ax.imshow(share, aspect="auto", interpolation="nearest", cmap=BALANCE_CMAP, norm=balance_norm(share, n))
    ax.set_yticks(range(n_layers), [k.split("/")[1].removeprefix("layer_") for k in keys], fontsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    balance_colorbar(fig, im, ax, n)
    ax.set_title(f"tokens per expert, step {step}\n{balance_label(n)}", fontsize=9)
    return fig


STYLES = ("-", "--", ":", "-.")
"""Line style by key, in the order given: train solid, val dashed (then the rest)."""
KEY_LABELS = {
    "train/loss": "train (train/loss)",
    "val/loss": "val (val/loss)",
    "moe/maxvio": "train: layers' mean (moe/maxvio)",
    "val/maxvio_global": "val: global (val/maxvio_global)",
}


def _lines(plt: Any, runs: dict[str, list[dict]], keys: list[str], ylabel: str, out: Path, logy: bool = False) -> bool:
    """Save :func:`lines_figure` to ``out``; ``False`` (nothing written) when no run logged any of the keys."""
    fig = lines_figure(plt, runs, keys, ylabel, logy)
    if fig is None:
        return False
    fig.savefig(out, dpi=110, bbox_inches="tight")  # the legends outside the axes included
    plt.close(fig)
    return True


def lines_figure(plt: Any, runs: dict[str, list[dict]], keys: list[str], ylabel: str, logy: bool = False) -> Any:
    """One panel for every run and key: one colour per run, a line style per key (``keys[0]`` solid, ``keys[1]``
    dashed, ...), two legends outside the axes (runs by colour, keys by style) so nothing covers a curve."""
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(10, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn_runs, drawn_keys = [], []
    one_run = len(runs) == 1
    for i, (name, records) in enumerate(runs.items()):
        for j, key in enumerate(keys):
            steps, values = series(records, key)
            if not len(steps):
                continue
            colour = colours[(j if one_run and len(keys) > len(STYLES) else i) % len(colours)]
            style = STYLES[j % len(STYLES)]
            ax.plot(steps, values, style, color=colour, marker="o" if len(steps) < 30 else None, ms=3, lw=1.6)
            drawn_runs += [] if name in drawn_runs else [name]
            drawn_keys += [] if key in drawn_keys else [key]
    if not drawn_keys:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    styles = [
        Line2D([], [], color="0.3", ls=STYLES[keys.index(k) % len(STYLES)], label=KEY_LABELS.get(k, k))
        for k in drawn_keys
    ]
    outside = {"bbox_transform": ax.transAxes, "fontsize": 8}  # figure legends: a tight save keeps them whole
    fig.legend(handles=styles, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="metric", **outside)
    if not one_run:
        handles = [
            Line2D([], [], color=colours[list(runs).index(n) % len(colours)], lw=2.5, label=n) for n in drawn_runs
        ]
        fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(1.01, 0.0), title="run", **outside)
    return fig


def maxvio_figure(plt: Any, runs: dict[str, list[dict]], out: Path) -> bool:
    """MaxVio over steps. One run: each MoE layer's (train) and their mean, black dashed. Several runs: one
    overlaid panel, one colour per run, train (``moe/maxvio``, the layers' mean) solid, val
    (``val/maxvio_global``) dashed, on shared axes."""
    if len(runs) > 1:
        return _lines(plt, runs, ["moe/maxvio", "val/maxvio_global"], "MaxVio", out)
    ((name, records),) = runs.items()
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for layer in moe_layers(records):
        steps, values = series(records, f"moe/layer_{layer}/maxvio")
        ax.plot(steps, values, lw=1.2, label=f"layer {layer}")
    for key, style, label in (("moe/maxvio", "k-", "mean (train)"), ("val/maxvio_global", "k--", "val (global)")):
        steps, values = series(records, key)
        if len(steps):
            ax.plot(steps, values, style, lw=2.0, marker="o" if len(steps) < 30 else None, ms=3, label=label)
    ax.set_title(f"{name}: MaxVio per MoE layer", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories: each path itself, or a sweep directory's job folders."""
    from moetrain.launch.sweep import job_dirs

    out: list[Path] = []
    for p in paths:
        if (p / "metrics.jsonl").is_file():
            out.append(p)
            continue
        jobs = [j for j in job_dirs(p) if (j / "metrics.jsonl").is_file()] if p.is_dir() else []
        if not jobs:
            raise SystemExit(f"moetrain-plot: {p}: no metrics.jsonl here or in its subfolders")
        out += jobs
    return out


IGNORED_CONFIG_KEYS = ("run_dir", "logger.", "checkpoint.dir", "data.cache_dir", "trainer.resume")


def _config_differences(dirs: list[Path]) -> list[list[str]] | None:
    """Per run, the ``config.yaml`` keys (``key=value``) whose values are not the same in every run."""
    from omegaconf import OmegaConf

    from moetrain.train.checkpoint import flat_config

    if not all((d / "config.yaml").is_file() for d in dirs):
        return None
    flats = [flat_config(OmegaConf.to_container(OmegaConf.load(d / "config.yaml"))) for d in dirs]  # type: ignore[arg-type]
    keys = sorted({k for f in flats for k in f if not k.startswith(IGNORED_CONFIG_KEYS)})
    differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]
    return [[f"{k}={f.get(k)}" for k in differing] for f in flats]


def run_labels(dirs: list[Path]) -> list[str]:
    """A label per run: the overrides it does not share with the others, else its differing config keys,
    else its folder name; made unique with the folder name when two would read the same."""
    from moetrain.launch.sweep import distinct_overrides, job_meta

    if len(dirs) == 1:
        return [dirs[0].name]
    metas = [job_meta(d) for d in dirs]
    parts: list[list[str]] | None = None
    if all("overrides" in m for m in metas):
        parts = distinct_overrides([m["overrides"] for m in metas])
    if not parts or not any(parts):
        parts = _config_differences(dirs)
    labels = [" ".join(p) or "(defaults)" for p in parts] if parts and any(parts) else [d.name for d in dirs]
    if len(set(labels)) < len(labels):
        labels = [f"{label} [{d.parent.name}/{d.name}]" for label, d in zip(labels, dirs)]
    return labels


def expand_runs(paths: list[Path]) -> dict[str, Path]:
    """Run directories by label (see :func:`run_labels`); a sweep directory expands to its job folders."""
    dirs = run_dirs(paths)
    return dict(zip(run_labels(dirs), dirs))


def dropped_keys(runs: dict[str, list[dict]], metric: str) -> list[str]:
    """``moe/layer_i/<metric>`` keys that are above zero somewhere (a dropless layer draws no flat line)."""
    keys = {k for records in runs.values() for r in records for k in r if k.endswith(f"/{metric}")}
    return sorted(k for k in keys if any(float(r.get(k) or 0) > 0 for rs in runs.values() for r in rs))


def plot_runs(paths: list[Path], out: Path) -> list[Path]:
    """Write the figures for one or several runs; return the files written."""
    plt = _pyplot()
    dirs = expand_runs(paths)
    runs = {name: read_metrics(d, "moetrain-plot") for name, d in dirs.items()}
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if _lines(plt, runs, ["train/loss", "val/loss"], "loss (nats/token)", out / "loss.png"):
        written.append(out / "loss.png")

    if maxvio_figure(plt, runs, out / "maxvio.png"):
        written.append(out / "maxvio.png")

    for name, records in runs.items():
        if not moe_layers(records) or not any(k.endswith("/load") for r in records for k in r):
            continue
        fname = "load_heatmap.png" if len(runs) == 1 else f"load_heatmap_{dirs[name].parent.name}_{dirs[name].name}.png"
        fig = load_heatmap_figure(records, title=name)
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(out / fname)

    keys = dropped_keys(runs, "drop_frac")
    if keys and _lines(plt, runs, keys, "dropped fraction", out / "drop_frac.png"):
        written.append(out / "drop_frac.png")
    keys = sorted({k for r in runs.values() for rec in r for k in rec if k.endswith("/devices_per_token")})
    if keys and _lines(plt, runs, keys, "device groups per token", out / "devices_per_token.png"):
        written.append(out / "devices_per_token.png")
    return written


def _main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="PNG figures from moetrain run directories (metrics.jsonl).")
    p.add_argument("runs", nargs="+", type=Path, help="run directories, or a sweep directory")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/plots, or ./plots)")
    p.add_argument("--html", action="store_true", help="also write OUT/report.html: figures, final metrics, config")
    args = p.parse_args(argv)
    out = args.out or (args.runs[0] / "plots" if len(args.runs) == 1 else Path("plots"))
    figures = plot_runs(args.runs, out)
    for path in figures:
        print(path)
    if args.html:
        from moetrain.tools.report import write_report

        print(write_report(expand_runs(args.runs), figures, out))


def main(argv: list[str] | None = None) -> None:
    """``moetrain-plot``: a user's mistake (bad path, unreadable checkpoint, full disk) is one line and exit 2."""
    guarded_main("moetrain-plot", lambda: _main(argv))


if __name__ == "__main__":
    main()
