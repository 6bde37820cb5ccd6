"""A newcomer's defaults (issue 31): one config that runs on any number of ranks, threads that fit the CPUs
the process may use, and tools that print sizes a person can read."""

from __future__ import annotations

import pytest

from moetrain.config import ConfigError, TrainConfig, default_threads, micro_batch_for, validate, with_micro_batch
from moetrain.config_docs import composed_defaults


@pytest.mark.unit
@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_default_and_smoke_configs_validate_unchanged_on_1_2_and_4_ranks(world):
    """Before: ``micro_batch_size: 16`` with ``global_batch_size: 16`` refused two ranks, so every multi-rank
    command needed a hand-set micro-batch. Catches a default micro-batch that does not follow the world size."""
    for overrides in ([], ["experiment=smoke"]):
        cfg = with_micro_batch(composed_defaults(overrides), world)
        validate(cfg, world_size=world)
        t = cfg.trainer
        assert t.global_batch_size % (t.micro_batch_size * world) == 0
    assert with_micro_batch(composed_defaults([]), world).trainer.micro_batch_size == 16 // world


@pytest.mark.unit
def test_an_unset_micro_batch_is_each_ranks_share_and_a_global_batch_that_does_not_split_is_one_line():
    """Catches an unset micro-batch resolved to the global batch (accumulating nothing but refusing W>1), and
    an uneven global batch that reaches the loader (silently dropping sequences) instead of one line."""
    t = TrainConfig().trainer
    assert t.micro_batch_size is None
    assert [micro_batch_for(t, w) for w in (1, 2, 4, 8, 16)] == [16, 8, 4, 2, 1]
    t.global_batch_size = 6
    with pytest.raises(ConfigError, match=r"^trainer.global_batch_size=6: must be divisible by the world size=4"):
        micro_batch_for(t, 4)
    cfg = TrainConfig()
    cfg.trainer.micro_batch_size = 16
    with pytest.raises(ConfigError, match=r"set trainer.micro_batch_size to a divisor of 8 .* or unset it"):
        validate(cfg, world_size=2)


@pytest.mark.unit
def test_default_threads_share_the_cpus_of_the_affinity_mask_between_the_local_ranks(monkeypatch):
    """Before: torch's default counted the machine's cores (a shared 2-core slice ran 5x slower). Catches a
    default above the CPUs the process may use, or one per rank that oversubscribes them under torchrun."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert [default_threads(n) for n in (1, 2, 4, 8)] == [4, 2, 1, 1]


STOP_AT = (
    "import os, signal; from moetrain.train import hooks\n"
    "class Stop:\n"
    "    def after_step(self, step, **kw):\n"
    "        if step == int(os.environ.get('STOP_AT', -1)): os.kill(os.getpid(), signal.SIGINT)\n"
    "hooks.install(Stop()); import sys; sys.argv[0] = 'moetrain-train'\n"
    "from moetrain.train.cli import main; main()"
)


def _train(tmp_path, args, stop_at=None):  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "WANDB_MODE": "disabled"}
    env.pop("STOP_AT", None)
    if stop_at is not None:
        env["STOP_AT"] = str(stop_at)
    cmd = [sys.executable, "-c", STOP_AT, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


@pytest.mark.e2e
@pytest.mark.parametrize("named", [True, False])
def test_ctrl_c_then_the_printed_command_resumes_the_same_run(tmp_path, named):
    """Before: the stop said "rerun to continue", but the same command started a new ``runs/<time>/``.
    With ``run_name=first`` the printed command is the user's own and rerunning it continues ``runs/first``;
    without a name it adds the ``run_dir=`` to give. Catches a run name that does not fix the directory,
    a printed command that differs from the one that continues, and a rerun that starts afresh."""
    import json
    import shlex

    from tests.conftest import cli_corpus_overrides
    from tests.test_reliability import TINY_CLI

    args = [*TINY_CLI, *cli_corpus_overrides(tmp_path), "trainer.max_steps=4", "logger=none"]
    args += ["run_name=first"] if named else []
    first = _train(tmp_path, args, stop_at=2)
    assert first.returncode == 130, first.stderr[-2000:]
    said = [line for line in first.stdout.splitlines() if "to continue this run:" in line]
    assert len(said) == 1, first.stdout[-2000:]
    command = shlex.split(said[0].split("to continue this run: ", 1)[1])
    assert command[0] == "moetrain-train"
    if named:
        assert command[1:] == args
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (not named or runs[0].name == "first")
    again = _train(tmp_path, command[1:])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout and list((tmp_path / "runs").iterdir()) == runs
    records = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
    assert (runs[0] / "summary.json").is_file()


@pytest.mark.unit
def test_resume_latest_picks_the_newest_unfinished_run_of_the_name(tmp_path):
    """Catches ``latest`` choosing a finished run (it would be refused), a run without a checkpoint, or a run of
    another name."""
    import os
    import time

    from moetrain.train.rundir import chosen_run_dir

    def run(name: str, step: int, finished: bool = False) -> None:
        ckpt = tmp_path / name / "checkpoints" / f"step_{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "meta.json").write_text("{}")
        os.utime(ckpt, (time.time() + step, time.time() + step))
        if finished:
            (tmp_path / name / "summary.json").write_text("{}")

    run("a-1", 1)
    run("a-2", 2)
    run("b", 3)
    run("a-3", 4, finished=True)
    (tmp_path / "a-4").mkdir()
    assert chosen_run_dir(None, "a", "latest", tmp_path) == str(tmp_path / "a-2")
    assert chosen_run_dir(None, None, "latest", tmp_path) == str(tmp_path / "b")
    assert chosen_run_dir(None, "c", "latest", tmp_path) == str(tmp_path / "c")
    assert chosen_run_dir("x", "a", "latest", tmp_path) == "x"
    assert chosen_run_dir(None, None, "auto", tmp_path) is None
