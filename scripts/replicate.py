"""Replicate the balancing papers' effects with error bars: several seeds per strategy, mean +- std.

Two studies, each a set of strategies trained on the same data, model and budget
(one ``moetrain-train`` subprocess per (strategy, seed); ``trainer.seed`` changes the
initialisation; the data order is ``data.seed``'s, the same in every run). Every run: the tiny model on the default corpus,
8 sequences of 128 byte tokens per step (``SETUP``); 200 steps for ``balancing`` and
100 for ``device_limited`` by default (``STEPS``); see docs/replication.md for the
measured numbers.

* ``balancing`` — the Loss-Free Balancing paper's comparison (Wang et al. 2024,
  arXiv 2408.15664): the expert-level auxiliary loss (``aux_loss``, a1 = 0.01; the
  Switch loss for K = 1), the loss-free bias (``loss_free``, u = 1e-3, sign rule of
  Algorithm 1), global-batch balance (Qiu et al. 2025; ``global_batch``: the same aux
  loss with f_i over the whole step, here 4 micro-batches) and no balancing at all
  (``none``). Every run of this study accumulates 4 micro-batches of 256 tokens per
  step, so only ``global_batch`` differs in scope. The paper's direction: lower
  ``val/maxvio_global`` loss-free than with an aux loss, at equal or better perplexity.
* ``device_limited`` — DeepSeek-V2's device-limited routing (arXiv 2405.04434,
  sec. 2.2.2): 32 fine-grained experts top-4 in 8 groups of 4 (the expert-level loss
  a1 = 0.01 on), unrestricted against M = 1, 2, 3 groups. The paper: M >= 3 performs
  about as well as unrestricted top-K.

Writes ``OUT/<study>/results.md`` and ``results.json`` (per strategy: mean +- std
over seeds of the final ``val/loss``, ``val/maxvio_global``, the mean
``moe/maxvio`` over training and over its last 20%) and ``maxvio.png`` (the
seeds' mean ``moe/maxvio`` per step with a +-1 std band). ``--jobs`` runs that many
trainings at once (one thread each). ``scripts/compare_balancing.py`` is the quick
one-seed version. Finished runs are kept and skipped, so an interrupted study resumes.

    python scripts/replicate.py --study balancing --seeds 0 1 2 --out runs/replicate
    python scripts/replicate.py --study device_limited --seeds 0 1 2 --out runs/replicate
    python scripts/replicate.py --study balancing --summarise-only      # re-read finished runs
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_balancing import plot_maxvio, summarise, train_command

SETUP = ["model=tiny", "data=stdlib", "data.seq_len=128", "trainer.global_batch_size=8", "trainer.eval_at_start=false"]
"""Every run of both studies: the tiny model (6.9M parameters, 3.3M active) on the default corpus (the
Python standard library's source, byte tokens), 8 sequences of 128 tokens per step (1,024 tokens). Sized for
a shared 2-core CPU: about 2-4 minutes per 200-step run at nice 19 and one thread, depending on the other
load; fewer tokens per step buys more steps, which the loss-free bias needs (u = 1e-3 moves it at most 0.2 in
200 steps, against softmax scores of about 1/8)."""
ACCUMULATE = ["trainer.micro_batch_size=2"]  # 4 micro-batches of 256 tokens per step
WHOLE = ["trainer.micro_batch_size=8"]  # the step in one micro-batch
FINE_32 = ["moe=default", "moe.num_experts=32", "moe.top_k=4", "moe.expert_hidden_size=128", "moe.router.num_groups=8"]
"""32 fine-grained experts top-4 in 8 groups of 4, so that even M = 1 group holds a token's 4 experts (16
experts in groups of 2, ``compare_balancing.FINE_16``, cannot run M = 1); the same active compute as the
default top-2 of 8 experts of 256."""
STEPS = {"balancing": 200, "device_limited": 100}
"""Default steps per study: the loss-free bias needs the longer run; device-limited routing is a property of the
routing from the first step, and its 32-expert runs are the slower ones."""
STUDIES: dict[str, dict[str, list[str]]] = {
    "balancing": {
        "aux_loss": ["moe=default", *ACCUMULATE],
        "loss_free": ["moe=loss_free", *ACCUMULATE],
        "global_batch": ["moe=default", "moe.balance.scope=global", *ACCUMULATE],
        "none": ["moe=default", "moe.balance.expert_coef=0.0", *ACCUMULATE],
    },
    "device_limited": {
        "unrestricted": [*FINE_32, *WHOLE],
        "m1": [*FINE_32, "moe.router.topk_groups=1", *WHOLE],
        "m2": [*FINE_32, "moe.router.topk_groups=2", *WHOLE],
        "m3": [*FINE_32, "moe.router.topk_groups=3", *WHOLE],
    },
}


def run_one(run_dir: Path, overrides: list[str], args: argparse.Namespace, extra: list[str]) -> float:
    """Train one (strategy, seed) into ``run_dir`` unless it already finished; return the seconds taken."""
    if (run_dir / "summary.json").is_file():
        return 0.0
    if run_dir.exists():  # an interrupted run of this study: start it again from scratch
        shutil.rmtree(run_dir)
    threads = [f"trainer.num_threads={args.threads}"]
    cmd = train_command([*SETUP, *overrides, *threads], args.steps, args.log_every, run_dir, extra)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{run_dir} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    seconds = time.perf_counter() - t0
    print(f"[{run_dir.parent.name} {run_dir.name}] done in {seconds:.0f} s", flush=True)
    return seconds


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1)  # sample std over seeds
    return m, math.sqrt(var)


def devices_per_token(run_dir: Path) -> float | None:
    """Mean over MoE layers and the last 20% of logged steps of ``moe/layer_i/devices_per_token`` (None if not logged)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "train/loss" in r]
    tail = train[-max(1, round(0.2 * len(train))) :]
    values = [v for r in tail for k, v in r.items() if k.startswith("moe/layer_") and k.endswith("/devices_per_token")]
    return sum(values) / len(values) if values else None


