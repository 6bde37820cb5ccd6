"""Checkpoints: exact resume, atomic publishing, resharding over EP sizes, a lost rank, bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moetrain.config import TrainConfig, from_dict, to_dict
from moetrain.train.checkpoint import (
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    resolve_checkpoint,
    truncate_metrics,
)
from moetrain.train.trainer import Trainer
from moetrain.train.weights import load_model_weights
from tests.conftest import tiny_train_config
from tests.helpers.distributed import run_distributed

PERF_KEYS = ("perf/tokens_per_sec", "perf/mfu")


def ckpt_config(tmp_path: Path, max_steps: int = 6, every: int = 3, **trainer_kw) -> TrainConfig:
    """Tiny run whose state matters: warmup + cosine LR, loss-free bias on, all layers MoE."""
    cfg = tiny_train_config(tmp_path, max_steps=max_steps, eval_every=3, **trainer_kw)
    cfg.model.first_k_dense = 0
    cfg.optim.warmup_steps = 2
    cfg.optim.lr = 3e-3
    cfg.moe.router.bias_update_rate = 1e-3
    cfg.checkpoint.every = every
    return cfg


def records(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for k in PERF_KEYS:
            rec.pop(k, None)
        out.append(rec)
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in records(run_dir) if "train/loss" in r}


# ----------------------------------------------------------------- unit tests
@pytest.mark.unit
def test_only_published_checkpoints_count(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_000010").mkdir(parents=True)
    (root / "step_000010" / "meta.json").write_text("{}")
    (root / "step_000020.tmp").mkdir()  # a save in progress
    (root / "step_000020.tmp" / "meta.json").write_text("{}")
    (root / "step_000030").mkdir()  # published name but no marker: not complete
    assert [s for s, _ in complete_checkpoints(root)] == [10]
    assert latest_checkpoint(root) == root / "step_000010"
    assert resolve_checkpoint(tmp_path) == root / "step_000010"  # a run dir resolves to its newest
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="unpublished"):
        resolve_checkpoint(root / "step_000020.tmp")


@pytest.mark.unit
def test_truncate_metrics_drops_later_steps_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 3, "a": 2}\n{"step": 4, "a": 3}\n{"step": 5, "a"')
    truncate_metrics(path, 3)
    assert path.read_text() == '{"step": 1, "a": 1}\n{"step": 3, "a": 2}\n'


# ------------------------------------------------------------- exact resume
@pytest.mark.parity
@pytest.mark.parametrize(("async_save", "strategy"), [(False, "topk"), (True, "noisy_topk")])
def test_resume_is_exact_single_process(tmp_path, async_save, strategy):
    """6 steps straight == 3 steps, a fresh process state, resume, 3 more: bitwise equal losses.

    With ``async_save`` the weights change (a 4th step) while the step-3 save is in flight;
    noisy top-K draws from the global RNG every step, so its restored state matters.
    """
    cfg = ckpt_config(tmp_path)
    cfg.checkpoint.async_save = async_save
    cfg.moe.router.strategy = strategy
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit()
    ref = losses(tmp_path / "straight")

    first = Trainer(cfg, tmp_path / "resumed")
    for _ in range(3):
        first.train_step(first.loader.next_batch())
        first.checkpointer.after_step(False)
    first.train_step(first.loader.next_batch())  # lost work: never saved
    first.checkpointer.wait()
    del first
    torch.manual_seed(1234)  # whatever the RNG state now, the checkpoint's is restored
    second = Trainer(cfg, tmp_path / "resumed")
    second.fit()
    assert second.checkpointer.resumed_from == tmp_path / "resumed" / "checkpoints" / "step_000003"
    got = losses(tmp_path / "resumed")
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == [ref[s] for s in (4, 5, 6)]
    # Loss-free biases and every weight end identical too.
    for (name, a), b in zip(second.model.state_dict().items(), straight.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert second.model.blocks[0].ffn.router.expert_bias.abs().sum() > 0


def _torchrun(cfg: TrainConfig, run_dir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A 2-rank ``torchrun --max-restarts=1`` job running ``moetrain.train.cli.run`` (gloo, CPU)."""
    cfg_file = run_dir.parent / f"{run_dir.name}.json"
    cfg_file.write_text(json.dumps(to_dict(cfg)))
    code = (
        f"import json,sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[3])!r}); "
        "from tests.helpers.fault_hooks import install; from moetrain.config import from_dict; "
        "from moetrain.train.cli import run; install(); run(from_dict(json.load(open(sys.argv[1]))), sys.argv[2])"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd = [*torchrun, "--max-restarts=1", "--monitor-interval=0.5", "--no-python"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    args = [*cmd, sys.executable, "-c", code, str(cfg_file), str(run_dir)]
    with subprocess.Popen(
        args, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as popen:
        try:
            out, err = popen.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)  # the agent and its workers: no orphans left behind
            out, err = popen.communicate()
    proc = subprocess.CompletedProcess(args, popen.returncode, out, err)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory):
    """An uninterrupted 2-rank job, one whose rank 1 dies after the step-4 checkpoint was published
    (at step 5), and one whose rank 0 dies while saving step 4 (data written, not published)."""
    tmp = tmp_path_factory.mktemp("fault")
    cfg = ckpt_config(tmp, every=2, micro_batch_size=4)
    cfg.parallel.ep = 2
    out = {"straight": _torchrun(cfg, tmp / "straight")}
    out["after_ckpt"] = _torchrun(cfg, tmp / "after_ckpt", {"MOETRAIN_FAULT_AT_STEP": "5"})
    out["during_save"] = _torchrun(
        cfg, tmp / "during_save", {"MOETRAIN_FAULT_DURING_SAVE": "4", "MOETRAIN_FAULT_RANK": "0"}
    )
    return tmp, out


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("case", "resumed_step"), [("after_ckpt", "step_000004 at step 4"), ("during_save", "step_000002 at step 2")]
)
def test_torchrun_job_survives_a_lost_rank(fault_runs, case, resumed_step):
    """The restarted job resumes from the newest *complete* checkpoint, never the interrupted save,
    and ends with the uninterrupted run's metrics (every loss, step for step)."""
    tmp, procs = fault_runs
    text = procs[case].stdout + procs[case].stderr
    assert "resumed from" in text and resumed_step in text, text[-3000:]
    assert text.count("resumed from") == 1
    assert records(tmp / case) == records(tmp / "straight")
    assert [s for s, _ in complete_checkpoints(tmp / case / "checkpoints")] == [4, 6]
    assert not list((tmp / case / "checkpoints").glob("*.tmp"))


