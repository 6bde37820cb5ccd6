"""The bucketed gradient all-reduce overlapped with the backward (:mod:`moetrain.parallel.grad_buckets`).

On 2 gloo ranks, EP=1 and EP=2, gradient accumulation 2 and activation checkpointing (and once under
per-block ``torch.compile``): the gradients equal the flat :func:`~moetrain.parallel.grad_sync.sync_gradients`
bitwise (on 2 ranks every sum is a + b), and so do the weights after full trainer steps. The first bucket's
all-reduce is launched while the backward still has layers to go, and nothing is launched in the earlier
micro-batches. A parameter with a gradient on one rank only, or on none, neither hangs nor changes the
flat sync's result. On 4 ranks (EP=2 x DP=2, experts reduced over their EDP pair) within fp32 tolerance.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from moetrain.config import ConfigError, validate
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.grad_buckets import FIRST_BUCKET_BYTES, MIB, apply_grad_buckets, assign_buckets
from tests.conftest import tiny_train_config
from tests.helpers import spawned
from tests.helpers.step_grads import assert_gradients_close, record_step_gradients

BUCKET_MB = 0.01  # ~10 KiB: the tiny model spreads over several buckets


def _cfg(tmp: Path, ep: int, micro: int = 2) -> Any:
    """Global batch 8: on 2 ranks 2 micro-batches of 2 each (on 4 ranks, micro=1: 2 of 1)."""
    cfg = tiny_train_config(tmp, max_steps=2, micro_batch_size=micro, eval_at_start=False)
    cfg.checkpoint.enabled = False
    cfg.trainer.resume = "none"
    cfg.trainer.precision = "fp32"
    cfg.trainer.activation_checkpointing = True
    cfg.parallel.ep = ep
    cfg.parallel.bucket_mb = BUCKET_MB
    return cfg


def _trainer(tmp: str, name: str, ep: int, compiled: bool = False, micro: int = 2) -> Any:
    from moetrain.model.apply import apply_compile
    from moetrain.parallel.context import init_parallel
    from moetrain.train.trainer import Trainer

    cfg = _cfg(Path(tmp) / "gb", ep, micro)
    pc = init_parallel(cfg.parallel, "cpu", num_experts=cfg.moe.num_experts)
    t = Trainer(cfg, Path(tmp) / name, pc)
    if compiled:
        apply_compile(t.model, backend="aot_eager")  # the regions trainer.compile compiles, without inductor
    return t


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _bucketed_and_flat(t: Any) -> dict[str, Any]:
    """One step's gradients through the buckets the trainer's backward launched, then from the same local
    gradients through the flat sync."""
    from moetrain.parallel.grad_buckets import grad_reducer
    from moetrain.parallel.grad_sync import sync_gradients

    reducer = grad_reducer(t.model)
    t.forward_backward(t.loader.next_batch())
    in_flight = reducer.in_flight
    local = _grads(t.model)
    sync_gradients(t.model, t.pc)  # finishes the buckets in flight
    bucketed = _grads(t.model)
    for n, p in t.model.named_parameters():
        p.grad = None if local[n] is None else local[n].clone()
    sync_gradients(t.model, t.pc)  # nothing in flight now: the flat all-reduce
    groups = {id(b.group) for b in reducer.buckets}
    return {"in_flight": in_flight, "buckets": len(reducer.buckets), "groups": len(groups), "local": local,
            "bucketed": bucketed, "flat": _grads(t.model)}  # fmt: skip


def _bitwise_check(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Bucketed vs flat gradients for EP=1, EP=2 and EP=2 compiled; and 2 trainer steps each way."""
    from moetrain.parallel.grad_buckets import remove_grad_buckets

    out: dict[str, Any] = {}
    for ep, compiled in ((1, False), (2, False), (2, True)):
        out[f"ep{ep}{'/compiled' if compiled else ''}"] = _bucketed_and_flat(
            _trainer(tmp, f"bw{ep}{compiled}", ep, compiled)
        )
    for ep in (1, 2):
        runs = {}
        for mode in ("bucketed", "flat"):
            t = _trainer(tmp, f"steps{ep}{mode}", ep)
            if mode == "flat":
                remove_grad_buckets(t.model)
            grads = record_step_gradients(t.model, t.optimizer)
            steps = [t.train_step(t.loader.next_batch()) for _ in range(2)]
            runs[mode] = {"norm": [s.info.grad_norm.item() for s in steps], "loss": [s.loss.item() for s in steps],
                          "params": {n: p.detach().clone() for n, p in t.model.named_parameters()},
                          "grads": grads}  # fmt: skip
        out[f"steps/ep{ep}"] = runs
    return out


