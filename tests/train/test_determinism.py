"""Deterministic mode (``trainer.deterministic=true``): what the flag must switch on, and the dispatch order.

On CPU with gloo, runs repeat bitwise with or without the flag, so a repeat test
there cannot fail when the flag does nothing (``test_ep.py``'s repeat test is
such a test). These assert the flag's effects directly: deterministic
algorithms on (an op without a deterministic implementation then raises, not warns), the
cuBLAS workspace set before any GEMM, cuDNN autotuning off; and the order in
which the dispatcher hands rows to the experts (expert, then token), which
fixes the summation order of every gradient. The bitwise repeat itself is a
CUDA test, where atomics make a run without the flag differ.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moetrain.moe.dispatch import LocalDispatcher
from moetrain.train.trainer import Trainer
from tests.conftest import tiny_train_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def restore_global_state(monkeypatch):
    """Trainer(deterministic=True) changes process-wide settings: put them back for the other tests."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # monkeypatch restores the original
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark = before[1]


@pytest.mark.unit
@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_flag_switches_algorithms_workspace_and_autotuning(tmp_path, restore_global_state, deterministic):
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    cfg = tiny_train_config(tmp_path, deterministic=deterministic)
    cfg.checkpoint.enabled = False
    Trainer(cfg, tmp_path / "run")
    assert torch.are_deterministic_algorithms_enabled() is deterministic
    if deterministic:
        # cuBLAS reads it when its first handle is created: it must be set by the trainer, before any GEMM
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")
        assert torch.backends.cudnn.benchmark is False
        assert not torch.is_deterministic_algorithms_warn_only_enabled()  # an op without one raises
    else:
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        assert torch.backends.cudnn.benchmark is True


@pytest.mark.unit
@pytest.mark.parametrize("dropless", [True, False])
def test_dispatch_orders_rows_by_expert_then_token(dropless):
    """Every expert's segment lists its tokens in token order (a stable sort): the same order every run,
    whatever the sort implementation, so the experts' weight gradients sum in a fixed order."""
    T, K, N, D = 40, 3, 5, 2
    g = torch.Generator().manual_seed(0)
    idx_TK = torch.rand(T, N, generator=g).topk(K, dim=-1).indices
    x_TD = torch.arange(T, dtype=torch.float32).unsqueeze(1).expand(T, D).contiguous()  # row t holds t
    token_A = torch.arange(T).repeat_interleave(K)
    expert_A, weight_A = idx_TK.reshape(-1), torch.rand(T * K, generator=g)
    if not dropless:  # drop a third of the assignments, as capacity does
        keep = torch.rand(T * K, generator=g) > 0.33
        token_A, expert_A, weight_A = token_A[keep], expert_A[keep], weight_A[keep]
    d = LocalDispatcher(N).dispatch(x_TD, token_A, expert_A, weight_A, slots_per_token=K if dropless else None)
    rows_tokens = d.rows_RD[:, 0].long()
    expected = []
    for e in range(N):  # the documented order, from the assignments alone
        expected += [t for t, x in zip(token_A.tolist(), expert_A.tolist()) if x == e]
    assert rows_tokens.tolist() == expected
    assert d.counts_E.tolist() == [int((expert_A == e).sum()) for e in range(N)]
    # each row's weight travels with it
    w_expected = [w for e in range(N) for w, x in zip(weight_A.tolist(), expert_A.tolist()) if x == e]
    assert d.weight_R.tolist() == pytest.approx(w_expected, abs=0)


CUDA_REPEAT = """
import sys, json, torch
from pathlib import Path
from moetrain.train.trainer import Trainer
from tests.conftest import tiny_train_config

tmp = Path(sys.argv[1])
out = []
for k in range(2):
    cfg = tiny_train_config(tmp, deterministic=True, device="cuda", precision="bf16", max_steps=3)
    cfg.moe.router.capacity_factor = 1.0  # dropping: the scatter-add combine (atomics without the flag)
    cfg.checkpoint.enabled = False
    t = Trainer(cfg, tmp / f"run{k}")
    t.fit()
    losses = [json.loads(x)["train/loss"] for x in (tmp / f"run{k}" / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in x]
    out.append((losses, {n: p.detach().cpu() for n, p in t.model.named_parameters()}))
(l0, p0), (l1, p1) = out
assert len(l0) == 3 and l0 == l1, (l0, l1)
bad = [n for n in p0 if not torch.equal(p0[n], p1[n])]
assert not bad, bad
print("bitwise-equal", l0)
"""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_deterministic_runs_repeat_bitwise_on_cuda(tmp_path):
    """Two 3-step bf16 runs with capacity dropping on one GPU: equal losses and parameters, bit for bit.
    A fresh process, so the trainer sets the cuBLAS workspace before this process's first GEMM."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("CUBLAS_WORKSPACE_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, "-c", CUDA_REPEAT, str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "bitwise-equal" in proc.stdout