def _dp_ep_resume(rank: int, world: int, root: str, cfg_dict: dict) -> tuple[dict, dict]:
    """On each rank: a straight run, then 3 steps + checkpoint, then a fresh Trainer that resumes."""
    from moetrain.parallel.context import init_parallel

    cfg = from_dict(cfg_dict)
    pc = init_parallel(cfg.parallel, "cpu", cfg.moe.num_experts)
    Trainer(cfg, Path(root) / "straight", pc).fit()
    first = Trainer(cfg, Path(root) / "resumed", pc)
    for _ in range(3):
        first.train_step(first.loader.next_batch())
        first.checkpointer.after_step(False)
    del first
    torch.manual_seed(100 + rank)
    second = Trainer(cfg, Path(root) / "resumed", pc)
    assert second.checkpointer.find_resume() is not None
    second.fit()
    if rank:
        return {}, {}
    return losses(Path(root) / "straight"), losses(Path(root) / "resumed")


@pytest.mark.parity
def test_resume_is_exact_two_ranks_ep2(tmp_path):
    cfg = ckpt_config(tmp_path, micro_batch_size=4)
    cfg.parallel.ep = 2
    ref, got = run_distributed(_dp_ep_resume, 2, str(tmp_path), to_dict(cfg))[0]
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == [ref[s] for s in (4, 5, 6)]


# ---------------------------------------------------------------- resharding
def _save_sharded(rank: int, world: int, root: str, cfg_dict: dict) -> None:
    from moetrain.parallel.context import init_parallel

    cfg = from_dict(cfg_dict)
    pc = init_parallel(cfg.parallel, "cpu", cfg.moe.num_experts)
    trainer = Trainer(cfg, Path(root), pc)
    for _ in range(2):
        trainer.train_step(trainer.loader.next_batch())
    trainer.checkpointer.save()


def _logits_after_load(
    rank: int, world: int, roots: list[str], cfg_dict: dict, tokens: torch.Tensor
) -> list[torch.Tensor]:
    from moetrain.parallel.context import init_parallel

    cfg = from_dict(cfg_dict)
    pc = init_parallel(cfg.parallel, "cpu", cfg.moe.num_experts)
    trainer = Trainer(cfg, Path(roots[0]), pc)
    out = []
    for root in roots:
        trainer.checkpointer.load(resolve_checkpoint(root))
        trainer.model.eval()
        with torch.no_grad():
            out.append(trainer.model(tokens).logits)
    return out


