"""Sweep summary: one row per job (overrides, status, final val loss, val MaxVio_global, tokens/s).

Written by the torchrun launcher when a sweep ends, and printable later with
``moetrain-sweep-summary SWEEP_DIR`` for any Hydra sweep: the torchrun
launcher's (``job.json`` per job), Hydra's basic launcher and the SLURM
(submitit) launcher (``.hydra/overrides.yaml`` and ``.hydra/hydra.yaml`` per
job). A job's numbers come from its run directory: ``summary.json`` (written by
a run that finished) or, for a run that stopped early, the last records of its
``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from moetrain.errors import guarded_main

COLUMNS = ("job", "status", "overrides", "val/loss", "val/maxvio_global", "perf/tokens_per_sec")


def _metrics(job_dir: Path) -> tuple[dict[str, Any], list[float]]:
    last: dict[str, Any] = {}
    tps: list[float] = []
    path = job_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            last.update(record)
            if "perf/tokens_per_sec" in record:
                tps.append(record["perf/tokens_per_sec"])
    return last, tps


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


def read_job(job_dir: str | Path) -> dict[str, Any]:
    """The summary row of one job directory."""
    job_dir = Path(job_dir)
    meta = job_meta(job_dir)
    last, tps = _metrics(job_dir)
    done = json.loads((job_dir / "summary.json").read_text()) if (job_dir / "summary.json").exists() else None
    if (job_dir / "failed.json").exists():
        status = f"failed (exit {json.loads((job_dir / 'failed.json').read_text())['exit_code']})"
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
        "perf/tokens_per_sec": sum(tps) / len(tps) if tps else None,
    }


def job_dirs(sweep_dir: str | Path) -> list[Path]:
    """The job folders of a sweep: those holding ``job.json`` (torchrun launcher), ``.hydra/overrides.yaml``
    (Hydra's basic and SLURM launchers) or ``metrics.jsonl``."""
    marks = ("job.json", ".hydra/overrides.yaml", "metrics.jsonl")
    return sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and any((p / m).is_file() for m in marks))


def sweep_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of every job directory under ``sweep_dir``, by job number."""
    rows = [read_job(p) for p in job_dirs(sweep_dir)]
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
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def write_summary(sweep_dir: str | Path) -> str:
    """Write ``summary.md`` and ``summary.json`` in the sweep directory (atomically); return the table."""
    sweep_dir = Path(sweep_dir)
    rows = sweep_rows(sweep_dir)
    table = format_table(rows)
    for name, text in (("summary.md", table + "\n"), ("summary.json", json.dumps(rows, indent=1))):
        tmp = sweep_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, sweep_dir / name)
    return table


def _main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Print the summary table of a moetrain sweep directory.")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    if not args.sweep_dir.is_dir():
        raise SystemExit(f"moetrain-sweep-summary: {args.sweep_dir}: not a directory")
    rows = sweep_rows(args.sweep_dir)
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
