"""parallel.fsdp=true (FSDP2 over the non-expert part, experts EP-sharded): on 2 gloo ranks, EP=1 and EP=2,
the loss of every step, the gradient norm, every parameter, the loss-free bias and the validation loss after a
few steps equal the run without FSDP within fp32 tolerance (gradient accumulation, the global-batch balance
pre-pass and clipping on)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from moetrain.config import ConfigError, TrainConfig, validate
from tests import spawned
from tests.conftest import tiny_train_config

pytestmark = pytest.mark.parity

STEPS = 3


def _cfg(tmp: Path) -> TrainConfig:
    cfg = tiny_train_config(tmp, max_steps=STEPS, micro_batch_size=2, eval_at_start=False)
    cfg.checkpoint.enabled = False
    cfg.trainer.resume = "none"
    cfg.trainer.precision = "fp32"
    cfg.moe.balance.scope = "global"  # the routing pre-pass runs through the sharded blocks too
    cfg.moe.router.bias_update_rate = 1e-2
    cfg.optim.grad_clip = 0.05  # small enough to clip every step: the global norm must be right
    return cfg


def _run(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Each (ep, fsdp) case for STEPS steps: losses, grad norms, full parameters, biases on this rank."""
    from torch.distributed.tensor import DTensor

    from moetrain.parallel.context import init_parallel
    from moetrain.train.trainer import Trainer

    out: dict[str, Any] = {}
    for ep in (1, 2):
        for fsdp in (False, True):
            cfg = _cfg(Path(tmp) / "fsdp")
            cfg.parallel.ep, cfg.parallel.fsdp = ep, fsdp
            pc = init_parallel(cfg.parallel, "cpu", num_experts=cfg.moe.num_experts)
            t = Trainer(copy.deepcopy(cfg), Path(tmp) / f"fsdp_ep{ep}_{fsdp}", pc)
            sharded = sum(isinstance(p, DTensor) for p in t.model.parameters())
            steps = [t.train_step(t.loader.next_batch()) for _ in range(STEPS)]
            params = {
                n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                for n, p in t.model.named_parameters()
            }
            bias = {n: b.clone() for n, b in t.model.named_buffers() if n.endswith("expert_bias")}
            val = t.evaluate()["val/loss"]  # evaluation through the sharded blocks too
            losses = [s.loss.item() for s in steps]
            norms = [s.info.grad_norm.item() for s in steps]
            out[f"ep{ep}/fsdp{int(fsdp)}"] = {"loss": losses, "norm": norms, "params": params, "bias": bias,
                                              "sharded": sharded, "val": val}  # fmt: skip
            t.close()
    return out


spawned.register(2, "fsdp/on_vs_off", _run)


@pytest.mark.parametrize("ep", [1, 2])
def test_fsdp_steps_equal_the_replicated_run(ep):
    for rank, res in enumerate(spawned.result(2, "fsdp/on_vs_off")):
        off, on = res[f"ep{ep}/fsdp0"], res[f"ep{ep}/fsdp1"]
        assert off["sharded"] == 0 and on["sharded"] > 0
        assert on["loss"] == pytest.approx(off["loss"], rel=1e-5), rank
        assert on["norm"] == pytest.approx(off["norm"], rel=1e-4), rank
        assert on["val"] == pytest.approx(off["val"], rel=1e-5), rank
        assert min(off["norm"]) > 0.05  # clipping was active
        assert on["params"].keys() == off["params"].keys()
        for name, p in off["params"].items():
            torch.testing.assert_close(on["params"][name], p, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
        for name, b in off["bias"].items():
            torch.testing.assert_close(on["bias"][name], b, rtol=0, atol=0, msg=name)


def test_fsdp_config_rules(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.parallel.fsdp = True
    validate(cfg, world_size=2)
    for key, value in (("checkpoint.enabled", True), ("trainer.resume", "auto")):
        bad = copy.deepcopy(cfg)
        section, name = key.split(".")
        setattr(getattr(bad, section), name, value)
        with pytest.raises(ConfigError, match=r"parallel\.fsdp=True: does not checkpoint"):
            validate(bad, world_size=2)
    bad = copy.deepcopy(cfg)
    bad.engine.name = "deepspeed"
    with pytest.raises(ConfigError, match=r"parallel\.fsdp=True: needs engine=native"):
        validate(bad, world_size=2)
