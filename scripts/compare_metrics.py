"""Compare the ``metrics.jsonl`` of two sets of runs (``scripts/metrics_baseline.sh``) value by value.

    python scripts/compare_metrics.py BEFORE_DIR AFTER_DIR

Every record of every run, every key but ``perf/*`` (wall-clock): exactly equal, or the first differing
step and keys are printed. Exit status: the number of runs that differ (0 = bitwise equal).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def records(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")} for line in lines if line]


def main(before: Path, after: Path) -> int:
    bad = 0
    for run in sorted(p for p in before.iterdir() if (p / "metrics.jsonl").is_file()):
        other = after / run.name / "metrics.jsonl"
        if not other.is_file():
            print(f"MISSING {run.name}")
            bad += 1
            continue
        a, b = records(run / "metrics.jsonl"), records(other)
        if a == b:
            print(f"EQUAL   {run.name}: {len(a)} records, {sum(len(r) for r in a)} values")
            continue
        bad += 1
        print(f"DIFF    {run.name}: {len(a)} vs {len(b)} records")
        for x, y in zip(a, b):
            if x != y:
                keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
                print(f"        step {x.get('step')}: " + "; ".join(f"{k}: {x.get(k)} -> {y.get(k)}" for k in keys[:5]))
                break
    return bad


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
