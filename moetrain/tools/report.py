"""``moetrain-plot RUN_DIR --html``: a one-page, self-contained HTML run report.

The page holds the figures ``moetrain-plot`` drew (loss, MaxVio, the load
heatmaps, dropped fraction, ...; embedded as PNG data, so the file can be sent
on its own), each run's final metrics (``summary.json``, else the last values
of ``metrics.jsonl``) and each run's config (``config.yaml``).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from moetrain.tools.run_records import median_tokens_per_sec, read_metrics

FINAL_KEYS = ("val/loss", "val/bpb", "val/maxvio_global", "train/loss", "moe/maxvio", "perf/tokens_per_sec")


def final_metrics(run_dir: Path) -> dict[str, Any]:
    """The run's last value of each key (``summary.json`` when it finished, else ``metrics.jsonl``); tokens/s is
    the median of the logged windows (:func:`median_tokens_per_sec`, as in the sweep summary)."""
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    last: dict[str, Any] = {}
    for record in records:
        last.update(record)
    if (run_dir / "summary.json").is_file():
        last = dict(json.loads((run_dir / "summary.json").read_text()).get("metrics", {}))
    tps = median_tokens_per_sec(records)
    if tps is not None:
        last["perf/tokens_per_sec"] = tps
    return last


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.stem.replace("_", " "))
    return f'<figure><img src="data:image/png;base64,{data}" alt="{name}"><figcaption>{name}</figcaption></figure>'


def _metrics_table(runs: dict[str, Path]) -> str:
    finals = {label: final_metrics(d) for label, d in runs.items()}
    keys = [k for k in FINAL_KEYS if any(k in f for f in finals.values())]
    names = {"perf/tokens_per_sec": "tokens/s (median)"}
    head = "".join(f"<th>{html.escape(names.get(k, k))}</th>" for k in ["run", *keys])
    rows = []
    for label, f in finals.items():
        cells = [html.escape(label)] + [_fmt(f.get(k)) for k in keys]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"
    return "—" if value is None else html.escape(str(value))


def _configs(runs: dict[str, Path]) -> str:
    parts = []
    for label, d in runs.items():
        text = (d / "config.yaml").read_text() if (d / "config.yaml").is_file() else "(no config.yaml)"
        parts.append(f"<details><summary>{html.escape(label)}</summary><pre>{html.escape(text)}</pre></details>")
    return "".join(parts)


def write_report(runs: dict[str, Path], figures: list[Path], out: Path) -> Path:
    """Write ``out/report.html`` for ``runs`` (label -> run dir) with ``figures`` (PNG files); return its path."""
    title = "moetrain report: " + (next(iter(runs)) if len(runs) == 1 else f"{len(runs)} runs")
    body = [
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Final metrics</h2>",
        _metrics_table(runs),
        "<h2>Curves and load</h2>",
        *(_figure(p) for p in figures if p.suffix == ".png"),
        "<h2>Config</h2>",
        _configs(runs),
    ]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 1100px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td:first-child {{ text-align: left; }} img {{ max-width: 100%; }} figure {{ margin: 1em 0; }}
pre {{ background: #f6f6f6; padding: 0.8em; font-size: 12px; }}
</style></head><body>
{"".join(body)}
</body></html>
"""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
