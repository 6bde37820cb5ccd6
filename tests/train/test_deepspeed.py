"""engine=deepspeed: generated config, expert adapter, and parity with the native engine on 2 gloo ranks.

The parity runs train the same 20 steps (EP=2, loss-free bias on, clipping
active) with the native engine and with DeepSpeed at ZeRO-0/1/2 in fp32 and
compare every step's loss; one DeepSpeed run is then resumed from its own
step-10 checkpoint and must repeat steps 11-20.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from moetrain.config import ConfigError, validate
from moetrain.train.cli import strip_launcher_args, validate_run
from moetrain.train.deepspeed.config import build_ds_config, deep_merge, generated_ds_config
from tests.conftest import tiny_train_config
from tests.helpers.distributed import run_distributed
from tests.helpers.step_grads import assert_updates_close, linear_adamw_step

# Per test, not per module: the generated-config and launcher tests need no DeepSpeed. Where it is missing the
# tests that need it skip (CI installs every extra, and there such a skip fails the run: tests/conftest.py).
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs the deepspeed extra")


def _ds_cfg(tmp_path: Path, **engine: Any) -> Any:
    cfg = tiny_train_config(tmp_path, global_batch_size=16, micro_batch_size=4)
    cfg.engine.name = "deepspeed"
    for k, v in engine.items():
        setattr(cfg.engine, k, v)
    return cfg


# ------------------------------------------------------------------ config (no DeepSpeed init)
@pytest.mark.unit
def test_generated_config_follows_the_hydra_keys(tmp_path):
    cfg = _ds_cfg(tmp_path, zero_stage=2)
    cfg.trainer.precision = "fp16"
    cfg.optim.grad_clip = 0.5
    ds = generated_ds_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2  # 16 / (4 x 2 ranks)
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"] and ds["fp16"]["loss_scale"] == 0.0
    cfg.trainer.precision = "auto"
    assert generated_ds_config(cfg, 2, "cuda")["bf16"]["enabled"]
    assert not generated_ds_config(cfg, 2, "cpu")["bf16"]["enabled"]


@pytest.mark.unit
def test_user_json_overrides_generated_keys(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}, "gradient_clipping": 0.25}))
    cfg = _ds_cfg(tmp_path, config_json=str(user))
    ds = build_ds_config(cfg, world_size=1)
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["overlap_comm"] is True
    assert ds["zero_optimization"]["contiguous_gradients"] is True  # untouched generated keys stay
    assert ds["gradient_clipping"] == 0.25
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


@needs_deepspeed  # validate() refuses engine=deepspeed without the package
@pytest.mark.unit
@pytest.mark.parametrize(
    "content, needle",
    [
        (None, "no such file"),
        ("{not json", "not valid JSON (line 1"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"optimizer": {"type": "Adam"}}', "'optimizer' is not allowed"),
        ('{"scheduler": {"type": "WarmupLR"}}', "'scheduler' is not allowed"),
        ('{"train_batch_size": 64}', "train_batch_size=64 disagrees with trainer.global_batch_size = 16"),
        ('{"gradient_accumulation_steps": 1}', "gradient_accumulation_steps=1 disagrees"),
        ('{"zero_optimization": {"stage": 3}}', "zero_optimization.stage=3"),
        ('{"fp16": {"enabled": true}, "bf16": {"enabled": true}}', "both true"),
    ],
)
def test_bad_user_json_is_one_config_error_naming_file_and_key(tmp_path, content, needle):
    path = tmp_path / "user.json"
    if content is not None:
        path.write_text(content)
    cfg = _ds_cfg(tmp_path, config_json=str(path))
    with pytest.raises(ConfigError) as err:
        validate_run(cfg, world_size=1)
    message = str(err.value)
    assert needle in message and "\n" not in message
    assert "engine.config_json" in message or "deepspeed config" in message


@needs_deepspeed
@pytest.mark.unit
def test_engine_key_errors(tmp_path):
    cases = [
        ({"engine.name": "megatron"}, "engine.name='megatron'"),
        ({"engine.zero_stage": 3}, "engine.zero_stage=3"),
        ({"engine.loss_scale": -1.0}, "engine.loss_scale=-1.0"),
        ({"checkpoint.async_save": True}, "checkpoint.async_save=True"),
    ]
    for overrides, needle in cases:
        cfg = _ds_cfg(tmp_path)
        for key, value in overrides.items():
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
            validate(cfg)
    native = tiny_train_config(tmp_path, precision="fp16")
    with pytest.raises(ConfigError, match=r"trainer\.precision=.fp16.: needs engine=deepspeed"):
        validate(native)


@pytest.mark.unit
def test_deepspeed_launcher_local_rank_flag_is_stripped(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "unset")  # recorded, so the teardown removes what the flag sets
    monkeypatch.delenv("LOCAL_RANK")
    argv = ["moetrain-train", "--local_rank=3", "engine=deepspeed", "trainer.max_steps=2"]
    assert strip_launcher_args(argv) == ["moetrain-train", "engine=deepspeed", "trainer.max_steps=2"]
    import os

    assert os.environ["LOCAL_RANK"] == "3"
    assert strip_launcher_args(["x", "--local_rank", "1", "a=b"]) == ["x", "a=b"]


# ------------------------------------------------------------------ the expert adapter
@needs_deepspeed
@pytest.mark.unit
def test_adopted_experts_save_and_load_per_expert_in_deepspeed_naming():
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import is_moe_param

    from moetrain.moe.experts import GroupedExperts
    from moetrain.parallel.expert_parallel import shard_experts
    from moetrain.train.deepspeed.moe_layers import DeepSpeedGroupedExperts, split_moe_param_groups

    torch.manual_seed(0)
    experts = GroupedExperts(4, 8, 6)
    torch.nn.init.normal_(experts.w13)
    torch.nn.init.normal_(experts.w2)
    shard_experts(experts, ep_size=2, ep_rank=1)  # holds global experts 2, 3
    x = torch.randn(5, 8)
    counts = torch.tensor([3, 2])
    before = experts(x, counts)
    ds = DeepSpeedGroupedExperts.adopt(experts, ep_size=2)
    assert ds is experts and isinstance(ds, MoE) and ds.num_local_experts == 2
    assert ds.expert_group_name == "ep_size_2" and all(is_moe_param(p) for p in ds.parameters())
    assert torch.equal(ds(x, counts), before)  # same forward

    state = ds.state_dict()
    assert sorted(state) == [f"deepspeed_moe.experts.deepspeed_experts.{i}.{n}" for i in (0, 1) for n in ("w13", "w2")]
    assert torch.equal(state["deepspeed_moe.experts.deepspeed_experts.1.w2"], ds.w2[1])

    other = GroupedExperts(4, 8, 6)
    shard_experts(other, 2, 1)
    other = DeepSpeedGroupedExperts.adopt(other, 2)
    other.load_state_dict(state)
    assert torch.equal(other.w13, ds.w13) and torch.equal(other.w2, ds.w2)
    missing = dict(state)
    del missing["deepspeed_moe.experts.deepspeed_experts.0.w13"]
    with pytest.raises(RuntimeError, match=r"Missing key.*deepspeed_experts\.0\.w13"):
        other.load_state_dict(missing)

    dense = torch.nn.Parameter(torch.zeros(3))
    groups = split_moe_param_groups([{"name": "decay", "params": [dense, ds.w13, ds.w2], "weight_decay": 0.1}])
    assert [(g["name"], g.get("moe", False), len(g["params"])) for g in groups] == [
        ("decay", False, 1),
        ("ep_size_2", True, 2),
    ]
    assert groups[1]["weight_decay"] == 0.1


# ------------------------------------------------------------------ 2 ranks, EP=2: parity and resume
STEPS = 20


def _parity_config(tmp: Path) -> Any:
    cfg = tiny_train_config(tmp, max_steps=STEPS, global_batch_size=16, micro_batch_size=4, eval_at_start=False)
    cfg.parallel.ep = 2
    cfg.moe.num_experts = 4
    cfg.moe.router.bias_update_rate = 1e-2  # loss-free bias on: updated from the global load in both engines
    cfg.data.max_val_sequences = 9
    cfg.checkpoint.every = 10
    cfg.checkpoint.keep_last = 0
    return cfg


def _curve(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters as plain tensors (the native engine's are replicated DTensors: their local tensor is
    the whole)."""
    from moetrain.train.checkpoint.sharded import local_tensor

    return {n: local_tensor(p).detach().float().clone() for n, p in model.named_parameters()}


