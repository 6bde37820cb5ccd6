"""The command line of one run, as a user types it: the run directory it names, and the command that continues it.

``run_name=NAME`` puts a single run in ``runs/NAME`` (so the same command, run again, continues it: the
default ``trainer.resume=auto`` picks its newest checkpoint); ``trainer.resume=latest`` continues the newest
unfinished run under ``runs/`` (of that name, with ``run_name``). Both become a ``run_dir=`` here, before
Hydra makes its own ``runs/<time>``. When a run stops on a signal, :func:`resume_command` is the exact
command that continues it (printed by :mod:`moetrain.train.cli`).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from moetrain.train.rundir import RUNS_ROOT, chosen_run_dir

SWEEP_FLAGS = ("-m", "--multirun")


def arg_value(args: list[str], key: str) -> str | None:
    """The last ``key=value`` (or ``+key=`` / ``++key=``) among the overrides; ``None`` when absent or null."""
    found = None
    for a in args:
        name, eq, value = a.lstrip("+").partition("=")
        if eq and name == key:
            found = value
    return None if found in (None, "", "null") else found


def without(args: list[str], key: str) -> list[str]:
    """The overrides less every ``key=...``."""
    return [a for a in args if a.lstrip("+").partition("=")[0] != key]


def resolve_run_args(args: list[str]) -> list[str]:
    """The overrides with ``run_name`` / ``trainer.resume=latest`` turned into a ``run_dir=`` and
    ``trainer.resume=auto`` (a single run; in a sweep each job has its own directory, ``latest`` = ``auto``)."""
    resume = arg_value(args, "trainer.resume") or "auto"
    out = list(args)
    if resume == "latest":
        out = [*without(out, "trainer.resume"), "trainer.resume=auto"]
    if any(a in SWEEP_FLAGS for a in args) or any(a.startswith("hydra.run.dir=") for a in args):
        return out
    given = arg_value(args, "run_dir")
    chosen = chosen_run_dir(given, arg_value(args, "run_name"), resume, RUNS_ROOT)
    if resume == "latest" and not given and os.environ.get("RANK", "0") == "0":
        found = f"continuing {chosen}" if chosen else f"no unfinished run under {RUNS_ROOT}/; starting a new one"
        print(f"moetrain: trainer.resume=latest: {found}", flush=True)
    if chosen is not None and not given:
        out.append(f"run_dir={chosen}")
    return out


def resume_command(user_args: list[str], run_dir: str) -> str:
    """The command that continues the run in ``run_dir``: the user's own overrides, with the run directory
    named (unless ``run_dir`` / ``run_name`` already fix it) and any ``trainer.resume`` dropped (the default,
    ``auto``, continues from the newest checkpoint); under ``torchrun``, as a ``torchrun`` command."""
    args = without(user_args, "trainer.resume")
    if not arg_value(args, "run_dir") and not arg_value(args, "run_name"):
        args = [*without(args, "hydra.run.dir"), f"run_dir={run_dir}"]
    ranks = os.environ.get("LOCAL_WORLD_SIZE")
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None and ranks:
        prefix = ["torchrun", f"--nproc-per-node={ranks}", "-m", "moetrain.train"]
    else:
        prefix = ["moetrain-train"]
    return shlex.join([*prefix, *args])


def say_done(run_path: Path, final: dict, max_steps: int, user_args: list[str] | None) -> None:
    """The closing summary (:func:`moetrain.train.console.closing_summary`), its command to train longer the
    user's own (with the run directory named) with twice the steps."""
    from moetrain.tools.run_records import median_tokens_per_sec, parse_metrics
    from moetrain.train.console import closing_summary

    if user_args is not None and any(a in SWEEP_FLAGS for a in user_args):
        return  # a job of an in-process sweep: the sweep's summary follows
    records = parse_metrics(run_path / "metrics.jsonl")[0] if (run_path / "metrics.jsonl").is_file() else []
    args = [a for a in (user_args or []) if not a.startswith("trainer.max_steps=")]
    longer = resume_command([*args, f"trainer.max_steps={2 * max_steps}"], str(run_path))
    print(closing_summary(run_path, final, median_tokens_per_sec(records), longer), flush=True)


def say_how_to_continue(run_path: Path, user_args: list[str] | None) -> None:
    """The exact command that continues a stopped run (the user's own, with its run directory named)."""
    if user_args is None:  # the Python API: the run directory is what a caller needs
        print(f"moetrain: continue it with run({run_path!s}) or moetrain-train run_dir={run_path}", flush=True)
        return
    if any(a in SWEEP_FLAGS for a in user_args):  # relaunching the sweep skips its completed jobs
        print("moetrain: to continue, run the sweep again with the same hydra.sweep.dir", flush=True)
        return
    print(f"moetrain: to continue this run: {resume_command(user_args, str(run_path))}", flush=True)


def group_options(root: str) -> str:
    """Each config group and its options (the YAML files of ``configs/GROUP/``), for ``--help``."""
    base = Path(root)
    lines = ["", "Config groups (GROUP=OPTION on the command line):"]
    for group in sorted(p for p in base.iterdir() if p.is_dir() and p.name != "hydra"):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        if options:
            lines.append(f"  {group.name}: {', '.join(options)}")
    return "\n".join(lines)
