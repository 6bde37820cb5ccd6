"""``trainer.resume_allow_changes``: a change allowed on resume is in force from the first resumed step, for both
engines (issue 27, item 1).

On main before this test, a resume with a new ``optim.lr`` recorded it in ``config.yaml`` but trained on the
checkpoint's schedule: the native engine's ``load_schedule`` restored each param group's ``lr`` / ``initial_lr``
and the scheduler's ``base_lrs``, DeepSpeed's loader (``load_lr_scheduler_states=True``) the same, so the first
resumed step ran at the old rate and every later one at the old peak; a new ``trainer.seed`` was overridden by the
restored RNG streams. Each case below failed there (``optim.lr``, ``optim.warmup_steps``, ``optim.min_lr_ratio``,
``trainer.max_steps`` on the logged rate; ``trainer.seed`` on the RNG); the other optimizer keys and the model,
routing and balance keys held already and are kept so.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from moetrain.config import TrainConfig, from_dict, to_dict
from moetrain.train.checkpoint.entries import reseed_rank
from moetrain.train.optim import lr_multiplier
from moetrain.train.trainer import Trainer
from tests.conftest import tiny_train_config
from tests.train.checkpoint.test_checkpoint import records

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs the deepspeed extra")

RESUME_STEP = 3
OPTIM_CASES = [
    ("optim.lr", 1e-3),
    ("optim.warmup_steps", 5),
    ("optim.min_lr_ratio", 0.5),
    ("optim.weight_decay", 0.3),
    ("optim.beta1", 0.8),
    ("optim.beta2", 0.9),
    ("optim.eps", 1e-6),
    ("optim.grad_clip", 0.5),
    ("trainer.max_steps", 10),
]
"""Every optimizer key (and the schedule's length): the ones a checkpoint holds a value of."""

ROUTING_CHANGES = {
    "moe.balance.expert_coef": 0.05,
    "moe.balance.z_loss_coef": 1e-3,
    "moe.balance.seq_coef": 0.01,
    "moe.router.bias_update_rate": 5e-3,
    "moe.router.capacity_factor": 1.5,
    "moe.router.noise_std": 0.5,
    "moe.max_recv_factor": 3.0,
}
"""Model-side keys read when the model is built: a checkpoint holds tensors only, never one of these."""


def base_config(tmp_path: Path, engine: str) -> TrainConfig:
    """6 steps, a checkpoint at step 3 (warmup over 2 steps, cosine to 0.1 at step 6: every key moves the rate)."""
    cfg = tiny_train_config(tmp_path, max_steps=6)
    cfg.engine.name = engine
    cfg.model.first_k_dense = 0
    cfg.optim.warmup_steps, cfg.optim.lr = 2, 3e-3
    cfg.checkpoint.every = RESUME_STEP
    cfg.checkpoint.keep_last = 5
    return cfg


def changed(cfg: TrainConfig, run_dir: Path, changes: dict[str, Any]) -> TrainConfig:
    """``cfg`` resuming from step 3 of ``run_dir`` with ``changes``, all of them allowed."""
    new = from_dict(to_dict(cfg))
    for key, value in changes.items():
        *path, name = key.split(".")
        obj = new
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, name, value)
    new.trainer.resume = str(run_dir / "checkpoints" / f"step_{RESUME_STEP:06d}")
    new.trainer.resume_allow_changes = list(changes)
    return new


def first_run(tmp_path_factory, engine: str) -> tuple[TrainConfig, Path]:
    """A finished 6-step run of ``engine``, with a checkpoint at step 3."""
    tmp = tmp_path_factory.mktemp(engine)
    cfg = base_config(tmp, engine)
    trainer = Trainer(cfg, tmp / "run")
    try:
        trainer.fit()
    finally:
        trainer.close()
    return cfg, tmp / "run"


@pytest.fixture(scope="module")
def native_run(tmp_path_factory) -> tuple[TrainConfig, Path]:
    return first_run(tmp_path_factory, "native")


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory) -> tuple[TrainConfig, Path]:
    return first_run(tmp_path_factory, "deepspeed")


def resumed(first: tuple[TrainConfig, Path], tmp_path: Path, changes: dict[str, Any], fit: bool = True) -> Trainer:
    """A copy of the first run resumed from step 3 with ``changes`` (fitted to its end unless ``fit`` is false)."""
    cfg, run_dir = first
    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    new = changed(cfg, copy, changes)
    new.trainer.resume = str(copy / "checkpoints" / f"step_{RESUME_STEP:06d}")
    trainer = Trainer(new, copy)
    if fit:
        trainer.fit()
    else:
        trainer.checkpointer.resume()
    return trainer


def hyperparameters(trainer: Trainer) -> list[dict[str, Any]]:
    """Each param group's hyperparameters except its current rate (the schedule's, checked on its own)."""
    return [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in trainer.optimizer.param_groups]