def _engines_worker(rank: int, world: int, cfg: Any, tmp: str) -> dict[str, Any]:
    from moetrain.parallel import init_parallel
    from moetrain.train.cli import make_trainer

    out: dict[str, Any] = {}
    runs = [("native", "native", 1), ("zero0", "deepspeed", 0), ("zero1", "deepspeed", 1), ("zero2", "deepspeed", 2)]
    for name, engine, stage in runs:
        c = copy.deepcopy(cfg)
        c.engine.name, c.engine.zero_stage = engine, stage
        validate(c, world_size=world)
        pc = init_parallel(c.parallel, "cpu", num_experts=c.moe.num_experts)
        trainer = make_trainer(c, Path(tmp) / name, pc)
        try:
            trainer.fit()
            out[f"{name}/params"] = _params(trainer.model)
        finally:
            trainer.close()
    # One linear AdamW step per engine (tests/helpers/step_grads.py): the update shows the gradient's scale.
    for name, engine, stage in runs:
        c = linear_adamw_step(cfg)
        c.engine.name, c.engine.zero_stage = engine, stage
        c.checkpoint.enabled = False
        trainer = make_trainer(c, Path(tmp) / f"{name}_linear", init_parallel(c.parallel, "cpu", num_experts=4))
        try:
            before = _params(trainer.model)
            trainer.fit()
            out[f"{name}/update"] = {n: p - before[n] for n, p in _params(trainer.model).items()}
        finally:
            trainer.close()
    # Resume the ZeRO-2 run from its own step-10 checkpoint in a new run dir: steps 11-20 again.
    c = copy.deepcopy(cfg)
    c.engine.name, c.engine.zero_stage = "deepspeed", 2
    c.trainer.resume = str(Path(tmp) / "zero2" / "checkpoints" / "step_000010")
    pc = init_parallel(c.parallel, "cpu", num_experts=c.moe.num_experts)
    trainer = make_trainer(c, Path(tmp) / "zero2_resumed", pc)
    try:
        trainer.fit()
        out["resumed/params"] = _params(trainer.model)
        out["resumed/bias"] = {n: b.clone() for n, b in trainer.model.named_buffers() if n.endswith("expert_bias")}
    finally:
        trainer.close()
    # Another ZeRO stage cannot read those ZeRO shards: one line, before anything is loaded.
    from moetrain.train.checkpoint import CheckpointError

    c.engine.zero_stage = 1
    trainer = make_trainer(c, Path(tmp) / "zero1_refused", init_parallel(c.parallel, "cpu", num_experts=4))
    try:
        trainer.checkpointer.resume()
    except CheckpointError as e:
        out["refused"] = str(e)
    finally:
        trainer.close()
    return out


