"""parallel.fsdp=true (FSDP2: the non-expert part over all ranks, the routed experts over their EDP ranks) equals
the run without FSDP: on 2 and 4 gloo ranks, EP=1 / 2, DP=2, the loss and gradient norm of every step, every
parameter, the loss-free bias and the validation loss after 10 steps, within fp32 tolerance, with gradient
accumulation, the global-batch balance pre-pass, clipping (active on every step), activation checkpointing and
regional ``torch.compile``."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from moetrain.config import ConfigError, TrainConfig, validate
from tests.conftest import tiny_train_config
from tests.helpers import spawned
from tests.helpers.step_grads import assert_gradients_close, record_step_gradients

pytestmark = pytest.mark.parity

STEPS = 10


def _cfg(tmp: Path) -> TrainConfig:
    """Accumulation: 8 sequences per step, 2 per micro-batch: 2 micro-batches per rank on 2 ranks, 1 on 4."""
    cfg = tiny_train_config(tmp, max_steps=STEPS, micro_batch_size=2, eval_at_start=False)
    cfg.checkpoint.enabled = False
    cfg.trainer.resume = "none"
    cfg.trainer.precision = "fp32"
    cfg.moe.num_shared_experts = 1  # a shared expert in the sharded blocks too
    cfg.moe.balance.scope = "global"  # the routing pre-pass runs through the sharded blocks too
    cfg.moe.router.bias_update_rate = 1e-2
    cfg.optim.grad_clip = 0.05  # small enough to clip every step: the global norm must be right
    return cfg


def _train(
    rank: int, world: int, tmp: str, ep: int, fsdp: bool, ac: bool = False, compiled: bool = False, keep: bool = True
) -> Any:
    """STEPS steps of one case: losses, grad norms, full parameters, biases, validation loss on this rank."""
    from torch.distributed.tensor import DTensor

    import moetrain.train.trainer as trainer_mod
    from moetrain.model.apply import apply_compile
    from moetrain.parallel.context import init_parallel

    cfg = _cfg(Path(tmp) / "fsdp")
    cfg.parallel.ep, cfg.parallel.fsdp = ep, fsdp
    cfg.trainer.activation_checkpointing, cfg.trainer.compile = ac, compiled
    cfg.parallel.fsdp_keep_gathered = keep
    pc = init_parallel(cfg.parallel, "cpu", num_experts=cfg.moe.num_experts)
    original = trainer_mod.apply_compile
    trainer_mod.apply_compile = functools.partial(apply_compile, backend="aot_eager")  # no C++ builds in CI
    try:
        t = trainer_mod.Trainer(copy.deepcopy(cfg), Path(tmp) / f"fsdp_{world}_{ep}_{fsdp}_{ac}_{compiled}_{keep}", pc)
    finally:
        trainer_mod.apply_compile = original
    sharded = sorted(n for n, p in t.model.named_parameters() if isinstance(p, DTensor) and p.placements[0].is_shard())
    replicated = sorted(
        n for n, p in t.model.named_parameters() if isinstance(p, DTensor) and p.placements[0].is_replicate()
    )
    grads = record_step_gradients(t.model, t.optimizer)
    steps = [t.train_step(t.loader.next_batch()) for _ in range(STEPS)]
    params = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in t.model.named_parameters()
    }
    bias = {n: b.clone() for n, b in t.model.named_buffers() if n.endswith("expert_bias")}
    val = t.evaluate()["val/loss"]  # evaluation through the sharded blocks too
    out = {"loss": [s.loss.item() for s in steps], "norm": [s.info.grad_norm.item() for s in steps]}
    t.close()
    return {**out, "params": params, "bias": bias, "sharded": sharded, "replicated": replicated, "val": val,
            "grads": grads}  # fmt: skip


CASES: dict[int, dict[str, dict[str, Any]]] = {
    2: {
        "ep1": {"ep": 1},
        "ep2": {"ep": 2},
        "ep2_ac_compile": {"ep": 2, "ac": True, "compiled": True},
        "ep1_reshard_every_micro_batch": {"ep": 1, "keep": False},
    },
    4: {
        "ep2xdp2": {"ep": 2},
        "ep1_ac": {"ep": 1, "ac": True},
    },
}
for _world, _cases in CASES.items():
    for _name, _kw in _cases.items():
        for _fsdp in (False, True):
            spawned.register(_world, f"fsdp/{_name}/{int(_fsdp)}", functools.partial(_train, fsdp=_fsdp, **_kw))


def _assert_equal_runs(off: dict[str, Any], on: dict[str, Any], rank: int) -> None:
    """Losses, every step's gradients (first: AdamW would hide a wrong reduction factor from the parameters),
    grad norms, validation loss, parameters, loss-free biases."""
    assert on["loss"] == pytest.approx(off["loss"], rel=1e-5), rank
    assert_gradients_close(on["grads"], off["grads"], f"rank {rank}")  # catches a wrong reduction factor
    assert on["norm"] == pytest.approx(off["norm"], rel=1e-4), rank
    assert on["val"] == pytest.approx(off["val"], rel=1e-5), rank
    assert min(off["norm"]) > 0.05  # clipping was active on every step
    assert on["params"].keys() == off["params"].keys()
    for name, p in off["params"].items():
        torch.testing.assert_close(on["params"][name], p, rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {name}")
    for name, b in off["bias"].items():
        torch.testing.assert_close(on["bias"][name], b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("world", "case"), [(w, c) for w, cases in CASES.items() for c in cases])
def test_fsdp_steps_equal_the_replicated_run(world, case):
    offs, ons = spawned.result(world, f"fsdp/{case}/0"), spawned.result(world, f"fsdp/{case}/1")
    for rank, (off, on) in enumerate(zip(offs, ons)):
        assert off["sharded"] == [] and off["replicated"] == sorted(off["params"])  # replicate units: every one
        experts = {n for n in on["params"] if ".experts." in n}
        dense = set(on["params"]) - experts
        assert dense <= set(on["sharded"])  # every non-expert parameter is a sharded DTensor
        # the experts are sharded over their EDP ranks (with ep == W a unit of one rank that only divides by W)
        assert experts <= set(on["sharded"]), sorted(experts - set(on["sharded"]))
        _assert_equal_runs(off, on, rank)


def test_fsdp_config_rules(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.parallel.fsdp = True
    validate(cfg, world_size=2)
    bad = copy.deepcopy(cfg)
    bad.engine.name = "deepspeed"
    with pytest.raises(ConfigError, match=r"parallel\.fsdp=True: needs engine=native"):
        validate(bad, world_size=2)


def _bf16_policy(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """The GPU policy (bf16 gather and compute, fp32 reduction, fp32 router unit) forced on CPU: the dtypes each
    unit computes in, the gradients' dtypes, the loss and the gradients against the unsharded model under bf16
    autocast (its gradients averaged over the ranks), and how many elements of this rank's gradient shards
    bf16 cannot hold (none if FSDP reduced them in bf16)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from moetrain.model.transformer import build_model
    from moetrain.parallel.context import init_parallel
    from moetrain.parallel.data_parallel import apply_data_parallel

    cfg = _cfg(Path(tmp) / "bf16")
    pc = init_parallel(cfg.parallel, "cpu", num_experts=cfg.moe.num_experts)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(rank))
    losses, seen = [], {}
    for fsdp in (False, True):
        model = build_model(cfg.model, cfg.moe, 256, 16, seed=0)
        if fsdp:
            apply_data_parallel(model, pc, shard=True, param_dtype=torch.bfloat16)
            for name in ("blocks.1.ffn.router", "blocks.1.ffn.experts", "blocks.1.attn"):

                def record(m: torch.nn.Module, _: Any, name: str = name) -> None:
                    seen.setdefault(name, next(m.parameters()).dtype)  # the parameters the forward computes with

                model.get_submodule(name).register_forward_pre_hook(record)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens)
        loss = out.logits.float().logsumexp(-1).mean() + out.aux_loss
        loss.backward()
        losses.append(loss.item())
        if not fsdp:  # what the ranks' average gradient is, up to bf16 rounding
            ref = {n: p.grad.clone() for n, p in model.named_parameters()}
            for g in ref.values():
                dist.all_reduce(g)
                g.div_(world)
    named = [(n, p.grad) for n, p in model.named_parameters() if isinstance(p.grad, DTensor)]
    grads = {n: g.full_tensor() for n, g in named}
    # the mean of two ranks' bf16 gradients needs more than bf16's 8 bits in most elements
    local = [g.to_local() for n, g in named if ".router." not in n]
    unheld = sum(int((g != g.bfloat16().float()).sum()) for g in local)
    error = {n: ((g - ref[n]).norm() / ref[n].norm()).item() for n, g in grads.items()}
    dtypes = {g.dtype for _, g in named}
    numel = sum(g.numel() for g in local)
    return {"losses": losses, "seen": seen, "grad_dtypes": dtypes, "error": error, "unheld": unheld, "numel": numel}


