"""Reading a run directory's records (``metrics.jsonl``), for the plots, the HTML report and summaries.

The file is the trainer's (:class:`moetrain.train.sinks.JsonlSink`): one JSON object per line, an int
``step`` and metric values that are numbers, ``"nan"`` / ``"inf"`` / ``"-inf"`` (JSON has no
non-finite numbers) or lists of those (per-expert loads). A line that is not that (cut by a crash,
binary garbage, a list, a string where a number belongs) is skipped and counted, and the readers
say so once per file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

NON_FINITE = ("nan", "inf", "-inf")


def _is_value(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int | float) or (isinstance(value, str) and value in NON_FINITE)


def is_record(record: Any) -> bool:
    """Whether a parsed line has the shape the trainer writes (see the module docstring)."""
    if not isinstance(record, dict) or isinstance(record.get("step"), bool):
        return False
    if not isinstance(record.get("step"), int) or record["step"] < 0:
        return False
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, list):
            if not all(_is_value(v) for v in value):
                return False
        elif not _is_value(value):
            return False
    return True


def parse_metrics(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """``(records, bad)``: the well-formed records of a ``metrics.jsonl`` and how many non-empty lines were
    not (read as bytes, so binary garbage is a bad line, not a ``UnicodeDecodeError``)."""
    records: list[dict[str, Any]] = []
    bad = 0
    for raw in Path(path).read_bytes().splitlines():
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            bad += 1
            continue
        if is_record(record):
            records.append(record)
        else:
            bad += 1
    return records, bad


def warn_bad_lines(tool: str, path: str | Path, bad: int) -> None:
    """One warning line for a file's skipped lines (nothing when there were none)."""
    if bad:
        lines = "line" if bad == 1 else "lines"
        print(
            f"{tool}: warning: {path}: skipped {bad} bad {lines} (not a JSON object with an int step and numeric values)",
            file=sys.stderr,
        )


def read_metrics(run_dir: str | Path, tool: str = "moetrain") -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl``; bad lines are skipped with one warning (:func:`parse_metrics`)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {run_dir} a moetrain run directory?)")
    records, bad = parse_metrics(path)
    warn_bad_lines(tool, path, bad)
    return records


def median_tokens_per_sec(records: list[dict[str, Any]]) -> float | None:
    """The run's training speed, one statistic everywhere (sweep summary, HTML report, closing summary): the
    median of the logged windows' ``perf/tokens_per_sec`` (the first window's start-up and a window slowed by a
    checkpoint save move it little), ``None`` when none was logged."""
    import statistics

    values = [r["perf/tokens_per_sec"] for r in records if isinstance(r.get("perf/tokens_per_sec"), int | float)]
    return float(statistics.median(values)) if values else None