_RUNS: dict[str, Any] = {}


def engine_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not _RUNS:
        tmp = tmp_path_factory.mktemp("ds_engines")
        cfg = _parity_config(tmp)
        _RUNS["ranks"] = run_distributed(_engines_worker, 2, cfg, str(tmp), timeout=900)
        _RUNS["tmp"] = tmp
    return _RUNS


def _losses(metrics: list[dict[str, Any]], key: str = "train/loss") -> list[float]:
    return [m[key] for m in metrics if key in m]


@needs_deepspeed
@pytest.mark.e2e
@pytest.mark.parametrize("stage", ["zero0", "zero1", "zero2"])
def test_deepspeed_tracks_native_engine_for_20_steps_at_ep2(stage, tmp_path_factory):
    runs = engine_runs(tmp_path_factory)
    tmp = runs["tmp"]
    native, ds = _curve(tmp / "native"), _curve(tmp / stage)
    a, b = _losses(native), _losses(ds)
    assert len(a) == len(b) == STEPS
    for s, (x, y) in enumerate(zip(a, b)):
        assert y == pytest.approx(x, rel=2e-5, abs=1e-6), f"step {s + 1}: native {x} vs {stage} {y}"
    assert b[-1] < b[0] - 0.2  # it learns
    # Clipping is active (norms above optim.grad_clip=1) and measured the same way.
    gn_a, gn_b = _losses(native, "train/grad_norm"), _losses(ds, "train/grad_norm")
    assert max(gn_a) > 1.0
    assert gn_b == pytest.approx(gn_a, rel=1e-4)
    # Everything else of the trainer is unchanged: the same metric keys, MoE statistics included.
    train_a = [m for m in native if "train/loss" in m]
    train_b = [m for m in ds if "train/loss" in m]
    assert all(set(x) == set(y) for x, y in zip(train_a, train_b))
    assert [m["moe/layer_1/load"] for m in train_b] == [m["moe/layer_1/load"] for m in train_a]
    assert _losses(ds, "val/loss") == pytest.approx(_losses(native, "val/loss"), rel=2e-5)
    for rank_out in runs["ranks"]:  # each rank's expert shard and replicated weights end equal
        for n, p in rank_out["native/params"].items():
            torch.testing.assert_close(rank_out[f"{stage}/params"][n], p, rtol=1e-4, atol=1e-5, msg=n)
    for rank, rank_out in enumerate(runs["ranks"]):  # AdamW hides a gradient's scale; a linear step does not
        assert_updates_close(rank_out[f"{stage}/update"], rank_out["native/update"], f"rank {rank} {stage}")


