"""Compare routing / balancing strategies on the same data, model and budget.

Runs ``moetrain-train`` once per strategy (a subprocess each, same seed, same
global batches), then writes ``results.md`` (final ``val/loss``,
``val/maxvio_global``, the mean ``moe/maxvio`` over the last 20% of logged
steps, mean ``perf/tokens_per_sec``) and ``maxvio.png`` (``moe/maxvio`` against
steps, like the figures of Wang et al. 2024, Loss-Free Balancing). Needs the
``plot`` extra (matplotlib) for the PNG.

    python scripts/compare_balancing.py --steps 150 --strategies aux_loss loss_free
    python scripts/compare_balancing.py --strategies topk_16e device_limited_m3 mixtral -- optim.lr=1e-3

A strategy is a name below, any preset of ``configs/moe`` (``moe=<name>``), or
``LABEL=OVERRIDE,OVERRIDE,...`` (e.g. ``lf_u1e-2=moe=loss_free,moe.router.bias_update_rate=0.01``).
Everything after ``--`` is passed to every run as Hydra overrides.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FINE_16 = ["moe=default", "moe.num_experts=16", "moe.top_k=4", "moe.expert_hidden_size=128", "moe.router.num_groups=8"]

STRATEGIES: dict[str, list[str]] = {
    "aux_loss": ["moe=default"],
    "loss_free": ["moe=loss_free"],
    "topk_16e": FINE_16,
    "device_limited_m3": [*FINE_16, "moe.router.topk_groups=3"],
}
"""Built-in comparisons: the default softmax top-2 with the expert-level aux loss (a1 = 0.01) vs
loss-free balancing (u = 1e-3, no aux loss); and 16 fine-grained experts top-4 in 8 groups,
unrestricted vs DeepSeek-V2 device-limited to M = 3 groups (same active compute as the default)."""


def label_of(name: str) -> str:
    """The run's name: the part before the first ``=`` of a ``LABEL=OVERRIDES`` spec, else the name."""
    return name.split("=", 1)[0]


def overrides_for(name: str) -> list[str]:
    if "=" in name:
        return name.split("=", 1)[1].split(",")
    if name in STRATEGIES:
        return STRATEGIES[name]
    preset = Path(__file__).resolve().parent.parent / "configs" / "moe" / f"{name}.yaml"
    if preset.is_file():
        return [f"moe={name}"]
    raise SystemExit(
        f"compare_balancing: unknown strategy {name!r} (built-in: {', '.join(STRATEGIES)}, or a moe preset)"
    )


def train_command(overrides: list[str], steps: int, log_every: int, run_dir: Path, extra: list[str]) -> list[str]:
    """``python -m moetrain.train`` for one comparison run: no W&B, no checkpoints, no mid-run evaluation."""
    return [
        sys.executable,
        "-m",
        "moetrain.train",
        *overrides,
        "logger=none",
        f"trainer.max_steps={steps}",
        f"trainer.log_every={log_every}",
        "trainer.eval_every=0",
        "trainer.progress=false",
        "checkpoint.enabled=false",
        f"run_dir={run_dir}",
        *extra,
    ]


def run_one(name: str, args: argparse.Namespace, extra: list[str]) -> Path:
    run_dir = args.out / label_of(name)
    cmd = train_command([*overrides_for(name), f"trainer.seed={args.seed}"], args.steps, args.log_every, run_dir, extra)
    print(f"[{label_of(name)}] {' '.join(cmd[3:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[{label_of(name)}] failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"[{label_of(name)}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def summarise(run_dir: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if "val/loss" in r]
    tail = train[-max(1, round(0.2 * len(train))) :]
    tps = [r["perf/tokens_per_sec"] for r in train[1:]] or [r["perf/tokens_per_sec"] for r in train]
    return {
        "steps": [r["step"] for r in train],
        "maxvio": [r["moe/maxvio"] for r in train],
        "val_loss": val[-1]["val/loss"],
        "val_maxvio_global": val[-1].get("val/maxvio_global", float("nan")),
        "tail_maxvio": sum(r["moe/maxvio"] for r in tail) / len(tail),
        "tokens_per_sec": sum(tps) / len(tps),
        "train_loss": train[-1]["train/loss"],
    }


def table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Budget: {args.steps} steps, seed {args.seed}, same data; moe/maxvio averaged over the last 20% of logged steps.",
        "",
        "| strategy | val/loss | val/maxvio_global | moe/maxvio (last 20%) | tokens/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['val_loss']:.4f} | {r['val_maxvio_global']:.3f} | {r['tail_maxvio']:.3f} "
            f"| {r['tokens_per_sec']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot_maxvio(curves: dict[str, tuple[list[int], list[float], list[float] | None]], path: Path) -> bool:
    """MaxVio against steps, one line per label (``steps, values, std or None``; a std draws a +-1 band)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'moetrain[plot]'); no PNG", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (steps, values, std) in curves.items():
        ax.plot(steps, values, label=label)
        if std is not None:
            ax.fill_between(
                steps, [v - s for v, s in zip(values, std)], [v + s for v, s in zip(values, std)], alpha=0.2
            )
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio (per step, mean over MoE layers)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot(results: dict[str, dict[str, Any]], path: Path) -> bool:
    return plot_maxvio({name: (r["steps"], r["maxvio"], None) for name, r in results.items()}, path)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per strategy")
    p.add_argument("--log-every", type=int, default=5, help="log (and sample MaxVio) every n steps")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), help="built-in names or moe presets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/compare_balancing"), help="output directory")
    p.add_argument("--summarise-only", action="store_true", help="re-read existing runs in --out, train nothing")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for name in args.strategies:
        overrides_for(name)  # fail on a bad name before any run
    for name in args.strategies:
        run_dir = args.out / label_of(name) if args.summarise_only else run_one(name, args, extra)
        results[label_of(name)] = summarise(run_dir)
    text = table(results, args)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(text)
    if plot(results, args.out / "maxvio.png"):
        print(f"plot: {args.out / 'maxvio.png'}")


if __name__ == "__main__":
    main()
