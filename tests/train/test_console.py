"""Run output through ``logging``: the same lines on stdout and in ``train.log``, flushed line by line when
stdout is not a terminal, each with the elapsed time and the ETA; the bar only on a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from moetrain.train.console import LogSink, clock, terminal_bar_wanted
from tests.conftest import cli_corpus_overrides, tiny_train_config
from tests.train.test_guards_and_refusals import TINY_CLI

STEP_LINE = "step "


@pytest.mark.unit
def test_clock_and_eta_from_the_steps_done_this_run(monkeypatch):
    assert clock(0) == "0:00:00" and clock(3725.9) == "1:02:05"
    sink = LogSink(None, max_steps=100, start_step=40, progress=False)  # a resumed run: 60 steps to go
    sink.t0 = time.perf_counter() - 30.0  # 10 steps took 30 s
    timing = sink.timing(50)
    assert timing.startswith("elapsed 0:00:3") and timing.endswith("eta 0:02:30"), timing
    assert sink.timing(40).endswith("eta ?")  # nothing done yet: no estimate
    assert not terminal_bar_wanted(False)


@pytest.mark.e2e
def test_lines_arrive_while_the_run_lives_and_train_log_holds_the_same(tmp_path):
    """stdout is a pipe (as under SLURM or nohup): the first step line must arrive long before the run ends
    (block buffering would hold it back), and ``train.log`` has exactly the lines stdout had."""
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "moetrain.train",
        *TINY_CLI,
        *cli_corpus_overrides(tmp_path),
        "trainer.max_steps=100000",
        f"run_dir={run_dir}",
    ]
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)  # the real case: Python block-buffers a pipe
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path, env=env)
    try:
        seen = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            seen.append(line.rstrip("\n"))
            if sum(s.startswith(STEP_LINE) for s in seen) >= 2:
                break
        alive = proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    steps = [s for s in seen if s.startswith(STEP_LINE)]
    assert alive and len(steps) == 2, seen  # two step lines read from a pipe while training goes on
    assert all(" | elapsed " in s and " | eta " in s for s in steps)
    logged = (run_dir / "train.log").read_text(encoding="utf-8").splitlines()
    assert logged[: len(seen)] == seen


@pytest.mark.e2e
def test_train_log_keeps_the_lines_of_the_run_it_resumes(tmp_path):
    """Catches ``train.log`` opened with mode "w": a run resumed in the same run_dir would erase the lines of
    the run before it. Two steps, then a resume to four: the log holds steps 1 to 4, each once, in order."""
    from moetrain.train.trainer import Trainer

    run_dir = tmp_path / "run"
    cfg = tiny_train_config(tmp_path, max_steps=2, eval_at_start=False)
    cfg.checkpoint.every = 2
    Trainer(cfg, run_dir).fit()
    first = (run_dir / "train.log").read_text(encoding="utf-8").splitlines()
    cfg.trainer.max_steps = 4  # a free key on resume
    resumed = Trainer(cfg, run_dir)
    resumed.fit()
    assert resumed.checkpointer.resumed_from is not None  # it did resume
    logged = (run_dir / "train.log").read_text(encoding="utf-8").splitlines()
    assert logged[: len(first)] == first
    steps = [line.split("|")[0].split()[1] for line in logged if line.startswith(STEP_LINE)]
    assert steps == ["1/2", "2/2", "3/4", "4/4"], logged
