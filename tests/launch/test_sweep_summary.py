"""Sweep summaries and plots for any Hydra sweep (basic, torchrun, SLURM), runs labelled by their overrides;
SLURM ranks from submitit's helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moetrain.launch.sweep import main as summary_main
from moetrain.launch.sweep import sweep_rows
from moetrain.tools.plot import dropped_keys, run_labels

REPO = Path(__file__).resolve().parents[2]
DIST_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DIST_AT_IMPORT = {k: os.environ.get(k) for k in DIST_KEYS}


@pytest.mark.e2e
def test_a_basic_launcher_sweep_is_summarised_and_its_runs_labelled_by_overrides(tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MOETRAIN_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "moetrain.train", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "experiment=smoke"]
    cmd += ["trainer.max_steps=2", "trainer.eval_every=0", "data.max_val_sequences=4", "logger=none"]
    proc = subprocess.run([*cmd, "optim.lr=1e-3,3e-3"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = sweep_rows(tmp_path / "sweep")
    assert [(r["job"], r["status"]) for r in rows] == [(0, "completed"), (1, "completed")]
    assert rows[1]["overrides"][-1] == "optim.lr=0.003" and rows[0]["val/loss"] is not None
    summary_main([str(tmp_path / "sweep")])
    assert "| 1 | completed |" in capsys.readouterr().out
    assert run_labels([tmp_path / "sweep" / "0", tmp_path / "sweep" / "1"]) == ["optim.lr=0.001", "optim.lr=0.003"]


def fake_job(job_dir: Path, num: int, overrides: list[str], loss: float, hydra: bool = True) -> None:
    """A finished job folder as Hydra's basic / submitit launchers leave it (no job.json)."""
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job_dir / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
    (job_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": loss, "perf/tokens_per_sec": 10.0}))
    metrics = {"val/loss": loss, "val/maxvio_global": 0.5}
    (job_dir / "summary.json").write_text(json.dumps({"status": "completed", "metrics": metrics}))


@pytest.mark.unit
def test_a_slurm_sweep_layout_is_read(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / ".submitit").mkdir(parents=True)  # submitit's own folder is not a job
    for num, lr in enumerate(("1e-3", "3e-3")):
        fake_job(sweep / str(num), num, ["hydra/launcher=slurm", "moe=switch", f"optim.lr={lr}"], 2.0 + num)
    rows = sweep_rows(sweep)
    assert [(r["job"], r["status"], r["val/loss"]) for r in rows] == [(0, "completed", 2.0), (1, "completed", 3.0)]
    assert run_labels([sweep / "0", sweep / "1"]) == ["optim.lr=1e-3", "optim.lr=3e-3"]


@pytest.mark.unit
def test_runs_without_overrides_are_labelled_by_their_differing_config_keys(tmp_path):
    from moetrain.config import TrainConfig, to_dict
    from moetrain.train.cli import save_resolved_config

    for name, lr in (("20250101-000000", 1e-3), ("20250101-000500", 3e-3)):
        cfg = TrainConfig()
        cfg.optim.lr, cfg.run_dir = lr, str(tmp_path / name)
        save_resolved_config(cfg, tmp_path / name)
        assert to_dict(cfg)["optim"]["lr"] == lr
    labels = run_labels([tmp_path / "20250101-000000", tmp_path / "20250101-000500"])
    assert labels == ["optim.lr=0.001", "optim.lr=0.003"]


@pytest.mark.unit
def test_drop_fraction_keys_only_where_something_was_dropped():
    runs = {"a": [{"step": 1, "moe/layer_1/drop_frac": 0.0, "moe/layer_2/drop_frac": 0.02}]}
    assert dropped_keys(runs, "drop_frac") == ["moe/layer_2/drop_frac"]
    assert dropped_keys({"a": [{"step": 1, "moe/layer_1/drop_frac": 0.0}]}, "drop_frac") == []


@pytest.mark.unit
def test_submitit_tasks_take_submitit_s_torch_distributed_environment(monkeypatch):
    submitit = pytest.importorskip("submitit")
    from moetrain.launch.slurm import export_slurm_env, master_port

    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "140123",
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "unset")  # recorded, so the teardown removes what the export sets
        monkeypatch.delenv(key)
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    cuda = os.environ.get("CUDA_VISIBLE_DEVICES")
    assert export_slurm_env()
    ref = submitit.helpers.TorchDistributedEnvironment()
    got = tuple(os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"))
    assert (
        got
        == ("3", "4", "1", "2", "gpu07")
        == (
            str(ref.rank),
            str(ref.world_size),
            str(ref.local_rank),
            str(ref.local_world_size),
            ref.master_addr,
        )
    )
    assert os.environ["MASTER_PORT"] == str(ref.master_port) == str(master_port("140123"))
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == cuda  # moetrain picks the GPU by LOCAL_RANK
    assert master_port("140123") != master_port("160123")  # 20000 + id % 20000 gave these the same port


def test_the_slurm_test_leaves_no_rank_behind():
    """Runs after the test above: its exported RANK / WORLD_SIZE must not leak into later tests' subprocesses."""
    assert {k: os.environ.get(k) for k in DIST_KEYS} == DIST_AT_IMPORT
