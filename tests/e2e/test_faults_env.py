"""Fault injection, the environment's faults (a sibling of ``tests/e2e/test_faults.py``): the disk fills up during a
checkpoint save, the run directory's parent is read-only, SIGTERM arrives in the middle of an evaluation.
The faults come from ``tests/helpers/fault_hooks.py`` (a hook, not a tmpfs: tests run as root, without mount
rights). Each test names the behaviour before the fix that it catches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from moetrain.config import from_dict, to_dict
from moetrain.train.checkpoint import complete_checkpoints
from moetrain.train.trainer import Trainer
from tests.conftest import cli_corpus_overrides, tiny_train_config
from tests.helpers.distributed import run_distributed
from tests.train.test_guards_and_refusals import TINY_CLI, _losses

REPO = Path(__file__).resolve().parents[2]
WITH_FAULTS = "import tests.helpers.fault_hooks as f; f.install(); from moetrain.train.cli import main; main()"


def cli_with_faults(tmp_path: Path, env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    """``moetrain-train`` on the tiny config with ``tests/helpers/fault_hooks.py`` installed, faults from ``env``."""
    args = [sys.executable, "-c", WITH_FAULTS, *TINY_CLI, *cli_corpus_overrides(tmp_path), *overrides]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=full_env, timeout=300)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and "WARNING" not in line]


@pytest.mark.e2e
def test_disk_full_during_a_save_is_one_line_keeps_the_last_checkpoint_and_the_rerun_finishes(tmp_path):
    """Before: DCP's ``CheckpointException`` (a ``BaseException`` wrapping the ENOSPC) went past every
    ``except Exception`` and ended the run with a two-part traceback, and the half-written
    ``step_000004.tmp`` stayed on the full disk. Now: one line naming the file, exit 2, the staging dir
    removed, ``step_000002`` intact, and a rerun (space freed) resumes from it and finishes."""
    run = tmp_path / "run"
    common = ("trainer.max_steps=6", "checkpoint.every=2", "checkpoint.keep_last=0", f"run_dir={run}")
    full = cli_with_faults(tmp_path, {"MOETRAIN_FAULT_DISK_FULL_AT_SAVE": "2"}, *common)
    assert full.returncode == 2, full.stderr[-3000:]
    assert lines(full.stderr) == [
        f"moetrain: file error: {run}/checkpoints/step_000004.tmp/__0_0.distcp: no space left on the device"
    ]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]
    again = cli_with_faults(tmp_path, {}, *common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout + again.stderr
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [2, 4, 6]


@pytest.mark.e2e
def test_environment_and_hydra_errors_before_the_run_are_one_line(tmp_path):
    """Before: Hydra creates the run directory before moetrain's handler runs, so a read-only parent was
    Hydra's traceback (exit 1); a bad override was Hydra's multi-line message. Now both are one line, exit 2."""
    ro = tmp_path / "ro"
    proc = cli_with_faults(
        tmp_path, {"MOETRAIN_FAULT_READ_ONLY": str(ro)}, "trainer.max_steps=1", f"run_dir={ro}/a/run"
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines(proc.stderr) == [f"moetrain: file error: {ro}/a/run: read-only file system"]
    proc = cli_with_faults(tmp_path, {}, "model.dimm=3", f"run_dir={tmp_path / 'x'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines(proc.stderr) == [  # before Hydra, with the nearest known key (issue 31)
        "moetrain: config error: model.dimm: unknown key (did you mean model.dim? moetrain-train --help lists every key)"
    ]


# ------------------------------------------------------------------ SIGTERM during an evaluation
def _signal_in_eval(trainer: Trainer, at_step: int, at_batch: int, signum: int) -> list[int]:
    """Deliver ``signum`` during evaluation batch ``at_batch`` (1-based) of step ``at_step``; the returned list
    collects the step of every evaluation batch run."""
    module = trainer.module
    forward = module.eval_forward
    seen: list[int] = []

    def counted(tokens):  # type: ignore[no-untyped-def]
        seen.append(trainer.step)
        if trainer.step == at_step and seen.count(at_step) == at_batch:
            os.kill(os.getpid(), signum)
        return forward(tokens)

    module.eval_forward = counted  # type: ignore[method-assign]
    return seen


def eval_config(tmp_path: Path, **kw: object):  # type: ignore[no-untyped-def]
    cfg = tiny_train_config(tmp_path, max_steps=6, eval_every=2, micro_batch_size=2, **kw)
    cfg.data.max_val_sequences = 16  # 8 evaluation batches of 2 sequences on one rank
    cfg.checkpoint.every = 100
    return cfg


@pytest.mark.parity
def test_sigterm_during_evaluation_stops_it_at_the_next_batch_saves_and_the_rerun_continues_exactly(tmp_path):
    """Before: the signal waited for the whole evaluation (72 s on a real split, past SLURM's 30 s grace),
    then saved. Now the evaluation ends before its next batch (2 of 8 batches run), the step is saved,
    the run exits 143, nothing of the cut evaluation is logged, and the rerun ends as an uninterrupted run."""
    cfg = eval_config(tmp_path)
    straight = Trainer(cfg, tmp_path / "straight").fit()
    tr = Trainer(cfg, tmp_path / "run")
    seen = _signal_in_eval(tr, at_step=2, at_batch=2, signum=signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        tr.fit()
    assert exc.value.code == 128 + signal.SIGTERM
    assert seen.count(2) == 2 and seen.count(4) == 0
    assert [s for s, _ in complete_checkpoints(tmp_path / "run" / "checkpoints")] == [2]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/loss" in r] == [0]  # the evaluation at the start only
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    final = Trainer(cfg, tmp_path / "run").fit()
    assert _losses(tmp_path / "run") == _losses(tmp_path / "straight")
    assert final["val/loss"] == straight["val/loss"]


def _eval_signal_one_rank(rank: int, world: int, root: str, cfg_dict: dict) -> tuple[int, int, int]:
    from moetrain.parallel.context import init_parallel

    cfg = from_dict(cfg_dict)
    pc = init_parallel(cfg.parallel, "cpu", cfg.moe.num_experts)
    tr = Trainer(cfg, Path(root), pc)
    at_step = 2 if rank == 0 else -1  # only rank 0 hears the signal; rank 1 only counts its batches
    seen = _signal_in_eval(tr, at_step=at_step, at_batch=2, signum=signal.SIGTERM)
    try:
        tr.fit()
    except SystemExit as e:
        return int(e.code or 0), tr.step, seen.count(2)
    return 0, tr.step, seen.count(2)


@pytest.mark.parity
def test_sigterm_on_one_rank_during_an_ep_evaluation_stops_every_rank_at_the_same_batch(tmp_path):
    """The stop is voted before each evaluation batch: a rank that stopped alone would leave its EP peer
    waiting in the next batch's all-to-all (a hang, not an exit)."""
    cfg = eval_config(tmp_path)
    cfg.parallel.ep = 2
    out = run_distributed(_eval_signal_one_rank, 2, str(tmp_path / "run"), to_dict(cfg), timeout=180)
    assert out == [(143, 2, 2), (143, 2, 2)]
    assert [s for s, _ in complete_checkpoints(tmp_path / "run" / "checkpoints")] == [2]