spawned.register(2, "fsdp/bf16_policy", _bf16_policy)


def test_fsdp_bf16_policy_gathers_bf16_keeps_the_router_fp32_and_reduces_in_fp32():
    """Catches gradients reduced in bf16 under the bf16 policy (``reduce_dtype`` left to ``param_dtype``): the
    shards would be fp32 either way (FSDP casts back), but every element would be a bf16 value; reduced in fp32
    the two ranks' mean holds bits bf16 cannot. And the gradients are the unsharded model's mean, to bf16."""
    for res in spawned.result(2, "fsdp/bf16_policy"):
        assert res["seen"] == {
            "blocks.1.ffn.router": torch.float32,  # its own unit with the fp32 policy: fp32 logits
            "blocks.1.ffn.experts": torch.bfloat16,
            "blocks.1.attn": torch.bfloat16,
        }
        assert res["grad_dtypes"] == {torch.float32}  # into the fp32 shards AdamW steps
        assert res["unheld"] > res["numel"] // 4, res["unheld"]  # reduced in fp32, not in bf16
        off, on = res["losses"]
        assert on == pytest.approx(off, rel=2e-2)  # bf16 weights vs bf16 autocast of fp32 weights
        assert max(res["error"].values()) < 5e-2, res["error"]


def fsdp_collectives() -> tuple[str, str]:
    """The ``torch.distributed`` functions FSDP2 all-gathers and reduce-scatters with: the ``*_single`` ones on newer
    torch (2.13), ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` on older (2.11); FSDP calls one pair."""
    import torch.distributed as dist

    if hasattr(dist, "all_gather_single"):
        return "all_gather_single", "reduce_scatter_single"
    return "all_gather_into_tensor", "reduce_scatter_tensor"


