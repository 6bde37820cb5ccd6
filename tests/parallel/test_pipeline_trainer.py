"""Pipeline parallelism through the Trainer (moetrain.train.pipeline): PP=2 on 2 gloo ranks and PP=2 x EP=2 on 4
equal one process for 10 steps with accumulation, MoE losses and statistics on; each schedule, activation
checkpointing and FSDP per stage for a couple of steps.

The one-process reference is the Trainer itself on the same config with ``parallel.pp=1``: its micro-batches are
the pipelines' (a pipeline's slice of the global batch, split the same way), so every per-micro-batch quantity
sees the same tokens. The distributed runs share one spawn per world size (tests.helpers.spawned).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from moetrain.config import TrainConfig
from tests.conftest import tiny_train_config
from tests.helpers.spawned import register, result

pytestmark = pytest.mark.unit

STEPS = 10
COMPARED = ("train/loss", "train/aux_loss", "train/grad_norm", "train/lr", "train/tokens")


def _config(tmp: Path, steps: int = STEPS, **overrides: Any) -> TrainConfig:
    """4 blocks (the first dense), 4 experts in 2 groups; global batch 16 of micro-batches of 2 (accumulation 8
    in one process, 4 per pipeline with 2 pipelines); expert, device and communication balance losses over the
    global batch (``scope=global``) and the loss-free bias on. ``overrides``: ``"section.key"`` -> value."""
    cfg = tiny_train_config(tmp, max_steps=steps, global_batch_size=16, micro_batch_size=2, eval_at_start=False)
    cfg.model.n_layers = 4
    cfg.data.seq_len = 16
    cfg.data.max_val_sequences = 9  # 2 pipelines of 2 rows: the last batch (1 row) leaves one pipeline empty
    cfg.trainer.eval_every = steps
    cfg.checkpoint.enabled = False
    cfg.moe.router.num_groups = 2  # the same device groups in one process as under EP=2
    cfg.moe.router.bias_update_rate = 1e-2
    b = cfg.moe.balance
    b.expert_coef, b.device_coef, b.comm_coef, b.scope = 0.01, 0.05, 0.02, "global"
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _train(cfg: TrainConfig, run_dir: Path, pc: Any = None) -> dict[str, Any]:
    """Fit; this rank's parameters and loss-free biases (global names, DTensors gathered) and, on rank 0, the
    logged metrics."""
    from moetrain.train.trainer import Trainer

    trainer = Trainer(cfg, run_dir, pc)
    trainer.fit()
    params = {n: _full(p) for n, p in trainer.model.named_parameters()}
    params.update({n: b.clone() for n, b in trainer.model.named_buffers() if n.endswith("expert_bias")})
    metrics = log = None
    if trainer.pc.is_main:
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        log = (run_dir / "train.log").read_text()
    trainer.close()
    return {"params": params, "metrics": metrics, "log": log}


def _pp_run(name: str, rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Run ``RUNS[name]`` on this rank (a check of the shared spawn)."""
    from moetrain.parallel import init_parallel

    _, steps, overrides = RUNS[name]
    cfg = _config(Path(tmp) / f"{name}_data", steps, **overrides)
    pc = init_parallel(cfg.parallel, "cpu", num_experts=cfg.moe.num_experts)
    return _train(cfg, Path(tmp) / name, pc)


RUNS: dict[str, tuple[int, int, dict[str, Any]]] = {
    "pp2": (2, STEPS, {"parallel.pp": 2}),
    "pp2_ep2": (4, STEPS, {"parallel.pp": 2, "parallel.ep": 2}),
    "pp2_gpipe_ac": (
        2,
        2,
        {"parallel.pp": 2, "parallel.pp_schedule": "gpipe", "trainer.activation_checkpointing": True},
    ),
    "pp2_interleaved_1f1b": (
        2,
        2,
        {"parallel.pp": 2, "parallel.pp_schedule": "interleaved_1f1b", "parallel.pp_virtual": 2},
    ),
    "pp2_interleaved_zero_bubble": (
        2,
        2,
        {"parallel.pp": 2, "parallel.pp_schedule": "interleaved_zero_bubble", "parallel.pp_virtual": 2},
    ),
    "pp2_zbv": (2, 2, {"parallel.pp": 2, "parallel.pp_schedule": "zbv"}),
    "pp2_dp2_fsdp": (4, 2, {"parallel.pp": 2, "parallel.fsdp": True}),
}
"""Name -> (world size, steps, config overrides)."""

for _name, (_world, _, _) in RUNS.items():
    register(_world, _name, functools.partial(_pp_run, _name))


_REFERENCE: dict[int, dict[str, Any]] = {}


