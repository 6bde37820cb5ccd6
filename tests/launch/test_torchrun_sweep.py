"""Sweeps: Hydra multirun where each job is a multi-rank torchrun job, with a summary."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from moetrain.launch.sweep import format_table, sweep_rows
from moetrain.launch.sweep import main as summary_main
from tests.helpers.wandb_records import read_wandb_history, read_wandb_run

pytestmark = pytest.mark.e2e


def run_sweep(tmp_path, sweep_dir, swept: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOETRAIN_CACHE": str(tmp_path / "cache"), "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    env.pop("WANDB_MODE", None)
    cmd = [
        sys.executable,
        "-m",
        "moetrain.train",
        "-m",
        "hydra/launcher=torchrun",
        "hydra.launcher.nproc_per_node=2",
        "hydra.launcher.max_parallel=2",
        f"hydra.sweep.dir={sweep_dir}",
        "experiment=smoke",
        "parallel.ep=2",
        "trainer.max_steps=6",
        "trainer.eval_every=0",
        "logger.wandb.mode=offline",
        "optim.lr=2e-3",
        swept,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)


def test_two_job_torchrun_sweep_with_a_failing_job_then_resume(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # job 0 is fine; job 1's config is valid but names a checkpoint that is not there (a config error would
    # launch nothing: tests/e2e/test_newcomer.py), so it fails on its own once it runs
    proc = run_sweep(tmp_path, sweep_dir, "trainer.resume=auto,/nonexistent/step_000001")
    # the failed job is a row and one line (torchrun's exit code for a failed rank is 1), not Hydra's traceback
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "moetrain: 1 of 2 sweep jobs failed: #1 (exit 1)" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    rows = sweep_rows(sweep_dir)
    assert [(r["job"], r["status"]) for r in rows] == [(0, "completed"), (1, "failed (exit 1)")]
    assert rows[0]["val/loss"] is not None and rows[0]["val/maxvio_global"] is not None
    assert rows[0]["perf/tokens_per_sec"] > 0
    assert "trainer.resume=/nonexistent/step_000001" in " ".join(rows[1]["overrides"])
    assert "moetrain: checkpoint error:" in (sweep_dir / "1" / "launcher.log").read_text()
    assert rows[1]["cause"].startswith("moetrain: checkpoint error:")  # the cause, in the summary's row too
    assert (sweep_dir / "summary.md").read_text().strip() == format_table(rows)

    # one run directory per job, written by rank 0 only; 2 ranks, EP=2
    job0 = sweep_dir / "0"
    records = [json.loads(x) for x in (job0 / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and "moe/layer_1/load" in records[-2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "sweep"]  # no stray per-rank dirs
    assert read_wandb_run(job0)["group"] == "sweep"
    assert any("moe/layer_1/maxvio" in h for h in read_wandb_history(job0))

    # a second job set in the same sweep dir: job 0 is skipped (already complete), job 1 now runs
    mtime = (job0 / "metrics.jsonl").stat().st_mtime
    (sweep_dir / "1" / "failed.json").unlink()
    proc = run_sweep(tmp_path, sweep_dir, "trainer.resume=auto,none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already completed" in proc.stderr + proc.stdout
    assert (job0 / "metrics.jsonl").stat().st_mtime == mtime
    rows = sweep_rows(sweep_dir)
    assert [(r["job"], r["status"]) for r in rows] == [(0, "completed"), (1, "completed")]
    assert read_wandb_run(sweep_dir / "1")["group"] == "sweep"
    assert read_wandb_run(sweep_dir / "1")["name"] == "sweep-1"


def test_summary_command_prints_the_table(tmp_path, capsys):
    job = tmp_path / "s" / "0"
    job.mkdir(parents=True)
    (job / "job.json").write_text(json.dumps({"num": 0, "overrides": ["moe=switch"]}))
    (job / "metrics.jsonl").write_text(
        json.dumps({"step": 5, "perf/tokens_per_sec": 1000.0}) + "\n" + json.dumps({"step": 5, "val/loss": 2.5}) + "\n"
    )
    summary_main([str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert "| 0 | incomplete | moe=switch | 2.5000 | — | 1,000 |" in out
    with pytest.raises(SystemExit, match="no sweep jobs"):
        summary_main([str(tmp_path)])


@pytest.mark.unit
def test_slurm_tasks_become_ranks():
    from moetrain.launch.slurm import export_slurm_env, first_host

    assert first_host("gpu[003-007,012],cpu01") == "gpu003"
    assert first_host("node7") == "node7"
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS_PER_NODE": "8(x2)",
        "SLURM_JOB_NODELIST": "h[10-11]",
        "SLURM_JOB_ID": "123456",
    }
    assert export_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("5", "16", "1", "8")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("h10", str(random.Random("123456").randint(20000, 60000)))
    torchrun = {"RANK": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert not export_slurm_env(torchrun) and "MASTER_ADDR" not in torchrun  # torchrun's variables win
    assert not export_slurm_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})


@pytest.mark.unit
def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from moetrain.train.cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