@needs_deepspeed
@pytest.mark.e2e
def test_deepspeed_resumes_from_its_own_checkpoint(tmp_path_factory):
    runs = engine_runs(tmp_path_factory)
    tmp = runs["tmp"]
    ckpt = tmp / "zero2" / "checkpoints" / "step_000010"
    names = {p.name for p in ckpt.iterdir()}
    # DeepSpeed's own files: per-global-expert weights, ZeRO shards per rank, the non-expert module.
    assert {f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)} <= names
    assert "mp_rank_00_model_states.pt" in names and "meta.json" in names
    assert sum(n.endswith("optim_states.pt") for n in names) == 2
    full, resumed = _curve(tmp / "zero2"), _curve(tmp / "zero2_resumed")
    tail = [m for m in full if m["step"] > 10]
    assert [m["step"] for m in resumed] == [m["step"] for m in tail]
    for x, y in zip(tail, resumed):
        for key in ("train/loss", "train/grad_norm", "val/loss", "moe/layer_1/maxvio"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-7), f"step {x['step']} {key}"
    refused = runs["ranks"][0].get("refused", "")
    assert "engine.zero_stage=2; this run has 2, 2, 1" in refused and "\n" not in refused
    for rank_out in runs["ranks"]:
        for n, p in rank_out["zero2/params"].items():
            torch.testing.assert_close(rank_out["resumed/params"][n], p, rtol=1e-6, atol=1e-7, msg=n)
        assert all(b.abs().sum() > 0 for b in rank_out["resumed/bias"].values())


# ------------------------------------------------------------------ precision: bf16, fp16 with loss scaling
def _precision_worker(rank: int, world: int, cfg: Any, tmp: str) -> dict[str, Any]:
    from deepspeed.accelerator import get_accelerator

    from moetrain.parallel import init_parallel
    from moetrain.train.cli import make_trainer

    # DeepSpeed's CPU accelerator reports no fp16 (it refuses fp16 there); torch's CPU kernels do run it,
    # which is enough to exercise the loss-scaling path here. GPUs report fp16 themselves.
    get_accelerator().is_fp16_supported = lambda: True  # type: ignore[method-assign]
    out: dict[str, Any] = {}
    for name, engine, precision in [
        ("fp32", "native", "fp32"),
        ("bf16", "deepspeed", "bf16"),
        ("fp16", "deepspeed", "fp16"),
    ]:
        c = copy.deepcopy(cfg)
        c.engine.name, c.trainer.precision = engine, precision
        c.engine.initial_scale_power = 20  # 2**20 overflows these fp16 gradients: the first steps are skipped
        trainer = make_trainer(c, Path(tmp) / name, init_parallel(c.parallel, "cpu"))
        try:
            trainer.fit()
            out[name] = next(p.dtype for n, p in trainer.model.named_parameters() if "attn" in n)
        finally:
            trainer.close()
    return out


@needs_deepspeed
@pytest.mark.e2e
def test_bf16_and_fp16_loss_scaling_track_fp32(tmp_path):
    cfg = tiny_train_config(tmp_path, max_steps=16, micro_batch_size=4, eval_at_start=False, log_every=1)
    cfg.checkpoint.enabled = False
    (dtypes,) = run_distributed(_precision_worker, 1, cfg, str(tmp_path))
    assert dtypes == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    runs = {name: _curve(tmp_path / name) for name in dtypes}
    fp32 = _losses(runs["fp32"])
    assert _losses(runs["bf16"]) == pytest.approx(fp32, rel=2e-2)  # bf16 weights, fp32 master copy in ZeRO
    fp16 = [m for m in runs["fp16"] if "train/loss" in m]
    scales = [m["train/loss_scale"] for m in fp16]
    skipped = fp16[-1]["train/skipped_steps"]
    assert 0 < skipped < len(fp16) and scales[-1] < 2.0**20 and scales == sorted(scales, reverse=True)
    # An overflow step changes nothing, so fp16 after `skipped` steps is fp32 after 16 - skipped, give or take fp16.
    assert _losses(runs["fp16"])[-1] == pytest.approx(fp32[len(fp16) - skipped - 1], rel=2e-2)


