"""Sweep summary: one row per job (overrides, status, final val loss, val MaxVio_global, tokens/s).

Written by the torchrun launcher when a sweep ends, and printable later with
``moetrain-sweep-summary SWEEP_DIR`` for any Hydra sweep: the torchrun
launcher's (``job.json`` per job), Hydra's basic launcher and the SLURM
(submitit) launcher (``.hydra/overrides.yaml`` and ``.hydra/hydra.yaml`` per
job). A job's numbers come from its run directory: ``summary.json`` (written by
a run that finished) or, for a run that stopped early, the last records of its
``metrics.jsonl``. A job that failed is a row (``failed (exit N)``): the other jobs
still run, and :class:`SweepSummary` (a Hydra callback ``moetrain-train -m`` adds)
writes the summary when the sweep ends and exits 1 when a job failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from moetrain.errors import guarded_main
from moetrain.tools.run_records import median_tokens_per_sec, parse_metrics, warn_bad_lines

COLUMNS = ("job", "status", "overrides", "val/loss", "val/maxvio_global", "perf/tokens_per_sec")
HEADERS = {"perf/tokens_per_sec": "tokens/s (median)"}


def _metrics(job_dir: Path, tool: str) -> tuple[dict[str, Any], float | None]:
    """The job's last value of each key and its tokens/s (:func:`median_tokens_per_sec`; bad lines skipped with
    one warning)."""
    last: dict[str, Any] = {}
    path = job_dir / "metrics.jsonl"
    records: list[dict[str, Any]] = []
    if path.exists():
        records, bad = parse_metrics(path)
        warn_bad_lines(tool, path, bad)
        for record in records:
            last.update(record)
    return last, median_tokens_per_sec(records)


def _hydra_job(job_dir: Path) -> dict[str, Any]:
    """``{"num": n, "overrides": [...]}`` from the ``.hydra/`` folder Hydra writes in every job's output dir."""
    from omegaconf import OmegaConf

    hydra = job_dir / ".hydra"
    meta: dict[str, Any] = {}
    if (hydra / "overrides.yaml").is_file():
        meta["overrides"] = [str(o) for o in OmegaConf.to_container(OmegaConf.load(hydra / "overrides.yaml"))]  # type: ignore[union-attr]
    if (hydra / "hydra.yaml").is_file():
        num = OmegaConf.select(OmegaConf.load(hydra / "hydra.yaml"), "hydra.job.num", default=None)
        if isinstance(num, int):
            meta["num"] = num
    return meta


def job_meta(job_dir: str | Path) -> dict[str, Any]:
    """A job's number and overrides: the torchrun launcher's ``job.json``, else Hydra's ``.hydra/`` files."""
    job_dir = Path(job_dir)
    if (job_dir / "job.json").is_file():
        return json.loads((job_dir / "job.json").read_text())
    return _hydra_job(job_dir)


def read_job(job_dir: str | Path, tool: str = "moetrain") -> dict[str, Any]:
    """The summary row of one job directory (``tool`` names the program in a warning about bad metric lines)."""
    job_dir = Path(job_dir)
    meta = job_meta(job_dir)
    last, tps = _metrics(job_dir, tool)
    done = json.loads((job_dir / "summary.json").read_text()) if (job_dir / "summary.json").exists() else None
    cause = None
    if (job_dir / "failed.json").exists():
        failed = json.loads((job_dir / "failed.json").read_text())
        status, cause = f"failed (exit {failed['exit_code']})", failed.get("cause")
    elif done is not None and done.get("status") == "completed":
        status = "completed"
    else:
        status = "incomplete"
    source = done.get("metrics", {}) if done else last
    return {
        "job": meta.get("num", job_dir.name),
        "status": status,
        "overrides": meta.get("overrides", []),
        "dir": str(job_dir),
        "val/loss": source.get("val/loss"),
        "val/maxvio_global": source.get("val/maxvio_global"),
        "perf/tokens_per_sec": tps,
        "cause": cause,
    }


def job_dirs(sweep_dir: str | Path) -> list[Path]:
    """The job folders of a sweep: those holding ``job.json`` (torchrun launcher), ``.hydra/overrides.yaml``
    (Hydra's basic and SLURM launchers) or ``metrics.jsonl``."""
    marks = ("job.json", ".hydra/overrides.yaml", "metrics.jsonl")
    return sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and any((p / m).is_file() for m in marks))


