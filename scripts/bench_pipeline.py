"""Training tokens/s with pipeline parallelism (``parallel.pp=2``) against without (``parallel.pp=1``, the same
ranks as data-parallel replicas), the same model, global batch and micro-batch size, in one invocation.

Each measurement is a ``moetrain-train`` run under ``torchrun`` (gloo on CPU, NCCL on GPU); its speed is the
median of the logged windows' ``perf/tokens_per_sec`` (the trainer's own statistic, ``moetrain-report``'s and
the closing summary's) after the first window (start-up). The runs alternate PP=1, PP=2, PP=1, ... for
``--repeats`` rounds so machine noise hits both alike; the median over rounds is printed for each, with the
ratio PP=2 / PP=1 and the pipeline's micro-batches and bubble. At PP=1 each of the ``--nproc`` ranks
accumulates ``global / (micro x nproc)`` micro-batches; at PP=2 each of the ``nproc / 2`` pipelines runs
``global / (micro x nproc / 2)`` through its two stages.

    python scripts/bench_pipeline.py                              # 2 CPU ranks, the default tiny model
    python scripts/bench_pipeline.py --steps 3 --repeats 1        # a check that it runs (no timing value)
    python scripts/bench_pipeline.py --nproc 2 --device cuda -- trainer.precision=bf16 model=small
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = [
    "logger=none",
    "trainer.progress=false",
    "checkpoint.enabled=false",
    "trainer.resume=none",
    "trainer.eval_every=0",
    "trainer.eval_at_start=false",
    "trainer.log_every=1",
]


def run_command(pp: int, args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The ``torchrun ... -m moetrain.train`` command of one measurement."""
    overrides = [
        *BASE,
        f"trainer.max_steps={args.steps}",
        f"trainer.global_batch_size={args.global_batch}",
        f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.device={args.device}",
        f"parallel.pp={pp}",
        f"run_dir={run_dir}",
        *args.overrides,
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
    return [*torchrun, "-m", "moetrain.train", *overrides]


def tokens_per_sec(run_dir: Path) -> float:
    """The median logged ``perf/tokens_per_sec`` after the first window (or the only one)."""
    from moetrain.tools.run_records import parse_metrics

    records, _ = parse_metrics(run_dir / "metrics.jsonl")
    values = [r["perf/tokens_per_sec"] for r in records if isinstance(r.get("perf/tokens_per_sec"), int | float)]
    if not values:
        raise SystemExit(f"bench_pipeline: {run_dir / 'metrics.jsonl'} has no perf/tokens_per_sec")
    return float(statistics.median(values[1:] or values))


def measure(pp: int, args: argparse.Namespace, run_dir: Path) -> float:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(run_command(pp, args, run_dir), cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr + proc.stdout).splitlines()
        tail = [ln for ln in lines if ln.startswith("moetrain")][-3:] or lines[-5:]  # its one-line error, if any
        raise SystemExit(f"bench_pipeline: the PP={pp} run failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return tokens_per_sec(run_dir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="ranks (both measurements); an even number")
    p.add_argument("--steps", type=int, default=20, help="steps per run (the first logged window is start-up)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds of PP=1 and PP=2")
    p.add_argument("--global-batch", type=int, default=16, help="sequences per step")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--device", default="cpu", help="trainer.device (cpu: gloo; cuda: one GPU per rank)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the training config (after --)")
    args = p.parse_args()
    if args.nproc < 2 or args.nproc % 2 or args.steps < 1 or args.repeats < 1:
        raise SystemExit("bench_pipeline: --nproc must be even and >= 2; --steps and --repeats >= 1")
    speeds: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="bench_pipeline-") as tmp:
        for i in range(args.repeats):
            for pp in (1, 2):
                speeds[pp].append(measure(pp, args, Path(tmp) / f"pp{pp}_{i}"))
    report(args, {pp: statistics.median(v) for pp, v in speeds.items()})


def report(args: argparse.Namespace, tps: dict[int, float]) -> None:
    from moetrain.config.docs import composed_defaults
    from moetrain.config.pipeline_layout import stages_per_rank
    from moetrain.parallel.pipeline import bubble_fraction

    par = composed_defaults(["parallel.pp=2", *args.overrides]).parallel  # the schedule the PP=2 runs used
    v = stages_per_rank(par.pp_schedule, par.pp_virtual)
    m = args.global_batch // (args.micro_batch * (args.nproc // 2))
    print(
        f"{args.nproc} ranks ({args.device}), {args.steps} steps x {args.repeats} rounds, global batch "
        f"{args.global_batch}, micro-batch {args.micro_batch}, overrides {' '.join(args.overrides) or '(none)'}"
    )
    print(f"PP=1: {tps[1]:,.0f} tokens/s ({args.nproc} data-parallel ranks)")
    print(
        f"PP=2: {tps[2]:,.0f} tokens/s ({par.pp_schedule}, {m} micro-batches per pipeline, bubble "
        f"{bubble_fraction(par.pp_schedule, 2, m, v):.1%})"
    )
    print(f"PP=2 / PP=1: {tps[2] / tps[1]:.2f}")


if __name__ == "__main__":
    main()
