"""Native engine step time of this checkout's gradient path against another git ref's, measured in one run.

This checkout reduces the gradients with FSDP2's ``replicate`` units (``moetrain.parallel.data_parallel``); the
default ref, 1c72d52, with its hand-written buckets (``parallel/grad_buckets.py``, an all-reduce per bucket
launched from gradient hooks in the last backward). The ref is exported with ``git archive`` into a temporary
directory; each round then runs the same training under ``torchrun`` once per tree (which goes first alternates
from round to round, so that machine noise hits both alike), each run printing its ms per step after warmup and
its last loss. Prints every round, the medians and the ratio this / ref; the losses agree up to float summation
order (bitwise on 2 ranks: docs/parallelism.md, "Gradient scaling").

    python scripts/bench_grad_sync.py                                   # 2 ranks, EP=1
    python scripts/bench_grad_sync.py --nproc 2 -- parallel.ep=2
    python scripts/bench_grad_sync.py --nproc 4 --ref 1c72d52 -- parallel.ep=2   # EP=2 x DP=2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
RESULT = "bench_grad_sync result: "
"""The prefix of the line a worker's rank 0 prints its result on (JSON)."""


def worker(steps: int, warmup: int, overrides: list[str]) -> None:
    """Under torchrun, with ``PYTHONPATH`` naming the tree to measure: train ``warmup`` steps, time ``steps``."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moetrain.config import validate
    from moetrain.parallel import init_parallel
    from moetrain.train.cli import config_dir, make_trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    base = ["logger=none", "trainer.progress=false", "trainer.num_threads=1", "checkpoint.enabled=false"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=[*base, *overrides]))
    # the same micro-batch in both trees (the ref's default was 4; today's null means each rank's whole share)
    cfg.trainer.micro_batch_size = min(cfg.trainer.micro_batch_size or 4, cfg.trainer.global_batch_size // world)
    validate(cfg, world)
    pc = init_parallel(cfg.parallel, cfg.trainer.device, num_experts=cfg.moe.num_experts)
    with tempfile.TemporaryDirectory() as tmp:
        tr = make_trainer(cfg, Path(tmp) / "run", pc)
        for _ in range(warmup):
            tr.train_step(tr.loader.next_batch())
        pc.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            res = tr.train_step(tr.loader.next_batch())
        loss = res.loss.item()
        if pc.device.type == "cuda":
            torch.cuda.synchronize(pc.device)
        pc.barrier()
        ms = (time.perf_counter() - t0) / steps * 1e3
        if pc.is_main:
            print(RESULT + json.dumps({"ms_per_step": ms, "loss": loss, "torch": torch.__version__}), flush=True)
        tr.close()
    pc.close()


def export_ref(ref: str, dest: Path) -> Path:
    """``ref``'s tree (``git archive``) under ``dest``."""
    tree = dest / "ref"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def run_tree(root: Path, nproc: int, args: argparse.Namespace) -> dict[str, float]:
    """One torchrun of :func:`worker` importing ``moetrain`` from ``root``; its rank 0's result."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(HERE),
           "--worker", "--steps", str(args.steps), "--warmup", str(args.warmup), "--", *args.overrides]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
    for line in out.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])  # type: ignore[no-any-return]
    raise SystemExit(f"the run in {root} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default="1c72d52", help="the git ref to compare against (default: %(default)s)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (2+: one process reduces nothing)")
    p.add_argument("--rounds", type=int, default=3, help="runs per tree, alternating")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the base config")
    args = p.parse_args()
    if args.worker:
        worker(args.steps, args.warmup, args.overrides)
        return
    if args.nproc < 2:
        raise SystemExit("--nproc must be 2 or more: one process has no gradient reduction")
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this": REPO, args.ref: export_ref(args.ref, Path(tmp))}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                results[name].append(run_tree(trees[name], args.nproc, args))
            print(f"round {r + 1}: " + ", ".join(f"{n} {results[n][-1]['ms_per_step']:.1f} ms/step" for n in trees))
    print(f"\n{args.nproc} ranks, {args.steps} timed steps per run, overrides {args.overrides or 'none'}")
    print("| tree | median ms / step | last loss |")
    print("| --- | ---: | ---: |")
    medians = {}
    for name, runs in results.items():
        medians[name] = statistics.median(x["ms_per_step"] for x in runs)
        print(f"| {name} | {medians[name]:.1f} | {runs[-1]['loss']:.6f} |")
    print(f"\nthis / {args.ref} step time: {medians['this'] / medians[args.ref]:.3f}")


if __name__ == "__main__":
    main()