def grad_clip_in_force(trainer: Trainer) -> float:
    """The clipping norm the engine applies: the native engine's config, or DeepSpeed's (or moetrain's own
    clipping at fp32 ZeRO-0, from the DeepSpeed config it built)."""
    module: Any = trainer.module
    if module.engine == "native":
        return float(module.cfg.optim.grad_clip)
    return float(module.clip if module.own_clip else module.ds.gradient_clipping())


def check_optim_change_in_force(first: tuple[TrainConfig, Path], tmp_path: Path, key: str, value: Any) -> None:
    trainer = resumed(first, tmp_path, {key: value})
    try:
        got, clip = hyperparameters(trainer), grad_clip_in_force(trainer)
    finally:
        trainer.close()  # before the next Trainer: a DeepSpeed one in this process owns the process group
    new = trainer.cfg
    fresh = Trainer(new, tmp_path / "fresh")  # this config's optimizer, never trained
    try:
        assert got == hyperparameters(fresh), key
    finally:
        fresh.close()
    assert clip == new.optim.grad_clip
    logged = [r for r in records(trainer.run_dir) if "train/lr" in r]
    first_resumed = next(r for r in logged if r["step"] == RESUME_STEP + 1)
    expected_lr = new.optim.lr * lr_multiplier(RESUME_STEP, new.optim, new.trainer.max_steps)
    assert first_resumed["train/lr"] == pytest.approx(expected_lr, rel=1e-12), key
    step = logged[-1]["step"] - 1  # and the last step logged: the rate the new schedule gives it
    assert logged[-1]["train/lr"] == pytest.approx(new.optim.lr * lr_multiplier(step, new.optim, new.trainer.max_steps))


@pytest.mark.unit
@pytest.mark.parametrize("key, value", OPTIM_CASES, ids=[k for k, _ in OPTIM_CASES])
def test_an_allowed_optimizer_change_is_in_force_from_the_first_resumed_step(native_run, tmp_path, key, value):
    """Native engine: the logged ``train/lr`` of step 4 (the first after the step-3 checkpoint) is the new
    schedule's, and the param groups' hyperparameters are the new config's. Catches a resume that restores the
    saved schedule (main: ``load_schedule`` restored base_lrs / initial_lr / lr from ``meta.json``)."""
    check_optim_change_in_force(native_run, tmp_path, key, value)


@needs_deepspeed
@pytest.mark.e2e
@pytest.mark.parametrize("key, value", OPTIM_CASES, ids=[k for k, _ in OPTIM_CASES])
def test_an_allowed_optimizer_change_is_in_force_with_deepspeed(deepspeed_run, tmp_path, key, value):
    """engine=deepspeed: as for the native engine. Catches DeepSpeed's loader restoring the saved LR schedule
    (``load_lr_scheduler_states=True`` on main) or the saved param groups' betas / eps / weight decay."""
    check_optim_change_in_force(deepspeed_run, tmp_path, key, value)


def surface(module: torch.nn.Module) -> dict[str, Any]:
    """Every plain (non-tensor, non-module) attribute of every submodule: what the config set when it was built."""
    out = {}
    for name, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if attr.startswith("_") or isinstance(value, (torch.Tensor, torch.nn.Module)):
                continue
            if isinstance(value, (bool, int, float, str, tuple, type(None))):
                out[f"{name}.{attr}"] = value
    return out


@pytest.mark.unit
def test_allowed_routing_and_balance_changes_are_in_force_after_resume(native_run, tmp_path):
    """Every plain attribute of the resumed model (coefficients, capacity factors, bias rate, noise) equals a fresh
    model's of the new config. Catches a checkpoint that carried a config value into the model (a coefficient
    stored with the weights would keep the saved one)."""
    trainer = resumed(native_run, tmp_path, ROUTING_CHANGES)
    fresh = Trainer(trainer.cfg, tmp_path / "fresh")
    try:
        got, want = surface(trainer.model), surface(fresh.model)
        assert got == want
        old = surface(Trainer(native_run[0], tmp_path / "old").model)
        assert got != old  # the changes reach the model's attributes, so the comparison above means something
        assert records(trainer.run_dir)[-1]["step"] == 6
    finally:
        trainer.close()
        fresh.close()


@pytest.mark.unit
def test_an_allowed_seed_change_reseeds_the_random_streams_on_resume(native_run, tmp_path):
    """A new ``trainer.seed`` draws from (new seed, step, rank) from the resumed step on. Catches a resume that
    restores the saved RNG state whatever the seed (main: the new seed changed nothing after a resume)."""
    trainer = resumed(native_run, tmp_path, {"trainer.seed": 7}, fit=False)
    try:
        got = torch.get_rng_state()
        reseed_rank(7, RESUME_STEP, 0)
        assert torch.equal(got, torch.get_rng_state())
    finally:
        trainer.close()
    same = resumed(native_run, tmp_path / "same", {}, fit=False)  # the seed unchanged: the saved streams
    try:
        got = torch.get_rng_state()
        reseed_rank(native_run[0].trainer.seed, RESUME_STEP, 0)
        assert not torch.equal(got, torch.get_rng_state())
    finally:
        same.close()
