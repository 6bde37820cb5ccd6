"""Shared experts overlapped with the all-to-alls (EP=2 on gloo): bitwise the sequential results, and really overlapped.

The all-to-all dispatcher runs the shared experts' up projections while the dispatch's rows are in
flight and their down projection (and gate) while the combine's are; the backward mirrors it
(:mod:`moetrain.parallel.collectives`). ``overlap_work=False`` runs them after the combine, the
order of the code before the overlap. Checks: the layer's output and every gradient (input, router,
routed and shared experts, gate) are bitwise equal both ways, in each routing case, and so are a
whole model's loss and gradients; an event log of the launches and waits of every all-to-all and of
the shared experts' forward and backward shows what ran while what was in flight.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moetrain.config import ModelConfig, MoEConfig, ParallelConfig, RouterConfig
from moetrain.data import rank_slice
from moetrain.model import build_model
from moetrain.moe.layer import MoELayer
from moetrain.parallel import apply_expert_parallel, init_parallel
from moetrain.parallel.all_to_all import AllToAllDispatcher
from moetrain.parallel.expert_parallel import shard_experts
from tests.helpers import spawned
from tests.helpers.ep_parity import model_loss

pytestmark = pytest.mark.parity

D, N, T = 16, 8, 24
CASES: dict[str, dict[str, Any]] = {
    "topk": {},
    "capacity": {"capacity_factor": 1.0},
    "device_drop": {"topk_groups": 1, "device_capacity_factor": 1.0, "device_protect_fraction": 0.0},
    "bf16": {},
}


def _moe_cfg(router_kw: dict[str, Any], gate: bool = True) -> MoEConfig:
    return MoEConfig(
        num_experts=N, top_k=2, expert_hidden_size=8, num_shared_experts=2, shared_expert_gate=gate,
        router=RouterConfig(**router_kw),
    )  # fmt: skip


def _ep_layers(rank: int, world: int, router_kw: dict[str, Any]) -> tuple[MoELayer, MoELayer]:
    """One MoE layer (2 shared experts, gate on, EP=world) twice: overlapped, and forced sequential."""
    layer = MoELayer(D, _moe_cfg(router_kw), num_groups=world)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():  # some are allocated uninitialised (the model initialises them)
            p.normal_(0.0, 0.3, generator=g)
        layer.shared_gate.weight.normal_(generator=g)  # type: ignore[union-attr]  # a gate not ~0.5 everywhere
    pair = []
    for overlap_work in (True, False):
        m = copy.deepcopy(layer)
        shard_experts(m.experts, world, rank)
        m.dispatcher = AllToAllDispatcher(N, world, rank, dist.group.WORLD, rank, world, overlap_work=overlap_work)
        pair.append(m)
    return pair[0], pair[1]


def _forward_backward(layer: MoELayer, x_BSD: torch.Tensor, bf16: bool) -> dict[str, torch.Tensor]:
    """The output and every gradient of one forward + backward (a fixed random cotangent, plus the aux loss)."""
    x = x_BSD.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y, stats = layer(x)
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    ((y * cot).sum() + stats.aux_loss).backward()
    out = {"y": y.detach(), "x.grad": x.grad}
    out.update({f"{n}.grad": p.grad for n, p in layer.named_parameters() if p.grad is not None})
    return out


def _bitwise(rank: int, world: int, tmp: str, case: str) -> dict[str, Any]:
    """Overlapped vs sequential, one MoE layer under EP=world: output and every gradient bitwise equal."""
    fast, slow = _ep_layers(rank, world, CASES[case])
    x = torch.randn(2, T // 2, D, generator=torch.Generator().manual_seed(100 + rank))
    a, b = (_forward_backward(m, x, case == "bf16") for m in (fast, slow))
    assert sorted(a) == sorted(b) and {"x.grad", "shared.w1.weight.grad", "shared_gate.weight.grad"} <= set(a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    return {"differ": differ, "keys": sorted(a), "dtype": str(a["y"].dtype)}


def _model_bitwise(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """A whole model (2 MoE layers, gate on) under EP=world: loss and every gradient bitwise equal both ways."""
    cfg = ModelConfig(dim=D, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden_size=32, first_k_dense=0)
    moe = _moe_cfg({})
    pc = init_parallel(ParallelConfig(ep=world), "cpu", num_experts=N)
    ref = build_model(cfg, moe, 64, 12, ep=world, seed=0)
    batch = torch.randint(0, 64, (4, 13), generator=torch.Generator().manual_seed(1))
    grads, losses = [], []
    for overlap_work in (True, False):
        model = apply_expert_parallel(copy.deepcopy(ref), pc, overlap_shared=overlap_work)
        assert all(layer.dispatcher.overlap_work is overlap_work for layer in model.moe_layers().values())
        loss, _ = model_loss(model, rank_slice(batch, rank, world))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    differ = [n for n in grads[0] if not torch.equal(grads[0][n], grads[1][n])]
    return {"loss_equal": torch.equal(losses[0], losses[1]), "differ": differ, "params": len(grads[0])}


class _TracedWork:
    """A collective's Work whose ``wait()`` is logged."""

    def __init__(self, work: Any, log: Callable[[str], None], name: str) -> None:
        self._work, self._log, self._name = work, log, name

    def wait(self, *args: Any) -> Any:
        self._log(f"wait {self._name}")
        return self._work.wait(*args)


