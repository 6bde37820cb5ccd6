"""Plant plausible MoE-trainer bugs one at a time and report which the test suite catches.

Each mutation is a textual edit of one or more source files, the kind of bug
other MoE trainers shipped (a detached P_i in a balance loss, a wrong EP
gradient scale, experts swapped in a reshard, a capacity off by one, ...) or
one planted in the plumbing (FSDP's reduce dtype, a shard index's offset, a
log file truncated on resume, ...). For each, the repository (sources, tests,
configs; no .git, no virtualenv) is copied to a temporary directory, the edit
applied there (the working tree is never touched), and only the tests that
guard that code run against the copy. A mutation is *caught* when pytest
reports failures (exit status 1).

Every mutation's anchor (the text it replaces, which must occur exactly once,
edits applied in order) and its test files are checked before anything runs:
a source change that moves an anchor fails the script at its start, listing
every stale mutation, instead of rotting silently. ``tests/scripts/test_mutation_check.py``
runs that check in CI (``--anchors-only``) and one sampled fast mutation.

    python scripts/mutation_check.py                  # every mutation, then a summary table
    python scripts/mutation_check.py --list           # names, packages and the tests each runs
    python scripts/mutation_check.py --anchors-only   # check every anchor, run nothing (seconds)
    python scripts/mutation_check.py --only capacity_off_by_one guard_misses_inf --baseline
    python scripts/mutation_check.py --sample --seed 3   # one fast mutation, chosen by the seed

``--baseline`` first runs the selected tests on an unmutated copy (they must
pass, or a "caught" means nothing). Exit status 0 when every mutation run is
caught, 1 when one is missed (or its run errs), 2 when anchors are stale.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutations import MUTATIONS, Mutation

REPO = Path(__file__).resolve().parent.parent
COPIED = ("moetrain", "tests", "configs", "hydra_plugins", "scripts", "pyproject.toml")


@dataclass(frozen=True)
class Outcome:
    verdict: str
    seconds: float
    last_line: str


def mutated_texts(root: Path, m: Mutation) -> tuple[dict[str, str], list[str]]:
    """The files of ``root`` as mutation ``m`` leaves them (edits applied in order), and its anchor problems."""
    texts: dict[str, str] = {}
    problems: list[str] = []
    for rel, old, new in m.edits:
        path = root / rel
        if rel not in texts:
            if not path.is_file():
                problems.append(f"{m.name}: {rel} does not exist")
                continue
            texts[rel] = path.read_text()
        n = texts[rel].count(old)
        if n != 1:
            first = old.strip().splitlines()[0][:70] if old.strip() else repr(old)
            problems.append(f"{m.name}: {rel} holds {n} copies (1 needed) of the anchor {first!r}")
            continue
        texts[rel] = texts[rel].replace(old, new)
    for test in m.tests:
        if not (root / test.split("::")[0]).is_file():
            problems.append(f"{m.name}: test file {test.split('::')[0]} does not exist")
    return texts, problems


def anchor_problems(mutations: list[Mutation], root: Path = REPO) -> list[str]:
    """Every stale anchor or missing test file of ``mutations`` (empty: all apply), and duplicate names."""
    out: list[str] = []
    seen: set[str] = set()
    for m in mutations:
        if m.name in seen:
            out.append(f"{m.name}: two mutations have this name")
        seen.add(m.name)
        out += mutated_texts(root, m)[1]
    return out


def make_copy(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dest / name)


def apply(root: Path, m: Mutation) -> None:
    """Write mutation ``m`` into the copy at ``root`` (anchors were checked at start; a failure here is a bug)."""
    texts, problems = mutated_texts(root, m)
    if problems:
        raise RuntimeError("; ".join(problems))
    for rel, text in texts.items():
        (root / rel).write_text(text)


def run_tests(root: Path, tests: tuple[str, ...], verbose: bool) -> tuple[int, float, str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(root)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if verbose:
        print(out[-4000:])
    lines = [x for x in out.strip().splitlines() if x.strip()]
    return proc.returncode, time.perf_counter() - start, lines[-1] if lines else ""


def check(m: Mutation, baseline: bool, verbose: bool) -> Outcome:
    """Run ``m``'s tests on a mutated copy; never raises (a failure to run is an ``error`` verdict)."""
    try:
        with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
            root = Path(tmp)
            make_copy(root)
            if baseline:
                rc, _, last = run_tests(root, m.tests, verbose)
                if rc != 0:
                    return Outcome("BASELINE FAILS", 0.0, last)
            apply(root, m)
            rc, secs, last = run_tests(root, m.tests, verbose)
    except Exception as e:  # one broken mutation must not stop the run before its summary
        return Outcome("error", 0.0, f"{type(e).__name__}: {e}")
    return Outcome({0: "MISSED", 1: "caught"}.get(rc, f"error (pytest exit {rc})"), secs, last)


def choose(args: argparse.Namespace) -> list[Mutation]:
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTATIONS}
        if unknown:
            raise SystemExit(f"unknown mutation(s): {', '.join(sorted(unknown))}")
        return [m for m in MUTATIONS if m.name in args.only]
    if args.sample:
        fast = [m for m in MUTATIONS if m.fast]
        return [random.Random(args.seed).choice(fast)]
    return list(MUTATIONS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="mutation names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests")
    parser.add_argument("--anchors-only", action="store_true", help="check every anchor and test file, run nothing")
    parser.add_argument("--sample", action="store_true", help="run one fast mutation chosen by --seed")
    parser.add_argument("--seed", type=int, default=int(time.time()) // 86400, help="for --sample (default: the day)")
    parser.add_argument("--baseline", action="store_true", help="first run the tests on an unmutated copy")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each pytest run's tail")
    args = parser.parse_args(argv)
    problems = anchor_problems(list(MUTATIONS))
    if problems:  # before anything runs: a stale mutation would otherwise be reported as missed or crash mid-run
        print(
            f"mutation_check: {len(problems)} stale mutation anchor(s); update scripts/mutations.py:", file=sys.stderr
        )
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    chosen = choose(args)
    if args.anchors_only:
        print(f"all {len(MUTATIONS)} mutations apply ({len({m.package for m in MUTATIONS})} packages)")
        return 0
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.package:9} {' '.join(m.tests)}\n{'':44}{m.bug}")
        return 0
    rows: list[tuple[Mutation, str]] = []
    start = time.perf_counter()
    for m in chosen:
        o = check(m, args.baseline, args.verbose)
        rows.append((m, o.verdict))
        print(f"{o.verdict:8} {m.name:34} {o.seconds:6.1f}s  {' '.join(m.tests)}  [{o.last_line}]", flush=True)
    caught = sum(v == "caught" for _, v in rows)
    print(f"\n{caught}/{len(rows)} mutations caught in {time.perf_counter() - start:.0f} s")
    for m, v in rows:
        if v != "caught":
            print(f"  {v}: {m.name} ({m.bug})")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
