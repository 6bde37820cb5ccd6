"""Reliability guarantees (docs/checkpoints.md, "What moetrain guarantees"): non-finite steps, safe loading, the run-dir
lock, config checks on resume, checksums, preemption. Each test fails on a trainer without the guarantee."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moetrain.config import ConfigError, TrainConfig, from_dict, to_dict, validate
from moetrain.train.checkpoint import (
    CheckpointError,
    complete_checkpoints,
    hash_share,
    latest_checkpoint,
    read_meta,
    resume_target,
)
from moetrain.train.guards import NonFiniteError, NonFiniteGuard
from moetrain.train.rundir import RunDirError, RunDirLock, preflight
from moetrain.train.trainer import Trainer
from moetrain.train.weights import load_model_weights
from tests.conftest import cli_corpus_overrides, tiny_train_config
from tests.helpers.distributed import run_distributed

TINY_CLI = [
    "model=tiny",
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden_size=64",
    "moe.num_experts=4",
    "moe.expert_hidden_size=16",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=8",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.eval_at_start=false",
    "trainer.progress=false",
    "logger=none",
]


def cli(tmp_path: Path, *overrides: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """``python -m moetrain.train`` on the tiny local-corpus config, in ``tmp_path``."""
    args = [sys.executable, "-m", "moetrain.train", *TINY_CLI, *cli_corpus_overrides(tmp_path), *overrides]
    return subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=timeout)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip() and "WARNING" not in line]


def poison_step(trainer: Trainer, step: int) -> None:
    """Make the forward of optimizer step ``step`` (1-based) produce NaN logits."""
    forward = trainer.model.forward

    def poisoned(tokens, **kwargs):
        out = forward(tokens, **kwargs)
        if trainer.step + 1 == step and trainer.model.training:
            out = dataclasses.replace(out, logits=out.logits * float("nan"))
        return out

    trainer.model.forward = poisoned  # type: ignore[method-assign]


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


# ------------------------------------------------------------------ 2. non-finite training stops cleanly
@pytest.mark.unit
@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("optim.grad_clip", math.nan, "must be a finite number"),
        ("optim.lr", math.inf, "must be a finite number"),
        ("moe.balance.expert_coef", math.nan, "must be a finite number"),
        ("model.rope_theta", -10000.0, "must be > 0"),
        ("model.norm_eps", 0.0, "must be > 0"),
        ("optim.eps", -1e-8, "must be > 0"),
        ("trainer.nonfinite", "ignore", "must be one of stop, skip"),
        ("trainer.resume_allow_changes", ["optim.lrr"], "is not a config key or section"),
    ],
)
def test_float_and_policy_values_are_checked(key, value, rule):
    """NaN slips through every `x < 0` rule; the finite check names the key first."""
    cfg = TrainConfig()
    *parents, leaf = key.split(".")
    obj = cfg
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, leaf, value)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith(f"{key}=") and rule in str(err.value)


@pytest.mark.unit
def test_nonfinite_step_is_not_applied_then_stops_or_skips(tmp_path):
    """stop: a NaN loss raises before the update (weights and AdamW state untouched).
    skip: the step is skipped (no update, no loss-free bias change), training goes on, the budget ends it."""
    cfg = tiny_train_config(tmp_path, max_steps=4)
    cfg.moe.router.bias_update_rate = 1e-3
    tr = Trainer(cfg, tmp_path / "stop")
    tr.train_step(tr.loader.next_batch())
    before, state = weights(tr), {k: v["exp_avg"].clone() for k, v in enumerate(tr.optimizer.state.values())}
    poison_step(tr, 2)
    with pytest.raises(
        NonFiniteError, match=r"^step 2: non-finite loss nan, gradient norm nan; the update was not applied"
    ):
        tr.train_step(tr.loader.next_batch())
    assert all(torch.equal(v, before[k]) for k, v in weights(tr).items())
    assert all(torch.equal(v["exp_avg"], state[k]) for k, v in enumerate(tr.optimizer.state.values()))

    cfg.trainer.nonfinite, cfg.trainer.nonfinite_max_skips = "skip", 1
    tr = Trainer(cfg, tmp_path / "skip")
    tr.train_step(tr.loader.next_batch())
    before = weights(tr)
    poison_step(tr, 2)
    res = tr.train_step(tr.loader.next_batch())
    assert res.info.extra["train/nonfinite_skips"] == 1 and tr.step == 2
    assert all(torch.equal(v, before[k]) for k, v in weights(tr).items())  # bias buffers included
    res = tr.train_step(tr.loader.next_batch())  # step 3 trains again
    assert math.isfinite(res.loss.item()) and not torch.equal(weights(tr)["lm_head.weight"], before["lm_head.weight"])
    poison_step(tr, 4)
    with pytest.raises(NonFiniteError, match="after 1 skipped steps"):
        tr.train_step(tr.loader.next_batch())


@pytest.mark.unit
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_the_guard_stops_on_inf_as_on_nan(bad):
    """Catches a guard testing ``~isnan`` instead of ``isfinite``: an overflowed (inf) loss or gradient norm
    would pass and AdamW would write inf / NaN into every weight."""
    for quantity in ("loss", "gradient norm"):
        values = {"loss": torch.tensor(2.5), "gradient norm": torch.tensor(1.0), quantity: torch.tensor(bad)}
        with pytest.raises(NonFiniteError, match=rf"^step 7: non-finite {quantity} {bad:g}; the update was not"):
            NonFiniteGuard("stop", 0, verbose=False).check(7, values)
        skip = NonFiniteGuard("skip", 1, verbose=False)
        assert skip.check(7, values) is False and skip.skipped == 1
    assert NonFiniteGuard("stop", 0).check(7, {"loss": torch.tensor(2.5), "gradient norm": torch.tensor(1e30)})


@pytest.mark.unit
def test_nonfinite_weights_are_never_published(tmp_path):
    cfg = tiny_train_config(tmp_path, max_steps=2)
    tr = Trainer(cfg, tmp_path / "run")
    tr.train_step(tr.loader.next_batch())
    tr.checkpointer.save()
    tr.train_step(tr.loader.next_batch())
    with torch.no_grad():
        next(tr.model.parameters())[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="step 2: the weights hold NaN or inf"):
        tr.checkpointer.save()
    assert [s for s, _ in complete_checkpoints(tmp_path / "run" / "checkpoints")] == [1]


@pytest.mark.e2e
def test_diverging_run_stops_with_one_line_and_keeps_its_last_finite_checkpoint(tmp_path):
    """A diverging run (once optim.lr=1e6, now refused: the largest rate, no clipping, beta2=0 and a tiny eps)
    used to train to the end on NaN, exit 0 as "completed" and prune the finite checkpoints."""
    run_dir = tmp_path / "run"
    proc = cli(
        tmp_path,
        "optim.lr=10",
        "optim.beta2=0",
        "optim.eps=1e-30",
        "optim.grad_clip=0",
        "optim.warmup_steps=0",
        "trainer.max_steps=12",
        "checkpoint.every=1",
        "checkpoint.keep_last=1",
        f"run_dir={run_dir}",
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("moetrain: training stopped: step "), lines
    bad_step = int(lines[0].split("step ")[1].split(":")[0])
    assert "non-finite" in lines[0] and bad_step < 12
    kept = complete_checkpoints(run_dir / "checkpoints")
    assert [s for s, _ in kept] == [bad_step - 1]  # the newest finite one survived pruning
    model = Trainer(tiny_train_config(tmp_path), tmp_path / "probe").model
    load_model_weights(model, kept[0][1])
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())
    assert not (run_dir / "summary.json").exists()  # not reported as completed


# ------------------------------------------------------------------ 1. untrusted files never execute code
class _Boom:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.e2e
def test_deepspeed_checkpoint_files_never_unpickle_code(tmp_path):
    """A ZeRO optimizer-state file that would run a shell command (checksums forged too) is refused with one
    line naming it; DeepSpeed's own loader used to unpickle it with weights_only=False."""
    pytest.importorskip("deepspeed")
    from moetrain.train.cli import make_trainer

    cfg = tiny_train_config(tmp_path, max_steps=1, eval_at_start=False)
    cfg.engine.name = "deepspeed"
    cfg.engine.zero_stage = 1
    tr = make_trainer(cfg, tmp_path / "run", None)
    try:
        tr.fit()
    finally:
        tr.close()
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt is not None
    (optim_file,) = ckpt.glob("zero_pp_rank_0_*optim_states.pt")
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": _Boom(marker)}, optim_file)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"] = hash_share(ckpt)
    (ckpt / "meta.json").write_text(json.dumps(meta))

    tr = make_trainer(cfg, tmp_path / "run", None)
    try:
        with pytest.raises(CheckpointError) as err:
            tr.checkpointer.load(ckpt)
    finally:
        tr.close()
    assert not marker.exists()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(optim_file)) and "refused" in msg