# ------------------------------------------------------------------ the entry point under both launchers
@needs_deepspeed
@pytest.mark.e2e
def test_deepspeed_launcher_then_torchrun_resume_through_the_cli(tmp_path):
    """``deepspeed`` launcher (it appends --local_rank=N) for 3 steps, then ``torchrun`` extends the same run dir
    to 5 steps with trainer.resume=auto: one metrics.jsonl, the offline W&B run, DeepSpeed checkpoints."""
    import os
    import shutil
    import subprocess
    import sys

    from tests.conftest import cli_corpus_overrides
    from tests.helpers.wandb_records import read_wandb_history

    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    args = [
        "engine=deepspeed",
        "engine.zero_stage=2",
        *cli_corpus_overrides(tmp_path),
        "model.dim=32",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.ffn_hidden_size=64",
        "moe.num_experts=4",
        "moe.expert_hidden_size=16",
        "parallel.ep=2",
        "trainer.micro_batch_size=4",
        "trainer.global_batch_size=16",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.eval_at_start=false",
        "trainer.num_threads=1",
        f"run_dir={run_dir}",
    ]
    ds_launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert ds_launcher, "the deepspeed launcher is installed with the package"
    first = subprocess.run(
        [ds_launcher, "--num_gpus", "2", "--module", "moetrain.train", *args, "trainer.max_steps=3"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step_000003" / "meta.json").is_file()
    second = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "moetrain.train", *args, "trainer.max_steps=5"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step_000003" in second.stdout
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    history = read_wandb_history(run_dir)
    assert any("moe/layer_1/load" in row for row in history) and any("train/loss" in row for row in history)
    # The native engine refuses the DeepSpeed checkpoint with one line naming it.
    third = subprocess.run(
        [sys.executable, "-m", "moetrain.train", *args[2:], "parallel.ep=1", "trainer.max_steps=6"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert third.returncode == 2
    assert "written by engine=deepspeed; resume it with engine=deepspeed" in third.stderr


@needs_deepspeed
@pytest.mark.e2e
def test_two_deepspeed_runs_in_one_process_through_the_python_api(tmp_path):
    """``run()`` twice in one interpreter (a notebook): the 1-rank group and DeepSpeed's groups of the
    first run are released, the second starts clean."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from tests.conftest import tiny_train_config
        from moetrain.train.cli import run
        import torch.distributed as dist
        for k in range(2):
            cfg = tiny_train_config(__import__("pathlib").Path({str(tmp_path)!r}), max_steps=2, eval_at_start=False)
            cfg.engine.name = "deepspeed"
            cfg.checkpoint.enabled = k == 1
            final = run(cfg, {str(tmp_path)!r} + f"/run{{k}}")
            assert not dist.is_initialized()
            print("loss", k, final["train/loss"])
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("loss")]
    assert len(losses) == 2 and losses[0] == losses[1]  # the same run twice: the same result
    assert (tmp_path / "run1" / "checkpoints" / "step_000002" / "meta.json").is_file()


@needs_deepspeed
@pytest.mark.e2e
def test_deepspeed_checkpoint_loads_unsharded_for_export_and_inference(tmp_path_factory):
    """``moetrain-export`` / ``-generate`` / ``-inspect`` read an engine=deepspeed checkpoint in one process: every
    weight equals the trained one, experts gathered from both EP ranks' per-expert files."""
    from moetrain.tools.export import export, load_checkpoint_model

    runs = engine_runs(tmp_path_factory)
    ckpt = runs["tmp"] / "zero2" / "checkpoints" / "step_000020"
    model, cfg, meta = load_checkpoint_model(ckpt)
    assert meta["engine"] == "deepspeed" and cfg.parallel.ep == 2
    full = dict(model.named_parameters())
    for rank, rank_out in enumerate(runs["ranks"]):
        for name, p in rank_out["zero2/params"].items():
            if ".experts." in name:  # rank r holds global experts [2r, 2r + 2)
                torch.testing.assert_close(full[name][2 * rank : 2 * rank + 2], p, rtol=0, atol=0, msg=name)
            else:
                torch.testing.assert_close(full[name], p, rtol=0, atol=0, msg=name)
    out_dir = tmp_path_factory.mktemp("ds_export")
    written = export(ckpt, out_dir, hf="none")
    from tests.helpers.exported import load_safetensors_model

    exported, _ = load_safetensors_model(out_dir)
    assert written["safetensors"] and all(torch.equal(p, full[n]) for n, p in exported.named_parameters())