def sweep_rows(sweep_dir: str | Path, tool: str = "moetrain") -> list[dict[str, Any]]:
    """Rows of every job directory under ``sweep_dir``, by job number."""
    rows = [read_job(p, tool) for p in job_dirs(sweep_dir)]
    return sorted(rows, key=lambda r: (str(type(r["job"])), r["job"]))


def distinct_overrides(overrides: list[list[str]]) -> list[list[str]]:
    """Each job's overrides without those every job shares (what tells the jobs apart)."""
    common = set.intersection(*(set(o) for o in overrides)) if overrides else set()
    return [[o for o in ovs if o not in common] for ovs in overrides]


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"
    if isinstance(value, list):
        return " ".join(value) or "(defaults)"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table: overrides without those every job shares (said once above it), a failed job's
    status with its cause, tokens/s the median of the logged windows."""
    shown = distinct_overrides([list(r["overrides"]) for r in rows])
    common = sorted(set.intersection(*(set(r["overrides"]) for r in rows))) if len(rows) > 1 else []
    head = [f"all jobs: {' '.join(common)}", ""] if common else []
    lines = [*head, "| " + " | ".join(HEADERS.get(c, c) for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r, own in zip(rows, shown):
        cells = {**r, "overrides": own if len(rows) > 1 else r["overrides"]}
        if r.get("cause"):
            cells["status"] = f"{r['status']}: {str(r['cause']).replace('|', '/')}"
        if isinstance(cells["perf/tokens_per_sec"], float):  # a rate: whole tokens
            cells["perf/tokens_per_sec"] = f"{cells['perf/tokens_per_sec']:,.0f}"
        lines.append("| " + " | ".join(_fmt(cells[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def write_summary(sweep_dir: str | Path) -> str:
    """Write ``summary.md`` and ``summary.json`` in the sweep directory (atomically); return the table."""
    return write_rows(Path(sweep_dir), sweep_rows(sweep_dir))


def write_rows(sweep_dir: Path, rows: list[dict[str, Any]]) -> str:
    """Write ``summary.md`` and ``summary.json`` of these rows (atomically); return the table."""
    table = format_table(rows)
    for name, text in (("summary.md", table + "\n"), ("summary.json", json.dumps(rows, indent=1))):
        tmp = sweep_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, sweep_dir / name)
    return table


def failed_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of jobs that failed."""
    return [r for r in rows if str(r["status"]).startswith("failed")]


class SweepSummary(Callback):
    """Hydra callback: when a sweep ends (any launcher), write its summary; exit 1 when a job failed, with one
    line naming the failed jobs (each job already said why in its own line or ``launcher.log``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows = sweep_rows(sweep_dir)
        write_rows(sweep_dir, rows)
        failed = failed_rows(rows)
        print(f"moetrain: sweep summary: {sweep_dir / 'summary.md'}", file=sys.stderr)
        if failed:
            for r in failed:
                cause = f": {r['cause']}" if r.get("cause") else ""
                print(f"moetrain: sweep job #{r['job']} {r['status']}{cause} ({r['dir']})", file=sys.stderr)
            jobs = ", ".join(f"#{r['job']} ({str(r['status']).removeprefix('failed ').strip('()')})" for r in failed)
            print(f"moetrain: {len(failed)} of {len(rows)} sweep jobs failed: {jobs}", file=sys.stderr)
            sys.exit(1)


def _main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Print the summary table of a moetrain sweep directory.")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    if not args.sweep_dir.is_dir():
        raise SystemExit(f"moetrain-sweep-summary: {args.sweep_dir}: not a directory")
    rows = sweep_rows(args.sweep_dir, "moetrain-sweep-summary")
    if not rows:
        raise SystemExit(
            f"moetrain-sweep-summary: {args.sweep_dir}: no sweep jobs (no */job.json, */.hydra/overrides.yaml "
            "or */metrics.jsonl)"
        )
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))


def main(argv: list[str] | None = None) -> None:
    """``moetrain-sweep-summary``: a user's mistake (bad path, unreadable checkpoint, full disk) is one line and exit 2."""
    guarded_main("moetrain-sweep-summary", lambda: _main(argv))


if __name__ == "__main__":
    main()