spawned.register(2, "grad_buckets/bitwise", _bitwise_check)


def _assert_equal(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    assert got.keys() == want.keys()
    for n, w in want.items():
        g = got[n]
        assert (g is None) == (w is None), f"{what}: {n}"
        if w is not None:
            torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"{what}: {n}")


@pytest.mark.parity
@pytest.mark.parametrize("case", ["ep1", "ep2", "ep2/compiled"])
def test_bucketed_gradients_equal_the_flat_sync_bitwise(case):
    for rank, res in enumerate(spawned.result(2, "grad_buckets/bitwise")):
        r = res[case]
        assert r["in_flight"] and r["buckets"] > 2, (rank, r["buckets"])
        assert r["groups"] == 1  # EP=1: experts replicated; EP=2 on 2 ranks: no EDP group, experts only / W
        _assert_equal(r["bucketed"], r["flat"], f"rank {rank} {case}")
        changed = [n for n, g in r["local"].items() if g is not None and not torch.equal(g, r["flat"][n])]
        assert changed, "the reduction changed nothing: the comparison would be vacuous"


@pytest.mark.parity
@pytest.mark.parametrize("ep", [1, 2])
def test_trainer_steps_with_buckets_equal_the_flat_sync_bitwise(ep):
    for rank, res in enumerate(spawned.result(2, "grad_buckets/bitwise")):
        b, f = res[f"steps/ep{ep}"]["bucketed"], res[f"steps/ep{ep}"]["flat"]
        assert b["loss"] == f["loss"] and b["norm"] == f["norm"], rank
        _assert_equal(b["params"], f["params"], f"rank {rank} ep{ep} after 2 steps")
        assert_gradients_close(b["grads"], f["grads"], f"rank {rank} ep{ep}", exact=True)  # AdamW hides a scale