def _trace(layer: MoELayer, events: list[str]) -> Callable[[], None]:
    """Log every all-to-all's launch and wait, the shared experts' forwards and their weights' gradients;
    returns the function that undoes it. All-to-alls of [rows, D] tensors are named ``rows#i``, others ``small#i``."""
    real = dist.all_to_all_single
    count = [0]

    def traced(out: torch.Tensor, inp: torch.Tensor, *args: Any, async_op: bool = False, **kw: Any) -> Any:
        count[0] += 1
        name = f"{'rows' if inp.dim() == 2 and inp.shape[1] == D else 'small'}#{count[0]}"
        events.append(f"launch {name}")
        work = real(out, inp, *args, async_op=async_op, **kw)
        if not async_op:
            events.append(f"wait {name}")
            return work
        return _TracedWork(work, events.append, name)

    dist.all_to_all_single = traced  # type: ignore[assignment]
    hooks: list[Any] = []
    shared: dict[str, nn.Linear] = {"w1": layer.shared.w1, "w3": layer.shared.w3, "w2": layer.shared.w2}  # type: ignore[union-attr]
    shared["gate"] = layer.shared_gate  # type: ignore[assignment]
    for name, lin in shared.items():
        hooks.append(lin.register_forward_hook(lambda *_, n=name: events.append(f"fwd {n}")))
        hooks.append(lin.weight.register_hook(lambda g, n=name: events.append(f"bwd {n}")))

    def undo() -> None:
        dist.all_to_all_single = real  # type: ignore[assignment]
        for h in hooks:
            h.remove()

    return undo


def _in_flight(events: list[str], work: list[str]) -> str | None:
    """The ``rows`` exchange launched before every event of ``work`` and waited for after all of them, if any."""
    first, last = min(events.index(w) for w in work), max(events.index(w) for w in work)
    for e in events[:first]:
        if e.startswith("launch rows"):
            name = e.split()[1]
            if f"wait {name}" in events and events.index(f"wait {name}") > last:
                return name
    return None


def _order(rank: int, world: int, tmp: str, overlap_work: bool) -> dict[str, Any]:
    """The event log of one forward + backward; which rows exchange each shared-expert stage overlapped."""
    fast, slow = _ep_layers(rank, world, {})
    layer = fast if overlap_work else slow
    x = torch.randn(2, T // 2, D, generator=torch.Generator().manual_seed(100 + rank), requires_grad=True)
    events: list[str] = []
    undo = _trace(layer, events)
    try:
        y, _ = layer(x)
        events.append("backward")
        y.square().sum().backward()
    finally:
        undo()
    b = events.index("backward")
    fwd, bwd = events[:b], events[b:]
    stages = {
        "fwd up": _in_flight(fwd, ["fwd w1", "fwd w3"]),
        "fwd down": _in_flight(fwd, ["fwd w2", "fwd gate"]),
        "bwd down": _in_flight(bwd, ["bwd w2", "bwd gate"]),
        "bwd up": _in_flight(bwd, ["bwd w1", "bwd w3"]),
    }
    rows = [e.split()[1] for e in events if e.startswith("launch rows")]
    return {"stages": stages, "rows": rows, "events": events}


for _case in CASES:
    spawned.register(2, f"overlap/bitwise/{_case}", functools.partial(_bitwise, case=_case))
spawned.register(2, "overlap/model_bitwise", _model_bitwise)
spawned.register(2, "overlap/order_on", functools.partial(_order, overlap_work=True))
spawned.register(2, "overlap/order_off", functools.partial(_order, overlap_work=False))


@pytest.mark.parametrize("case", list(CASES))
def test_overlapped_shared_experts_give_bitwise_the_sequential_output_and_gradients(case):
    for rank, r in enumerate(spawned.result(2, f"overlap/bitwise/{case}")):
        assert r["differ"] == [], f"rank {rank}, {case}: not bitwise equal: {r['differ']}"
        assert len(r["keys"]) == 9  # y, x and 7 parameters: router, w13, w2, shared w1 w2 w3, gate
        assert r["dtype"] == "torch.float32"


def test_overlapped_model_gives_bitwise_the_sequential_loss_and_gradients():
    for r in spawned.result(2, "overlap/model_bitwise"):
        assert r["loss_equal"] and r["differ"] == [] and r["params"] > 10


def test_shared_experts_run_while_the_all_to_alls_are_in_flight_forward_and_backward():
    """Forward: up during the dispatch's rows (the first rows exchange), down and gate during the combine's
    (the second). Backward: down and gate during the combine's reverse exchange (the first of the
    backward), up during the dispatch's reverse exchange (the second)."""
    for r in spawned.result(2, "overlap/order_on"):
        rows = r["rows"]
        assert len(rows) == 4, r["events"]  # dispatch, combine, and their reverses
        assert r["stages"] == {"fwd up": rows[0], "fwd down": rows[1], "bwd down": rows[2], "bwd up": rows[3]}, r[
            "events"
        ]


def test_forced_sequential_runs_the_shared_experts_after_the_combine():
    """The check above can fail: with ``overlap_work=False`` no shared-expert stage runs inside a rows exchange,
    forward or backward (created last, the shared experts' nodes run first in the backward)."""
    for r in spawned.result(2, "overlap/order_off"):
        assert set(r["stages"].values()) == {None}, r["events"]
        fwd = r["events"][: r["events"].index("backward")]
        assert fwd.index("fwd w1") > max(i for i, e in enumerate(fwd) if e.startswith("wait rows"))
