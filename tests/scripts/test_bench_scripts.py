"""The benchmark scripts run end to end at tiny sizes (``scripts/gpu_check.sh`` and the numbers in docs/performance.md depend on
them; one once broke silently when ``train_step`` began returning a ``StepOutput``): each prints its table, and
the two trainers it compares reach the same loss where they train the same model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_corpus_overrides

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "moe.num_experts=4",
        "moe.expert_hidden_size=16", "trainer.global_batch_size=4", "trainer.micro_batch_size=2"]  # fmt: skip


def _run(cmd: list[str], tmp_path: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_train_compares_moe_and_dense_twin(tmp_path):
    script = str(ROOT / "scripts/bench_train.py")
    out = _run([sys.executable, script, "--steps", "1", "--warmup", "1", "--block", "1", "--", *TINY,
                *cli_corpus_overrides(tmp_path)], tmp_path)  # fmt: skip
    assert "first step" in out and "tokens/s" in out, out


def test_bench_fsdp_reports_the_sharded_share_and_equal_losses(tmp_path):
    script = str(ROOT / "scripts/bench_fsdp.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
           "--steps", "1", "--warmup", "1", "--block", "1", "--", *TINY, "moe.num_shared_experts=0",
           *cli_corpus_overrides(tmp_path)]  # fmt: skip
    rows = {line.split("|")[1].strip(): line.split("|") for line in _run(cmd, tmp_path).splitlines()
            if line.startswith("| replicated") or line.startswith("| FSDP")}  # fmt: skip
    assert set(rows) == {"replicated", "FSDP"}, rows
    share = {name: float(re.findall(r"= ([\d.]+)", r[2])[0]) for name, r in rows.items()}
    assert share["FSDP"] == pytest.approx(share["replicated"] / 2, rel=0.02)  # the non-expert part over 2 ranks
    assert rows["FSDP"][-2] == rows["replicated"][-2]  # the loss after the last step (5 decimals)