# ------------------------------------------------------------------ 3. a run directory belongs to one run
_HOLDER = """
import sys, time
from pathlib import Path
from moetrain.train.rundir import RunDirLock
RunDirLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.unit
def test_run_dir_lock_refuses_a_second_run_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError) as err:
            RunDirLock(run_dir).acquire()
        assert f"in use by another run (pid {holder.pid} on " in str(err.value)
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs
        holder.wait()
    lock = RunDirLock(run_dir).acquire()  # the kernel released the dead holder's lock
    assert lock.took_over is not None and lock.took_over["pid"] == holder.pid
    with pytest.raises(RunDirError):
        RunDirLock(run_dir).acquire()  # held again, now by us
    lock.release()
    RunDirLock(run_dir).acquire().release()


@pytest.mark.e2e
def test_resume_none_on_a_used_run_dir_is_refused_before_anything_is_rewritten(tmp_path):
    run_dir = tmp_path / "run"
    first = cli(tmp_path, "trainer.max_steps=2", f"run_dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    second = cli(tmp_path, "trainer.max_steps=2", "trainer.resume=none", "optim.lr=1e-3", f"run_dir={run_dir}")
    assert second.returncode == 2
    lines = error_lines(second)
    assert len(lines) == 1 and "already holds a run" in lines[0] and "trainer.resume=none" in lines[0], lines
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # config.yaml and metrics.jsonl included


# ------------------------------------------------------------------ 4. resume checks the whole config
@pytest.mark.unit
def test_resume_refuses_config_changes_unless_allowed(tmp_path):
    cfg = tiny_train_config(tmp_path, max_steps=2)
    cfg.checkpoint.every = 1
    Trainer(cfg, tmp_path / "run").fit()
    ckpt_dir = tmp_path / "run" / "checkpoints"

    changed = from_dict(to_dict(cfg))
    changed.optim.lr = 1e-3
    changed.data.seq_len = 16
    changed.trainer.max_steps, changed.checkpoint.keep_last = 4, 5  # free: never refused
    with pytest.raises(CheckpointError) as err:
        resume_target(changed, ckpt_dir)
    msg = str(err.value)
    assert "data.seq_len: 32 -> 16; optim.lr: 0.002 -> 0.001" in msg
    assert "trainer.resume_allow_changes=[data.seq_len,optim.lr]" in msg and "\n" not in msg
    changed.trainer.resume_allow_changes = ["optim.lr", "data"]
    assert resume_target(changed, ckpt_dir) == ckpt_dir / "step_000002"
    changed.trainer.resume_allow_changes = ["optim"]
    with pytest.raises(CheckpointError, match=r"data\.seq_len"):
        resume_target(changed, ckpt_dir)


@pytest.mark.unit
def test_restart_before_the_first_checkpoint_leaves_no_duplicate_metrics(tmp_path):
    """An attempt that died before any checkpoint left records; the restarted run redoes them, once."""
    cfg = tiny_train_config(tmp_path, max_steps=3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 9.0}\n{"step": 2, "train/loss": 9.0}\n')
    Trainer(cfg, run_dir).fit()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 3]  # eval at start, three steps, the final eval
    assert 9.0 not in [json.loads(line).get("train/loss") for line in (run_dir / "metrics.jsonl").open()]


# ------------------------------------------------------------------ 5. checkpoints are verified
@pytest.mark.unit
def test_checksums_catch_same_length_corruption_and_meta_json_is_validated(tmp_path):
    cfg = tiny_train_config(tmp_path, max_steps=1)
    Trainer(cfg, tmp_path / "run").fit()
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt is not None and set(read_meta(ckpt)["files"]) >= {".metadata", "__0_0.distcp"}

    def fails(path: Path, pattern: str) -> None:
        tr = Trainer(cfg, tmp_path / "probe")
        with pytest.raises(CheckpointError) as err:
            tr.checkpointer.load(path)
        assert pattern in str(err.value) and "\n" not in str(err.value), str(err.value)

    flipped = tmp_path / "flipped"
    shutil.copytree(ckpt, flipped)
    data = flipped / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit of one weight: the length is unchanged
    data.write_bytes(bytes(raw))
    fails(flipped, f"{data}: checksum mismatch")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_model_weights(Trainer(cfg, tmp_path / "probe2").model, flipped)  # export / generate / inspect

    for field, value, pattern in [
        ("step", None, "field 'step' is missing"),
        ("loader", [1, 2], "field 'loader' must be a JSON dict, not list"),
        (
            "files",
            {"../../etc/passwd": {"bytes": 1, "sha256": "x"}},
            "files['../../etc/passwd'] is not a relative path",
        ),
    ]:
        bad = tmp_path / f"bad_{field}"
        shutil.copytree(ckpt, bad)
        meta = json.loads((bad / "meta.json").read_text())
        if value is None:
            del meta[field]
        else:
            meta[field] = value
        (bad / "meta.json").write_text(json.dumps(meta))
        fails(bad, f"{bad / 'meta.json'}: {pattern}")


# ------------------------------------------------------------------ 7. preemption saves
def _signal_at(trainer: Trainer, step: int, signum: int) -> None:
    """Deliver ``signum`` to this process while step ``step`` (1-based) is being fetched."""
    next_batch = trainer.loader.next_batch

    def fetch():
        if trainer.step + 1 == step:
            os.kill(os.getpid(), signum)
        return next_batch()

    trainer.loader.next_batch = fetch  # type: ignore[method-assign]


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


@pytest.mark.parity
def test_sigterm_saves_at_the_step_boundary_and_the_rerun_continues_exactly(tmp_path):
    cfg = tiny_train_config(tmp_path, max_steps=6)
    cfg.checkpoint.every = 100  # no scheduled save before the end: the signal's save is the only one
    Trainer(cfg, tmp_path / "straight").fit()
    tr = Trainer(cfg, tmp_path / "run")
    _signal_at(tr, 3, signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        tr.fit()
    assert exc.value.code == 128 + signal.SIGTERM
    assert [s for s, _ in complete_checkpoints(tmp_path / "run" / "checkpoints")] == [3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    Trainer(cfg, tmp_path / "run").fit()
    assert _losses(tmp_path / "run") == _losses(tmp_path / "straight")


def _signal_one_rank(rank: int, world: int, root: str, cfg_dict: dict) -> tuple[int, int]:
    from moetrain.parallel.context import init_parallel

    cfg = from_dict(cfg_dict)
    pc = init_parallel(cfg.parallel, "cpu", cfg.moe.num_experts)
    tr = Trainer(cfg, Path(root), pc)
    if rank == 0:
        _signal_at(tr, 2, signal.SIGINT)  # only rank 0 hears it
    try:
        tr.fit()
    except SystemExit as e:
        return int(e.code or 0), tr.step
    return 0, tr.step


@pytest.mark.parity
@pytest.mark.parametrize(("async_save", "every", "saved"), [(False, 100, [2]), (True, 1, [1, 2])])
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path, async_save, every, saved):
    """Also with async saves (the vote runs on its own gloo group, never on the one an async save uses)."""
    cfg = tiny_train_config(tmp_path, max_steps=6, micro_batch_size=4)
    cfg.parallel.ep = 2
    cfg.checkpoint.every, cfg.checkpoint.async_save = every, async_save
    out = run_distributed(_signal_one_rank, 2, str(tmp_path / "run"), to_dict(cfg), timeout=120)
    assert out == [(130, 2), (130, 2)]
    assert [s for s, _ in complete_checkpoints(tmp_path / "run" / "checkpoints")] == saved


# ------------------------------------------------------------------ preflight as the CLI runs it
@pytest.mark.unit
def test_preflight_checks_before_writing(tmp_path):
    cfg = tiny_train_config(tmp_path, max_steps=1)
    run_dir = tmp_path / "run"
    lock = preflight(cfg, run_dir)
    try:
        assert sorted(p.name for p in run_dir.iterdir()) == [".moetrain.lock"]
        with pytest.raises(RunDirError, match="in use by another run"):
            preflight(cfg, run_dir)
    finally:
        lock.release()
    preflight(cfg, run_dir).release()  # free again
    cfg.trainer.resume = str(tmp_path / "no_such_checkpoint")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        preflight(cfg, tmp_path / "new_run")
    assert not (tmp_path / "new_run").exists()  # refused before writing: no directory left behind


# ------------------------------------------------------------------ 6. one line for every user error
@pytest.mark.unit
@pytest.mark.parametrize(
    ("tool", "argv", "needle"),
    [
        (
            "moetrain.tools.generate",
            ["{tmp}/nope", "--prompt", "x"],
            "checkpoint error: {tmp}/nope: no such checkpoint",
        ),
        ("moetrain.tools.inspector", ["{tmp}/nope", "--text", "x"], "checkpoint error: {tmp}/nope: no such checkpoint"),
        ("moetrain.tools.export", ["{tmp}/nope", "{tmp}/out"], "{tmp}/nope: no such checkpoint"),
        ("moetrain.tools.plan", ["model.dimm=3"], "config error: Could not override 'model.dimm'"),
        ("moetrain.tools.plan", ["model.dim=250"], "config error: model.dim=250: must be divisible"),
    ],
)
def test_tools_report_a_user_error_in_one_line(tmp_path, capsys, tool, argv, needle):
    import importlib

    main = importlib.import_module(tool).main
    with pytest.raises(SystemExit) as exc:
        code = main([a.format(tmp=tmp_path) for a in argv])
        raise SystemExit(code)
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle.format(tmp=tmp_path) in lines[0], lines


@pytest.mark.unit
def test_disk_errors_are_one_line_bugs_keep_their_traceback(capsys, monkeypatch):
    import errno

    from moetrain.errors import guarded_main

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")

    with pytest.raises(SystemExit) as exc:
        guarded_main("moetrain-x", full_disk)
    assert exc.value.code == 2
    assert capsys.readouterr().err == "moetrain-x: file error: /runs/x/metrics.jsonl: no space left on the device\n"

    def read_only():
        raise OSError(errno.EROFS, "Read-only file system", "/ro/ckpt")

    with pytest.raises(SystemExit):
        guarded_main("moetrain-x", read_only)
    assert "read-only file system" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):  # a bug: the traceback, not a polite line
        guarded_main("moetrain-x", lambda: 1 / 0)
    monkeypatch.setenv("MOETRAIN_DEBUG", "1")
    with pytest.raises(OSError):
        guarded_main("moetrain-x", full_disk)


@pytest.mark.unit
def test_unknown_tokenizer_offline_missing_gpu_and_inactive_options():
    from moetrain.train.cli import check_device, inactive_options

    pytest.importorskip("transformers")
    # In a fresh process: huggingface_hub reads HF_HUB_OFFLINE once, at import (an earlier test may have).
    code = (
        "from moetrain.data.tokenizer import build_tokenizer\n"
        "try:\n    build_tokenizer('no-such-org/no-such-tokenizer')\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    out = proc.stdout.strip()
    assert out.startswith("DataError data.tokenizer='no-such-org/no-such-tokenizer': cannot load it (")
    assert "\n" not in out
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"trainer\.device='cuda': no CUDA GPU is visible"):
            check_device("cuda")
        with pytest.raises(ConfigError, match=r"parallel\.backend='nccl': needs CUDA GPUs"):
            check_device("auto", "nccl")
    cfg = TrainConfig()
    cfg.moe.max_recv_factor = 1.5
    cfg.engine.zero_stage = 2
    notes = inactive_options(cfg, world_size=1)
    assert any(n.startswith("moe.max_recv_factor=1.5 only acts under expert parallelism") for n in notes)
    assert "engine.zero_stage only acts with engine=deepspeed" in notes
    assert inactive_options(TrainConfig(), world_size=1) == []
    cfg = TrainConfig()
    cfg.parallel.fsdp = True
    assert inactive_options(cfg, world_size=2) == []
    assert inactive_options(cfg, world_size=1) == [
        "parallel.fsdp=true only acts with several ranks (one process holds the whole model)",
    ]
    cfg.parallel.fsdp, cfg.parallel.fsdp_keep_gathered = False, False
    assert inactive_options(cfg, world_size=2) == ["parallel.fsdp_keep_gathered only acts with parallel.fsdp=true"]
    cfg = TrainConfig()
    cfg.parallel.overlap_shared_experts = False  # the default run has no shared experts
    assert inactive_options(cfg, world_size=2) == [
        "parallel.overlap_shared_experts only acts with shared experts under parallel.ep > 1"
    ]


@pytest.mark.unit
def test_rows_without_text_are_counted_and_too_many_stop(tmp_path, capsys):
    from moetrain.config import DataConfig
    from moetrain.data.corpus import DataError, load_documents

    path = tmp_path / "docs.jsonl"
    cfg = DataConfig(source="files", paths=[str(path)], cache_dir=str(tmp_path / "cache"))
    rows = [{"text": f"document number {i}"} for i in range(19)] + [{"body": "no text field"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, val = load_documents(cfg)
    assert len(train) + len(val) == 19
    assert "1 of 20 rows have no text value (data.text_field)" in capsys.readouterr().out
    path.write_text("\n".join(json.dumps(r) for r in rows[:5] + rows[-1:] * 2))
    with pytest.raises(DataError, match="2 of 7 rows have no text value"):
        load_documents(cfg)


# ------------------------------------------------------------------ 6 + 8. +key, and no litter
@pytest.mark.e2e
def test_plus_unknown_key_is_refused_and_an_explicit_run_dir_leaves_nothing_elsewhere(tmp_path):
    run_dir = tmp_path / "explicit"
    bad = cli(tmp_path, "+model.dimm=3", "trainer.max_steps=1", f"run_dir={run_dir}")
    assert bad.returncode == 2
    assert error_lines(bad) == [
        "moetrain: config error: model.dimm: unknown key (did you mean model.dim? moetrain-train --help lists every key)"
    ]
    assert not run_dir.exists()
    good = cli(tmp_path, "trainer.max_steps=1", f"run_dir={run_dir}")
    assert good.returncode == 0, good.stderr[-2000:]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "outputs").exists()
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".moetrain.lock",
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "train.log",
    ]