def summarise_run(run_dir: Path) -> dict[str, Any]:
    return {**summarise(run_dir), "devices_per_token": devices_per_token(run_dir)}


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    keys = {
        "val_loss": lambda r: r["val_loss"],
        "val_maxvio_global": lambda r: r["val_maxvio_global"],
        "maxvio_mean": lambda r: sum(r["maxvio"]) / len(r["maxvio"]),
        "maxvio_tail": lambda r: r["tail_maxvio"],
    }
    if all(r.get("devices_per_token") is not None for r in per_seed):
        keys["devices_per_token"] = lambda r: r["devices_per_token"]
    out: dict[str, Any] = {k: mean_std([f(r) for r in per_seed]) for k, f in keys.items()}
    steps = per_seed[0]["steps"]
    curves = [r["maxvio"] for r in per_seed]
    out["steps"] = steps
    out["maxvio_curve"] = [mean_std([c[i] for c in curves]) for i in range(len(steps))]
    out["seeds"] = len(per_seed)
    return out


def add_paired_deltas(
    results: dict[str, dict[str, Any]], runs_by_seed: dict[str, dict[int, dict[str, Any]]], reference: str
) -> None:
    """``val_loss_delta``: mean +- std over the seeds both have of (strategy - ``reference``) final val/loss.

    The seed sets the initialisation of every strategy alike (the data order is ``data.seed``'s, the same in every
    run), so the paired difference removes the seed-to-seed spread that the unpaired std columns carry."""
    ref = runs_by_seed.get(reference, {})
    for name, r in results.items():
        common = sorted(set(runs_by_seed[name]) & set(ref))
        if name != reference and common:
            r["val_loss_delta"] = mean_std([runs_by_seed[name][s]["val_loss"] - ref[s]["val_loss"] for s in common])
            r["delta_reference"] = reference


def table(study: str, results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    pm = lambda ms, fmt: f"{ms[0]:{fmt}} ± {ms[1]:{fmt}}"  # noqa: E731
    lines = [
        f"Study `{study}`: {args.steps} steps, seeds {' '.join(map(str, args.seeds))}, mean ± std over seeds "
        "(sample std); `moe/maxvio` logged every "
        f"{args.log_every} steps, its mean over training and over the last 20%.",
        "",
    ]
    groups = all("devices_per_token" in r for r in results.values())
    ref = next((r["delta_reference"] for r in results.values() if "delta_reference" in r), None)
    columns = ["strategy", "seeds", "val/loss"]
    columns += [f"val/loss − {ref} (paired by seed)"] if ref else []
    columns += ["val/maxvio_global", "moe/maxvio (mean)", "moe/maxvio (last 20%)"]
    columns += ["device groups per token (last 20%)"] if groups else []
    lines += ["| " + " | ".join(columns) + " |", "| --- " * len(columns) + "|"]
    for name, r in results.items():
        cells = [name, str(r["seeds"]), pm(r["val_loss"], ".4f")]
        if ref:
            cells.append(
                "(reference)"
                if name == ref
                else f"{r['val_loss_delta'][0]:+.4f} ± {r['val_loss_delta'][1]:.4f}"
                if "val_loss_delta" in r
                else ""
            )
        cells += [pm(r["val_maxvio_global"], ".3f"), pm(r["maxvio_mean"], ".3f"), pm(r["maxvio_tail"], ".3f")]
        cells += [pm(r["devices_per_token"], ".2f")] if groups else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, Any]], path: Path) -> bool:
    """The seeds' mean MaxVio per step with a +-1 std band, per strategy."""
    curves = {
        f"{name} ({r['seeds']} seeds)": (
            r["steps"],
            [m for m, _ in r["maxvio_curve"]],
            [s for _, s in r["maxvio_curve"]],
        )
        for name, r in results.items()
    }
    return plot_maxvio(curves, path)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", choices=list(STUDIES), required=True)
    p.add_argument("--strategies", nargs="+", default=None, help="a subset of the study's strategies")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the study's STEPS)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--jobs", type=int, default=1, help="trainings at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training")
    p.add_argument("--out", type=Path, default=Path("runs/replicate"))
    p.add_argument("--summarise-only", action="store_true", help="re-read finished runs, train nothing")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = STEPS[args.study]
    strategies = STUDIES[args.study]
    names = args.strategies or list(strategies)
    unknown = [n for n in names if n not in strategies]
    if unknown:
        raise SystemExit(f"replicate: unknown strategy {unknown[0]!r} of study {args.study} ({', '.join(strategies)})")
    out = args.out / args.study
    jobs = [(name, seed) for seed in args.seeds for name in names]
    if not args.summarise_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            runs = [
                pool.submit(
                    run_one, out / name / f"seed{seed}", [*strategies[name], f"trainer.seed={seed}"], args, extra
                )
                for name, seed in jobs
            ]
            for run in runs:
                run.result()
    runs_by_seed = {
        name: {
            seed: summarise_run(out / name / f"seed{seed}")
            for seed in args.seeds
            if (out / name / f"seed{seed}" / "summary.json").is_file()
        }
        for name in names
    }
    results = {name: aggregate(list(r.values())) for name, r in runs_by_seed.items() if r}
    add_paired_deltas(results, runs_by_seed, names[0])
    text = table(args.study, results, args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(text)
    if plot(results, out / "maxvio.png"):
        print(f"plot: {out / 'maxvio.png'}")


if __name__ == "__main__":
    main()