def _overlap_check(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """The order of events in one trainer step (EP=1, 2 micro-batches, activation checkpointing): each
    micro-batch's backward start and end, each parameter's gradient accumulation, each all-reduce."""
    import torch.distributed as dist

    from moetrain.parallel.grad_buckets import grad_reducer

    t = _trainer(tmp, "overlap", 1)
    events: list[tuple[str, Any]] = []
    for name, p in t.model.named_parameters():  # after the reducer's hooks: a launch precedes its trigger's event
        p.register_post_accumulate_grad_hook(lambda _p, name=name: events.append(("grad", name)))
    backward = t.module._backward

    def recorded_backward(loss: torch.Tensor, num_micro: int) -> None:
        events.append(("backward", None))
        backward(loss, num_micro)
        events.append(("backward_end", None))

    all_reduce = dist.all_reduce

    def recorded_all_reduce(tensor: torch.Tensor, *args: Any, async_op: bool = False, **kw: Any) -> Any:
        events.append(("all_reduce", async_op))
        return all_reduce(tensor, *args, async_op=async_op, **kw)

    t.module._backward = recorded_backward
    dist.all_reduce = recorded_all_reduce
    try:
        t.forward_backward(t.loader.next_batch())
    finally:
        dist.all_reduce = all_reduce
    reducer = grad_reducer(t.model)
    first_layer = [n for n, p in t.model.named_parameters() if n.startswith(("embed.", "blocks.0."))]
    reducer.finish()
    return {"events": events, "buckets": len(reducer.buckets), "first_layer": first_layer}


spawned.register(2, "grad_buckets/overlap", _overlap_check)


@pytest.mark.parity
def test_first_bucket_is_launched_before_the_backward_reaches_the_first_layers():
    for rank, res in enumerate(spawned.result(2, "grad_buckets/overlap")):
        ev = res["events"]
        starts = [i for i, (kind, _) in enumerate(ev) if kind == "backward"]
        ends = [i for i, (kind, _) in enumerate(ev) if kind == "backward_end"]
        assert len(starts) == len(ends) == 2, ev  # accumulation 2
        # the first micro-batch's backward (and the forward before it) launch no collective
        assert not [e for e in ev[: ends[0]] if e[0] == "all_reduce"], rank
        last = ev[starts[1] : ends[1]]
        launches = [i for i, e in enumerate(last) if e == ("all_reduce", True)]
        grads = [i for i, e in enumerate(last) if e[0] == "grad"]
        first_layer = [i for i, e in enumerate(last) if e[0] == "grad" and e[1] in res["first_layer"]]
        assert len(launches) == res["buckets"] > 2, (rank, last)
        assert launches[0] < min(first_layer) and launches[0] < grads[-1], (rank, last)
        names = [last[i][1] for i in grads]
        assert len(names) == len(set(names)) > len(first_layer)  # every gradient once


def _toy_check(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Linear layers a -> b -> c and an unused d; rank 1 skips b. Each bucket size: the reducer's gradients,
    the hand-computed expectation; and the would-be host syncs of a step where every parameter has a
    gradient."""
    import torch.distributed as dist

    from moetrain.config import ParallelConfig
    from moetrain.parallel.context import init_parallel
    from tests.helpers.host_syncs import HostSyncs

    pc = init_parallel(ParallelConfig(ep=1), "cpu")
    out: dict[str, Any] = {}
    for mb in (1e-6, 25.0):  # one bucket per parameter; everything in one bucket
        torch.manual_seed(0)
        toy = nn.ModuleDict({k: nn.Linear(4, 4) for k in "abcd"})
        reducer = apply_grad_buckets(toy, pc, mb)
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(rank))
        with reducer.overlap():
            h = toy["a"](x)
            h = toy["b"](h) if rank == 0 else h
            toy["c"](h).square().sum().backward()
        local = _grads(toy)
        reducer.finish()
        want = {}
        for n, g in local.items():  # the flat sync's sum / W, zeros where a rank has no gradient
            t = torch.zeros_like(dict(toy.named_parameters())[n]) if g is None else g.clone()
            dist.all_reduce(t)
            want[n] = t / world if n.startswith(("a.", "b.", "c.")) else None
        out[f"{mb}"] = {"got": _grads(toy), "want": want, "buckets": len(reducer.buckets)}
    toy = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    reducer = apply_grad_buckets(toy, pc, 1e-6)
    with reducer.overlap():
        loss = toy(torch.randn(3, 4)).sum()
        with HostSyncs() as syncs:
            loss.backward()
    with HostSyncs() as finish_syncs:
        reducer.finish()
    out["host_syncs"] = syncs.ops + finish_syncs.ops
    return out


spawned.register(2, "grad_buckets/toy", _toy_check)


@pytest.mark.parity
@pytest.mark.parametrize("bucket_mb", ["1e-06", "25.0"])
def test_a_parameter_without_gradient_on_some_ranks_neither_hangs_nor_changes_the_sums(bucket_mb):
    results = spawned.result(2, "grad_buckets/toy")
    for rank, res in enumerate(results):
        r = res[bucket_mb]
        assert r["buckets"] == (8 if bucket_mb == "1e-06" else 1)
        _assert_equal(r["got"], r["want"], f"rank {rank}")
        assert r["got"]["d.weight"] is None and r["got"]["b.weight"] is not None  # unused everywhere; on rank 1
    torch.testing.assert_close(results[0][bucket_mb]["got"]["b.weight"], results[1][bucket_mb]["got"]["b.weight"])


@pytest.mark.parity
def test_the_overlapped_backward_and_its_wait_never_sync_the_host():
    for res in spawned.result(2, "grad_buckets/toy"):
        assert res["host_syncs"] == []


def _four_rank_check(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """EP=2 x DP=2: experts all-reduced over their EDP pair, the rest over 4 ranks."""
    from moetrain.parallel.expert_parallel import expert_parameters

    t = _trainer(tmp, "four", 2, micro=1)
    experts = {id(p) for p in expert_parameters(t.model)}
    out = _bucketed_and_flat(t)
    out["experts"] = [n for n, p in t.model.named_parameters() if id(p) in experts]
    return out


spawned.register(4, "grad_buckets/ep2_dp2", _four_rank_check)


@pytest.mark.parity
def test_four_ranks_ep2_dp2_equal_the_flat_sync():
    for rank, r in enumerate(spawned.result(4, "grad_buckets/ep2_dp2")):
        assert r["in_flight"] and r["groups"] == 2 and r["experts"], rank  # all ranks; the EDP pair
        for n, want in r["flat"].items():
            got = r["bucketed"][n]
            assert (got is None) == (want is None), n
            if want is None:
                continue
            if n in r["experts"]:  # an EDP pair: a + b, bitwise
                torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"rank {rank}: {n}")
            else:  # 4 ranks: the ring's summation order depends on the buffer's chunking (fp32 rounding: an
                # element near 0 of a tensor of scale s differs by ~1e-7 s, so atol scales with the tensor)
                atol = 1e-6 * float(want.abs().max())
                torch.testing.assert_close(got, want, rtol=1e-6, atol=atol, msg=f"rank {rank}: {n}")


# ------------------------------------------------------------------------------------------------ one process
class _Group:
    """A stand-in process group."""


def _p(numel: int, dtype: torch.dtype = torch.float32) -> nn.Parameter:
    return nn.Parameter(torch.zeros(numel, dtype=dtype))


@pytest.mark.unit
def test_buckets_follow_backward_order_and_never_mix_groups_or_dtypes():
    world, edp = _Group(), _Group()
    ps = [_p(100), _p(100), _p(100, torch.bfloat16), _p(100), _p(100), _p(100)]
    plan = [(ps[0], world), (ps[1], edp), (ps[2], world), (ps[3], world), (ps[4], edp), (ps[5], world)]
    buckets = assign_buckets(plan, cap_bytes=800)  # two fp32 parameters per bucket
    index = {id(p): i for i, p in enumerate(ps)}
    order = [[index[id(p)] for p in b.params] for b in buckets]
    assert order == [[5, 3], [4, 1], [2], [0]]  # reverse order; sorted by first parameter
    for b in buckets:
        assert len({p.dtype for p in b.params}) == 1
        assert all(g is b.group for p, g in plan if any(p is q for q in b.params))
    # Catches buckets left in closing order: the bf16 bucket opens first (its parameter's gradient comes first
    # in the backward) but closes last; launched after the fp32 one, it would wait for the whole backward.
    late = [(ps[0], world), (ps[1], world), (ps[2], world)]  # fp32, fp32, bf16: reversed, the bf16 one first
    buckets = assign_buckets(late, cap_bytes=800)
    assert [[index[id(p)] for p in b.params] for b in buckets] == [[2], [1, 0]]


@pytest.mark.unit
def test_first_bucket_of_each_kind_is_capped_at_ddps_1_mib():
    g = _Group()
    quarter = MIB // 4 // 4  # fp32 elements in a quarter MiB
    plan = [(_p(quarter), g) for _ in range(12)]
    sizes = [b.nbytes for b in assign_buckets(plan, cap_bytes=2 * MIB)]
    assert sizes == [FIRST_BUCKET_BYTES, 2 * MIB]
    assert [b.nbytes for b in assign_buckets(plan, cap_bytes=MIB // 2)] == [MIB // 2] * 6  # cap < 1 MiB


@pytest.mark.unit
def test_no_reducer_on_one_process():
    assert apply_grad_buckets(nn.Linear(2, 2), ParallelContext(), 25.0) is None


@pytest.mark.unit
@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_bucket_mb_must_be_a_positive_size(tmp_path, value):
    cfg = _cfg(tmp_path, 1)
    cfg.parallel.bucket_mb = value
    with pytest.raises(ConfigError, match=r"^parallel\.bucket_mb=\S+: must be a finite"):
        validate(cfg)