def _reference(steps: int, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The one-process run of ``steps`` steps (``parallel.pp=1``), once per step count."""
    if steps not in _REFERENCE:
        tmp = tmp_path_factory.mktemp(f"pp_reference_{steps}")
        cfg = _config(tmp, steps)
        cfg.trainer.num_threads = 1  # 2 threads on 2 busy cores oversubscribe
        _REFERENCE[steps] = _train(copy.deepcopy(cfg), tmp / "run")
    return _REFERENCE[steps]


def _logged(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each logged line without the timings (and the step and the scalar keys only as logged)."""
    return [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in metrics]


def _assert_metrics_equal(got: list[dict[str, Any]], want: list[dict[str, Any]], name: str) -> None:
    """Every key the one-process run logs (losses, grad norm, every MoE layer's load, MaxVio, device load and
    balance losses, the validation loss and MaxVio) is logged under PP with the same value (rtol 1e-5); the
    all-to-all counters exist only under EP."""
    got, want = _logged(got), _logged(want)
    assert [m["step"] for m in got] == [m["step"] for m in want], name
    for g, w in zip(got, want):
        missing = sorted(set(w) - set(g))
        assert not missing, f"{name} step {w['step']}: not logged {missing}"
        for key, value in w.items():
            torch.testing.assert_close(
                torch.tensor(g[key], dtype=torch.float64),
                torch.tensor(value, dtype=torch.float64),
                rtol=1e-5,
                atol=1e-7,
                msg=f"{name} step {w['step']}: {key}",
            )


def _assert_params_equal(ranks: list[dict[str, Any]], want: dict[str, torch.Tensor], ep: int, name: str) -> None:
    """Every rank's parameters and loss-free biases equal the one-process run's (routed experts: the rank's EP
    slice), and the ranks together hold every one of them."""
    for rank, out in enumerate(ranks):
        for key, value in out["params"].items():
            ref = want[key]
            if key.endswith(("experts.w13", "experts.w2")) and value.shape != ref.shape:
                n = ref.shape[0] // ep
                ref = ref[(rank % ep) * n : (rank % ep + 1) * n]
            torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-6, msg=f"{name} rank {rank}: {key}")
    assert {k for out in ranks for k in out["params"]} == set(want), name


@pytest.mark.parametrize(
    ("name", "ep", "layout"),
    [
        ("pp2", 1, "pipeline of 2 ranks x 1 stage, 1f1b, 8 micro-batches per step, 1 pipeline: bubble 11.1%"),
        ("pp2_ep2", 2, "pipeline of 2 ranks x 1 stage, 1f1b, 4 micro-batches per step, 2 pipelines: bubble 20.0%"),
    ],
)
def test_pp_trainer_equals_one_process_for_ten_steps(
    name: str, ep: int, layout: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """PP=2 (2 ranks) and PP=2 x EP=2 (4 ranks, 2 pipelines) through the Trainer, 10 steps of 4 or 8
    micro-batches per pipeline, against one process: catches a stage's balance loss missing from the backward,
    the gradient norm taken over one stage only (the norm, and the clipped update with it), a pipeline reading
    another's slice of the batch, the global-batch counts of a stage not summed over its ranks, the loss-free
    bias of a layer updated from a partial load, and any stage's MoE statistics left out of the one reduction
    (rank 0 would not log them, or log another value). The layout and its bubble, (p-1)/(m+p-1), are logged at
    start."""
    world, steps, _ = RUNS[name]
    ranks = result(world, name)
    assert layout in ranks[0]["log"]
    want = _reference(steps, tmp_path_factory)
    _assert_metrics_equal(ranks[0]["metrics"], want["metrics"], name)
    _assert_params_equal(ranks, want["params"], ep, name)
    bias = [k for k in want["params"] if k.endswith("expert_bias")]
    assert bias and any(want["params"][k].abs().sum() > 0 for k in bias)  # the loss-free bias did move


@pytest.mark.parametrize("name", [n for n, (_, steps, _) in RUNS.items() if steps != STEPS])
def test_pp_schedules_checkpointing_and_fsdp_equal_one_process(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Each schedule of docs/pipeline.md (interleaved ones with 2 stages per rank, ZBV's V placement putting the
    first and the last stage on rank 0), GPipe with activation checkpointing, and PP=2 x DP=2 with FSDP per
    stage, for 2 steps: catches a schedule whose micro-batches, losses or gradients differ from one process, a
    recomputed block routing differently, or FSDP units of a stage reducing over the wrong ranks."""
    world, steps, _ = RUNS[name]
    ranks = result(world, name)
    want = _reference(steps, tmp_path_factory)
    _assert_metrics_equal(ranks[0]["metrics"], want["metrics"], name)
    _assert_params_equal(ranks, want["params"], 1, name)


def test_pad_to_schema_changes_no_reduction() -> None:
    """Catches padding that would move a reduced value: a ``mean`` padded with a count, a ``max`` padded with
    0 (larger than a negative maximum), or a name recorded after the schema was agreed passing silently."""
    from moetrain.parallel.context import ParallelContext
    from moetrain.train.metrics import MetricRecorder, metric_schema, pad_to_schema

    full, part = MetricRecorder(), MetricRecorder()
    for rec in (full, part):
        rec.record("a", torch.tensor(2.0), "mean")
    full.record("b", torch.tensor([1.0, 3.0]), "sum")
    full.record("b", torch.tensor([1.0, 1.0]), "sum")
    full.record("m", torch.tensor(-4.0), "mean")
    full.record("x", torch.tensor(-5.0), "max")
    pad_to_schema(part, metric_schema(full), torch.device("cpu"))
    assert part.counts == {"a": 1, "b": 0, "m": 0, "x": 0}
    assert part.values["x"].item() == float("-inf") and part.values["b"].tolist() == [0.0, 0.0]
    reduced = part.reduce(ParallelContext())
    assert reduced.tensor("a").item() == 2.0 and reduced.counts["a"].item() == 1
    with pytest.raises(RuntimeError, match=r"\['late'\]"):
        part.record("late", torch.tensor(1.0), "sum")
        pad_to_schema(part, metric_schema(full), torch.device("cpu"))