@pytest.mark.parity
def test_reshard_ep4_checkpoint_to_ep2_and_one_process(tmp_path):
    """Saved by 4 ranks with EP=4: one process and 2 ranks with EP=2 load it and give the same logits;
    and the other way round, a one-process checkpoint loads into EP=2."""
    cfg = ckpt_config(tmp_path)
    cfg.trainer.micro_batch_size = 2
    cfg.parallel.ep = 4
    root = tmp_path / "ep4"
    run_distributed(_save_sharded, 4, str(root), to_dict(cfg))
    saved = read_meta_of(root)
    assert saved["world_size"] == 4 and saved["ep"] == 4

    tokens = torch.randint(0, 256, (2, 16))
    one = Trainer(ckpt_config(tmp_path), tmp_path / "single")
    one.checkpointer.load(resolve_checkpoint(root))
    one.model.eval()
    with torch.no_grad():
        ref = one.model(tokens).logits
    assert one.step == 2
    one.progress.step = 7
    one.checkpointer.save()  # EP=1 -> EP=2 below
    with torch.no_grad():
        fresh_logits = Trainer(ckpt_config(tmp_path), tmp_path / "fresh").model.eval()(tokens).logits
    assert not torch.allclose(fresh_logits, ref)  # the comparison below is not vacuous

    cfg.parallel.ep = 2
    cfg.trainer.micro_batch_size = 4
    outs = run_distributed(_logits_after_load, 2, [str(root), str(tmp_path / "single")], to_dict(cfg), tokens)
    for per_rank in outs:
        for out in per_rank:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def read_meta_of(root: Path) -> dict:
    return json.loads((resolve_checkpoint(root) / "meta.json").read_text())


# ---------------------------------------------------------------- bad input
@pytest.mark.unit
def test_bad_checkpoints_fail_with_one_line_and_touch_nothing(tmp_path):
    cfg = ckpt_config(tmp_path, max_steps=1, every=1)
    Trainer(cfg, tmp_path / "run").fit()
    ckpt = resolve_checkpoint(tmp_path / "run")

    def fresh() -> Trainer:
        return Trainer(ckpt_config(tmp_path, max_steps=1), tmp_path / "probe")

    def assert_fails(trainer: Trainer, path: Path, pattern: str) -> None:
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        with pytest.raises(CheckpointError) as info:
            trainer.checkpointer.load(path)
        msg = str(info.value)
        assert "\n" not in msg and pattern in msg, msg
        for k, v in trainer.model.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert not trainer.optimizer.state and trainer.step == 0

    # A different number of experts: named from meta.json before any tensor is read.
    other = ckpt_config(tmp_path, max_steps=1)
    other.moe.num_experts = 8
    assert_fails(Trainer(other, tmp_path / "probe8"), ckpt, "moe.num_experts=4 in the checkpoint but 8")

    # Same architecture keys but a tensor of another shape (meta.json says nothing of it).
    bad_meta = tmp_path / "bad_meta"
    shutil.copytree(ckpt, bad_meta)
    meta = json.loads((bad_meta / "meta.json").read_text())
    meta["arch"] = {}
    (bad_meta / "meta.json").write_text(json.dumps(meta))
    wide = ckpt_config(tmp_path, max_steps=1)
    wide.moe.expert_hidden_size = 24
    assert_fails(Trainer(wide, tmp_path / "probe_wide"), bad_meta, "shape (32, 32) in the checkpoint, (32, 48)")

    # A truncated data file.
    trunc = tmp_path / "trunc"
    shutil.copytree(ckpt, trunc)
    data = trunc / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert_fails(fresh(), trunc, "__0_0.distcp: truncated")

    # An interrupted save (no marker) and a missing checkpoint.
    unmarked = tmp_path / "unmarked"
    shutil.copytree(ckpt, unmarked)
    (unmarked / "meta.json").unlink()
    assert_fails(fresh(), unmarked, "meta.json: missing")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path / "missing")

    # A hostile index (pickle that would run code) is refused, not executed.
    evil = tmp_path / "evil"
    shutil.copytree(ckpt, evil)

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    import pickle

    (evil / ".metadata").write_bytes(pickle.dumps(Boom()))
    assert_fails(fresh(), evil, ".metadata: truncated")  # the checksums in meta.json catch it first
    from moetrain.train.checkpoint import hash_share

    meta = json.loads((evil / "meta.json").read_text())
    meta["files"] = hash_share(evil)  # an attacker who rewrites meta.json too meets the restricted unpickler
    (evil / "meta.json").write_text(json.dumps(meta))
    assert_fails(fresh(), evil, "refusing to load")
    assert not (tmp_path / "pwned").exists()

    # The model-only loader (export) reports the same way.
    with pytest.raises(CheckpointError, match="truncated"):
        load_model_weights(fresh().model, trunc)


@pytest.mark.unit
def test_explicit_resume_path_and_validation(tmp_path):
    from moetrain.config import ConfigError, validate

    cfg = ckpt_config(tmp_path)
    cfg.checkpoint.keep_last = -1
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_last"):
        validate(cfg)
    cfg = ckpt_config(tmp_path)
    cfg.trainer.resume = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="nowhere: no such checkpoint"):
        Trainer(cfg, tmp_path / "r").fit()