class _count_calls:
    """Count the calls of ``module``'s functions ``names`` until :meth:`restore`."""

    def __init__(self, module: Any, names: tuple[str, ...]) -> None:
        self.module, self.counts = module, dict.fromkeys(names, 0)
        self.originals = {name: getattr(module, name) for name in names}
        for name in names:
            setattr(module, name, self._counted(name))

    def _counted(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.counts[name] += 1
            return self.originals[name](*args, **kwargs)

        return call

    def restore(self) -> None:
        for name, fn in self.originals.items():
            setattr(self.module, name, fn)


def _collectives_per_step(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """All-gathers and reduce-scatters of one FSDP step (EP=1: experts over EDP too) with 1 and 2 micro-batches
    per rank on the same global batch, and the number of FSDP units."""
    import torch.distributed as dist

    from moetrain.parallel.context import init_parallel
    from moetrain.parallel.data_parallel import fsdp_units
    from moetrain.train.trainer import Trainer

    out: dict[str, Any] = {}
    for micro, keep in ((4, True), (2, True), (2, False)):
        cfg = _cfg(Path(tmp) / "count")
        cfg.parallel.fsdp, cfg.trainer.micro_batch_size = True, micro
        cfg.parallel.fsdp_keep_gathered = keep
        pc = init_parallel(cfg.parallel, "cpu", num_experts=cfg.moe.num_experts)
        t = Trainer(cfg, Path(tmp) / f"count_{micro}_{keep}", pc)
        calls = _count_calls(dist, fsdp_collectives())
        try:
            t.train_step(t.loader.next_batch())
        finally:
            calls.restore()
        gathers, scatters = calls.counts.values()
        out[f"{micro}/{keep}"] = {"all_gather": gathers, "reduce_scatter": scatters, "units": len(fsdp_units(t.model))}
        t.close()
    return out


spawned.register(2, "fsdp/collectives", _collectives_per_step)


def test_fsdp_gathers_and_reduces_once_per_step_whatever_the_accumulation():
    """Between micro-batches (and from the routing pre-pass to the first) FSDP keeps the gathered weights and the
    unsharded gradients: 2 micro-batches per rank cost the same all-gathers as 1 (each unit gathered once, and
    once more in backward if it reshards after its forward) and one reduce-scatter per unit per step."""
    for res in spawned.result(2, "fsdp/collectives"):
        one, two, resharding = res["4/True"], res["2/True"], res["2/False"]
        assert two["reduce_scatter"] == one["reduce_scatter"] == one["units"], res
        assert two["all_gather"] == one["all_gather"] < 2 * one["units"], res
        # parallel.fsdp_keep_gathered=false: a reduce-scatter per unit and micro-batch, and more all-gathers
        assert resharding["reduce_scatter"] == 2 * one["units"], res
        assert resharding["all_gather"] > two["all_gather"], res
