"""Expert parallelism on gloo CPU ranks against one process on the same global batch.

Reference: one process runs the W ranks' slices of the global batch as W
micro-batches of the full model (loss = their mean). Per-micro-batch quantities
(capacity C = ceil(f T K / N) from the micro-batch's T tokens, micro-batch
balance losses) then see exactly the same token groups as the EP ranks do.
"""

from __future__ import annotations

import copy
import json
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from moetrain.config import BalanceConfig, ModelConfig, MoEConfig, ParallelConfig, RouterConfig
from moetrain.data import rank_slice
from moetrain.model import build_model
from moetrain.moe.dispatch import LocalDispatcher
from moetrain.parallel import apply_expert_parallel, clip_grad_norm, init_parallel
from moetrain.parallel.all_to_all import AllToAllDispatcher, RecvOverflowError
from scripts.bench_dispatch import NaiveAllToAllDispatcher
from tests.conftest import tiny_train_config
from tests.helpers.distributed import run_distributed
from tests.helpers.ep_parity import assert_grads_equal_reference, ep_backward, ep_model, model_loss

V, S, B, N = 64, 16, 8, 8
MODEL = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=48, first_k_dense=0)
BALANCE = {"expert_coef": 0.01, "z_loss_coef": 1e-3, "device_coef": 0.05, "comm_coef": 0.02}

CASES: dict[str, dict[str, Any]] = {
    "topk": {},
    "device_limited_top_m": {"topk_groups": 1},
    "sigmoid_bias": {"score_fn": "sigmoid", "bias_update_rate": 1e-3},
    "capacity": {"capacity_factor": 1.0},
}


def _moe_cfg(router_kw: dict[str, Any]) -> MoEConfig:
    balance = BalanceConfig(**{k: v for k, v in BALANCE.items() if hasattr(BalanceConfig, k)})
    return MoEConfig(num_experts=N, top_k=2, expert_hidden_size=16, router=RouterConfig(**router_kw), balance=balance)


_loss = model_loss


def _parity_case(rank: int, world: int, pc: Any, name: str, router_kw: dict[str, Any]) -> dict[str, Any]:
    """Loss, every gradient and the global grad norm of EP=ep x DP=world/ep vs one process, for one routing case."""
    ep = pc.ep_size
    if True:
        ref = build_model(MODEL, _moe_cfg(router_kw), V, S, ep=ep, seed=0)
        if router_kw.get("bias_update_rate"):
            g = torch.Generator().manual_seed(5)
            for layer in ref.moe_layers().values():
                layer.router.expert_bias.copy_(torch.randn(N, generator=g) * 0.05)
        model = ep_model(ref, pc)
        batch = torch.randint(0, V, (B, S + 1), generator=torch.Generator().manual_seed(1))

        ref_loss, dropped = torch.zeros(()), 0.0
        for r in range(world):  # one process: the ranks' slices as micro-batches
            loss, _ = _loss(ref, rank_slice(batch, r, world))
            (loss / world).backward()
            ref_loss += loss.detach() / world
        ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))

        global_loss, out = ep_backward(model, pc, rank_slice(batch, rank, world))
        norm = clip_grad_norm(model, pc, 0.0)
        dropped = sum(float(s.num_dropped) for s in out.moe_stats.values())

        torch.testing.assert_close(global_loss, ref_loss, rtol=1e-6, atol=1e-7, msg=f"{name}: loss")
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=1e-8, msg=f"{name}: grad norm")
        worst = assert_grads_equal_reference(model, ref, pc, name)
        return {"loss": global_loss.item(), "max_grad_diff": worst, "dropped": dropped}


def _device_limited_check(rank: int, world: int, pc: Any) -> dict[str, Any]:
    """Top-M device-limited routing: each token reaches <= M ranks; bytes match the formula."""
    M, K, D = 2, 4, MODEL.dim
    moe_cfg = MoEConfig(num_experts=N, top_k=K, expert_hidden_size=16, router=RouterConfig(topk_groups=M))
    model = apply_expert_parallel(build_model(MODEL, moe_cfg, V, S, ep=world, seed=0), pc)
    layer = model.moe_layers()[0]
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(10 + rank))
    y, stats = layer(x.view(2, 16, D))
    y.sum().backward()  # autograd through both exchanges runs (parity is tested above)

    # Expected traffic from the routing alone.
    e_per_rank = N // world
    dest_TK = layer.router(x).expert_idx_TK // e_per_rank
    hits_TP = torch.zeros(32, world, dtype=torch.long).scatter_add_(1, dest_TK, torch.ones_like(dest_TK))
    ranks_per_token = (hits_TP > 0).sum(1)
    assert int(ranks_per_token.max()) <= M
    pairs_P = (hits_TP > 0).sum(0)  # (token, rank) rows to each rank
    assign_P = hits_TP.sum(0)
    all_pairs = [torch.zeros_like(pairs_P) for _ in range(world)]
    dist.all_gather(all_pairs, pairs_P)
    sent_remote = int(pairs_P.sum() - pairs_P[rank])
    recv_remote = int(sum(int(p[rank]) for j, p in enumerate(all_pairs) if j != rank))
    assign_remote = int(assign_P.sum() - assign_P[rank])
    comm = stats.comm
    assert comm is not None
    assert int(comm.rows_sent) == sent_remote
    assert int(comm.rows_total) == int(ranks_per_token.sum()) <= M * 32
    assert int(comm.bytes_sent) == (sent_remote + recv_remote) * D * 4 + assign_remote * 20
    return {"rows": int(comm.rows_total), "naive_rows": int(assign_P.sum()), "max_ranks": int(ranks_per_token.max())}


def _guardrail_check(rank: int, world: int, overflow: str) -> dict[str, Any]:
    """Every token of every rank routed to EP rank 0's experts: the receive budget trips."""
    torch.manual_seed(0)
    D, T, E = 8, 6, 2
    group = dist.group.WORLD
    disp = AllToAllDispatcher(2 * E, world, rank, group, rank=rank, world_size=world, layer_idx=3)
    disp.max_recv_factor, disp.overflow = 1.5, overflow
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(rank))
    token_A = torch.arange(T).repeat_interleave(2)
    expert_A = torch.tensor([0, 1] * (T - 1) + [0, 2])  # all but one assignment land on EP rank 0
    weight_A = torch.rand(2 * T, generator=torch.Generator().manual_seed(100 + rank))
    try:
        rows, counts, weight, handle, comm, keep = disp.dispatch(x, token_A, expert_A, weight_A)
    except RecvOverflowError as e:
        return {"overflow": str(e)}
    experts = torch.randn(2 * E, D, D, generator=torch.Generator().manual_seed(7))  # linear experts, all ranks
    y_rows = torch.cat([r @ experts[rank * E + e] for e, r in enumerate(rows.split(counts.tolist()))])
    out = disp.combine(y_rows * weight.unsqueeze(-1), handle)
    assert keep is not None
    # Reference: the kept assignments computed locally.
    ref = torch.zeros(T, D)
    for t, e, w in zip(token_A[keep].tolist(), expert_A[keep].tolist(), weight_A[keep]):
        ref[t] += w * (x[t] @ experts[e])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # The kept ones to rank 0 are this sender's highest weights.
    to0 = expert_A < E
    kept_w, dropped_w = weight_A[to0 & keep], weight_A[to0 & ~keep]
    assert dropped_w.numel() > 0 and kept_w.min() >= dropped_w.max()
    return {"recv": int(counts.sum()), "dropped": int(comm.dropped)}


def _ep_config(tmp_path: Path, steps: int, **overrides: Any) -> Any:
    cfg = tiny_train_config(tmp_path, max_steps=steps, micro_batch_size=4, eval_at_start=False, **overrides)
    cfg.moe.num_experts = 4
    cfg.checkpoint.enabled = False
    cfg.data.max_val_sequences = 9  # EP=2's last val batch has 1 row: rank 0's share is empty
    cfg.moe.router.bias_update_rate = 1e-2  # loss-free balancing on: the bias must stay identical everywhere
    return cfg


def _train_worker(rank: int, world: int, cfg: Any, tmp: str, repeats: int) -> Any:
    from moetrain.train.trainer import Trainer

    curves = []
    cfg.parallel.ep = world
    for k in range(repeats):
        pc = init_parallel(cfg.parallel, "cpu", num_experts=cfg.moe.num_experts)
        trainer = Trainer(cfg, Path(tmp) / f"ep_run{k}", pc)
        trainer.fit()
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        params.update({n: b.clone() for n, b in trainer.model.named_buffers() if n.endswith("expert_bias")})
        if rank == 0:
            lines = (Path(tmp) / f"ep_run{k}" / "metrics.jsonl").read_text().splitlines()
            curves.append(([json.loads(x) for x in lines], params))
        else:
            curves.append((None, params))
    return curves


def _train_curve(metrics: list[dict[str, Any]]) -> list[float]:
    return [m["train/loss"] for m in metrics if "train/loss" in m]


_TRAIN: dict[str, Any] = {}


def ep2_training(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One process, then EP=2 twice in deterministic mode, 20 steps each on the same data (run once)."""
    from moetrain.train.trainer import Trainer

    if not _TRAIN:
        tmp = tmp_path_factory.mktemp("ep_train")
        cfg = _ep_config(tmp, 20, deterministic=True)
        single_cfg = copy.deepcopy(cfg)
        single_cfg.trainer.deterministic = False  # keep this pytest process out of deterministic mode
        single_cfg.trainer.num_threads = 1  # 2 threads on 2 busy cores oversubscribe (10x slower)
        single = Trainer(single_cfg, tmp / "single")
        single.fit()  # the ranks' halves are its 2 micro-batches
        _TRAIN["single_bias"] = {n: b.clone() for n, b in single.model.named_buffers() if n.endswith("expert_bias")}
        _TRAIN["single"] = [json.loads(x) for x in (tmp / "single" / "metrics.jsonl").read_text().splitlines()]
        _TRAIN["ep"] = run_distributed(_train_worker, 2, cfg, str(tmp), 2)
    return _TRAIN


@pytest.mark.e2e
def test_ep2_training_tracks_single_process_loss_curve(tmp_path_factory):
    runs = ep2_training(tmp_path_factory)
    ep_metrics, _ = runs["ep"][0][0]
    a, b = _train_curve(runs["single"]), _train_curve(ep_metrics)
    assert len(a) == len(b) == 20
    for s, (x, y) in enumerate(zip(a, b)):
        assert y == pytest.approx(x, rel=1e-4, abs=1e-5), f"step {s + 1}: single {x} vs EP=2 {y}"
    assert b[-1] < b[0] - 0.3  # it learns
    for rank_runs in runs["ep"]:  # loss-free bias: the same on every rank and as in one process
        for name, bias in runs["single_bias"].items():
            assert bias.abs().sum() > 0 and torch.equal(rank_runs[0][1][name], bias), name
    val_single = next(m["val/loss"] for m in runs["single"] if "val/loss" in m)
    assert next(m["val/loss"] for m in ep_metrics if "val/loss" in m) == pytest.approx(val_single, rel=1e-4)
    last = next(m for m in reversed(ep_metrics) if "moe/layer_1/comm_rows" in m)
    assert last["moe/layer_1/comm_rows"] > 0 and 0 < last["moe/layer_1/local_frac"] < 1
    assert last["moe/layer_1/comm_bytes"] > last["moe/layer_1/comm_rows"] * 32 * 4
    assert len(last["moe/layer_1/recv_rows"]) == 2 and last["moe/layer_1/recv_maxvio"] >= 0
    assert sum(last["moe/layer_1/recv_rows"]) == sum(last["moe/layer_1/load"])  # every kept assignment computed once


@pytest.mark.parity
def test_deterministic_mode_repeats_ep2_runs_bitwise(tmp_path_factory):
    runs = ep2_training(tmp_path_factory)["ep"]
    (m0, _), (m1, _) = runs[0]
    assert _train_curve(m0) == _train_curve(m1)
    for rank_runs in runs:
        (_, a), (_, b) = rank_runs
        for name in a:
            assert torch.equal(a[name], b[name]), name


def _local_equals_alltoall_check(rank: int, world: int, dedup: bool) -> dict[str, Any]:
    """The all-to-all dispatcher (dedup or naive) computes what the local one does, forward and backward."""
    T, D, E = 10, 6, 2
    n = E * world
    x_all = torch.randn(world, T, D, generator=torch.Generator().manual_seed(3))
    experts = torch.randn(n, D, D, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(20 + rank)
    idx_TK = torch.rand(T, n, generator=g).topk(3, dim=-1).indices
    token_A = torch.arange(T).repeat_interleave(3)
    expert_A = idx_TK.reshape(-1)
    weight_A = torch.rand(3 * T, generator=g)

    comms = []

    def run(disp: Any, x: torch.Tensor, w: torch.Tensor, offset: int) -> torch.Tensor:
        rows, counts, weight, h, comm, _ = disp.dispatch(x, token_A, expert_A, w)
        comms.append(comm)
        ys = [r @ experts[offset + e] for e, r in enumerate(rows.split(counts.tolist()))]
        return disp.combine((torch.cat(ys) if ys else rows) * weight.unsqueeze(-1), h)

    x = x_all[rank].clone().requires_grad_()
    w = weight_A.clone().requires_grad_()
    cls = AllToAllDispatcher if dedup else NaiveAllToAllDispatcher
    disp = cls(n, world, rank, dist.group.WORLD, rank, world)
    out = run(disp, x, w, rank * E)
    out.square().sum().backward()
    x_ref = x_all[rank].clone().requires_grad_()
    w_ref = weight_A.clone().requires_grad_()
    ref = run(LocalDispatcher(n), x_ref, w_ref, 0)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
    return {"rows_sent": int(comms[0].rows_total), "assignments": int(expert_A.numel())}


def _balance_config(tmp_path: Path) -> Any:
    """Every balance loss on, global-batch scope, device-limited routing over 2 groups, loss-free bias."""
    cfg = tiny_train_config(tmp_path, micro_batch_size=2, eval_at_start=False)
    cfg.moe.num_experts = 4
    cfg.moe.router.num_groups, cfg.moe.router.topk_groups = 2, 1
    cfg.moe.router.bias_update_rate = 1e-2
    b = cfg.moe.balance
    b.scope, b.expert_coef, b.device_coef, b.comm_coef, b.seq_coef, b.z_loss_coef = (
        "global",
        0.1,
        0.05,
        0.02,
        0.01,
        1e-3,
    )
    cfg.checkpoint.enabled = False
    return cfg


def _balance_matrix_check(rank: int, world: int, pc: Any, cfg: Any, tmp: str) -> dict[str, Any]:
    """Global-scope balance losses: logged values, gradients and the loss-free bias update are the same for
    EP=2 x DP=2, without and with FSDP (``parallel.fsdp``: the non-expert part sharded over all 4 ranks, the
    experts over their 2 EDP ranks), and one process with gradient accumulation 1, 2 and 4 on the same global
    batch."""
    from torch.distributed.tensor import DTensor

    from moetrain.parallel.context import ParallelContext
    from moetrain.train.moe_metrics import moe_log_metrics
    from moetrain.train.trainer import Trainer

    def step(
        micro: int, pcx: Any, fsdp: bool = False
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        c = copy.deepcopy(cfg)
        c.trainer.micro_batch_size = micro
        c.parallel.ep, c.parallel.fsdp = pcx.ep_size, fsdp
        t = Trainer(c, Path(tmp) / f"bal{micro}_{pcx.world_size}_{fsdp}", pcx)
        batch = t.loader.next_batch()
        reduced = t.forward_backward(batch).reduce(pcx)  # the last backward reduced the gradients
        grads = {
            name: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
            for name, p in t.model.named_parameters()
        }
        host = reduced.host()
        groups = {i: layer.num_groups for i, layer in t.moe_layers.items()}
        metrics = moe_log_metrics(reduced, host, sorted(t.moe_layers), groups)
        for i, layer in t.moe_layers.items():
            layer.router.update_bias(reduced.tensor(f"moe/layer_{i}/load"))
        bias = {name: b.clone() for name, b in t.model.named_buffers() if name.endswith("expert_bias")}
        logged = {k: v for k, v in metrics.items() if "/loss/" in k}
        logged["aux"] = host["train/aux_loss"]
        logged["lm"] = host["train/loss"]
        return logged, grads, bias

    runs = {fsdp: step(1, pc, fsdp) for fsdp in (False, True)}  # 8 sequences over 4 ranks: 2 micro-batches of 1
    ep_logged = runs[False][0]
    names = sorted(k.rsplit("/", 1)[1] for k in ep_logged if "/loss/" in k)
    assert names == ["comm", "device", "expert", "seq", "z"], names
    e = runs[False][1]["blocks.1.ffn.experts.w13"].shape[0]
    for micro in (8, 4, 2):  # one process: accumulation 1, 2, 4
        logged, grads, bias = step(micro, ParallelContext())
        for fsdp, (ep_logged_f, ep_grads, ep_bias) in runs.items():
            case = f"fsdp={fsdp}, accumulation {8 // micro}"
            for k, v in logged.items():
                assert ep_logged_f[k] == pytest.approx(v, rel=1e-5, abs=1e-8), f"{case}: {k}"
            for name, g in grads.items():
                if ".experts." in name:
                    g = g[pc.ep_rank * e : (pc.ep_rank + 1) * e]
                torch.testing.assert_close(ep_grads[name], g, rtol=1e-4, atol=1e-7, msg=f"{case}: {name}")
            for name, b in bias.items():
                assert torch.equal(ep_bias[name], b), f"{case}: {name}"
    return {"logged": ep_logged}


def _device_drop_parity(rank: int, world: int, pc: Any) -> dict[str, Any]:
    """DeepSeek-V2 device-level dropping under EP (one device per rank: each receiver keeps its budget of
    ceil(f * A / D) over ALL senders' assignments, protected sequences never dropped) equals one process with
    the same groups on the whole batch at once: loss, dropped count, every gradient."""
    router = RouterConfig(num_groups=world, device_capacity_factor=0.75, device_protect_fraction=0.25)
    moe_cfg = MoEConfig(
        num_experts=N, top_k=2, expert_hidden_size=16, router=router, balance=BalanceConfig(expert_coef=0.0)
    )
    ref = build_model(MODEL, moe_cfg, V, S, ep=world, seed=0)
    with torch.no_grad():  # a skewed router, so devices overflow
        for layer in ref.moe_layers().values():
            layer.router.weight.mul_(4.0)
            layer.router.weight[: N // world] += 0.3
    model = ep_model(ref, pc)
    batch = torch.randint(0, V, (B, S + 1), generator=torch.Generator().manual_seed(5))
    ref_loss, ref_out = _loss(ref, batch)
    ref_loss.backward()
    global_loss, out = ep_backward(model, pc, rank_slice(batch, rank, world))
    stats = torch.tensor([sum(float(s.num_dropped) for s in out.moe_stats.values())])
    dist.all_reduce(stats)
    ref_dropped = sum(float(s.num_dropped) for s in ref_out.moe_stats.values())
    assert ref_dropped > 0 and stats.item() == ref_dropped, (stats.item(), ref_dropped)
    torch.testing.assert_close(global_loss, ref_loss.detach(), rtol=1e-6, atol=1e-7)
    assert_grads_equal_reference(model, ref, pc, "device-level dropping")
    return {"dropped": ref_dropped}


def _host_sync_check(rank: int, world: int, pc: Any) -> dict[str, Any]:
    """Under EP the only would-be GPU host sync of a dropless step is each layer's split exchange (one
    ``tolist`` per MoE layer forward, none in the backward), under bf16 autocast as the trainer runs it."""
    from tests.helpers.host_syncs import HostSyncs

    moe_cfg = _moe_cfg({"topk_groups": 1})
    model = apply_expert_parallel(build_model(MODEL, moe_cfg, V, S, ep=world, seed=0), pc)
    batch = torch.randint(0, V, (2, S + 1), generator=torch.Generator().manual_seed(rank))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _loss(model, batch)[0].backward()  # warm-up
        with HostSyncs() as fwd:
            loss, _ = _loss(model, batch)
    with HostSyncs() as bwd:
        loss.backward()
    return {"forward": fwd.ops, "backward": bwd.ops, "moe_layers": len(model.moe_layers())}


def _dropping_sync_check(rank: int, world: int, pc: Any) -> dict[str, Any]:
    """The would-be GPU host syncs of a step that drops at the receivers: device-level dropping alone, and with
    the receive budget (``moe.max_recv_factor``), under bf16 autocast."""
    from tests.helpers.host_syncs import HostSyncs

    out: dict[str, Any] = {"moe_layers": MODEL.n_layers}
    for name, budget in (("device_drop", None), ("budget_and_device_drop", 1.01)):
        router = RouterConfig(num_groups=world, device_capacity_factor=0.75)
        cfg = MoEConfig(num_experts=N, top_k=2, expert_hidden_size=16, router=router, balance=BalanceConfig())
        ref = build_model(MODEL, cfg, V, S, ep=world, seed=0)
        with torch.no_grad():  # a skewed router, so devices overflow and the budget trips
            for layer in ref.moe_layers().values():
                layer.router.weight.mul_(4.0)
                layer.router.weight[: N // world] += 0.3
        model = apply_expert_parallel(ref, pc)
        for layer in model.moe_layers().values():
            layer.dispatcher.max_recv_factor = budget
        batch = torch.randint(0, V, (2, S + 1), generator=torch.Generator().manual_seed(rank))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _loss(model, batch)[0].backward()  # warm-up
            with HostSyncs() as fwd:
                loss, o = _loss(model, batch)
        with HostSyncs() as bwd:
            loss.backward()
        dropped = sum(float(s.num_dropped) for s in o.moe_stats.values())
        budget_dropped = sum(float(s.comm.dropped) for s in o.moe_stats.values() if s.comm is not None)
        out[name] = {"forward": fwd.ops, "backward": bwd.ops, "dropped": dropped, "budget_dropped": budget_dropped}
    return out


def _suite(rank: int, world: int, ep: int, extra: bool, cfg: Any = None, tmp: str = "") -> dict[str, Any]:
    """Every check of one topology in one spawn (process start-up dominates on 2 cores).

    Each check's error is returned, not raised, so one failing check reports
    cleanly while the others still run (all checks finish their collectives
    before asserting, so the ranks stay in step).
    """
    pc = init_parallel(ParallelConfig(ep=ep), "cpu", num_experts=N)
    checks: list[tuple[str, Any]] = [
        (f"parity/{n}", lambda n=n, kw=kw: _parity_case(rank, world, pc, n, kw)) for n, kw in CASES.items()
    ]
    if extra and world == 2:
        checks += [
            ("dispatch/dedup", lambda: _local_equals_alltoall_check(rank, world, True)),
            ("dispatch/naive", lambda: _local_equals_alltoall_check(rank, world, False)),
            ("guardrail/error", lambda: _guardrail_check(rank, world, "error")),
            ("guardrail/drop", lambda: _guardrail_check(rank, world, "drop")),
            ("host_syncs", lambda: _host_sync_check(rank, world, pc)),
            ("host_syncs/dropping", lambda: _dropping_sync_check(rank, world, pc)),
        ]
    if extra and world == ep:
        checks.append(("device_drop", lambda: _device_drop_parity(rank, world, pc)))
    if extra and world == 4 and ep == 4:
        checks.append(("device_limited", lambda: _device_limited_check(rank, world, pc)))
    if cfg is not None:
        checks.append(("balance_matrix", lambda: _balance_matrix_check(rank, world, pc, cfg, tmp)))
    out: dict[str, Any] = {}
    for name, check in checks:
        try:
            out[name] = check()
        except Exception:
            out[name] = {"error": traceback.format_exc()}
    return out


TOPOLOGIES = {"ep2": (2, 2, True), "ep4": (4, 4, True), "ep2xdp2": (4, 2, False)}
_SUITES: dict[str, list[dict[str, Any]]] = {}


def suite(topology: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The ranks' check results of one topology (run once per test session)."""
    if topology not in _SUITES:
        args: tuple[Any, ...] = TOPOLOGIES[topology]
        if topology == "ep2xdp2":  # the balance-loss matrix needs a corpus
            tmp = tmp_path_factory.mktemp("balance")
            args = (*args, _balance_config(tmp), str(tmp))
        _SUITES[topology] = run_distributed(_suite, *args)
    return _SUITES[topology]


@pytest.fixture
def results(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return lambda topology, check: _results(topology, check, tmp_path_factory)


def _results(topology: str, check: str, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    per_rank = [r[check] for r in suite(topology, tmp_path_factory)]
    errors = [f"rank {i}: {r['error']}" for i, r in enumerate(per_rank) if isinstance(r, dict) and "error" in r]
    assert not errors, "\n".join(errors)
    return per_rank


@pytest.mark.parity
@pytest.mark.parametrize("topology", list(TOPOLOGIES))
@pytest.mark.parametrize("case", list(CASES))
def test_ep_loss_and_every_gradient_equal_one_process(topology, case, results):
    """EP=2, EP=4, EP=2 x DP=2: loss, grad norm and every gradient (experts slice by slice) = one process."""
    reports = results(topology, f"parity/{case}")
    assert len({r["loss"] for r in reports}) == 1  # every rank has the same global loss
    if case == "capacity":
        assert sum(r["dropped"] for r in reports) > 0  # capacity really drops here


@pytest.mark.parity
@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "naive"])
def test_alltoall_dispatcher_matches_local_forward_and_backward(dedup, results):
    reports = results("ep2", "dispatch/dedup" if dedup else "dispatch/naive")
    for r in reports:
        assert (r["rows_sent"] < r["assignments"]) if dedup else (r["rows_sent"] == r["assignments"])


@pytest.mark.parity
@pytest.mark.parametrize("topology", ["ep2", "ep4"])
def test_device_level_dropping_by_receiving_device_equals_one_process_on_the_whole_batch(topology, results):
    reports = results(topology, "device_drop")
    assert len({r["dropped"] for r in reports}) == 1


@pytest.mark.parity
def test_ep_dropless_step_syncs_with_the_host_only_for_the_split_exchange(results):
    for r in results("ep2", "host_syncs"):
        assert r["forward"] == ["tolist"] * r["moe_layers"] and r["backward"] == [], r


@pytest.mark.parity
def test_ep_dropping_syncs_with_the_host_only_for_the_splits_and_the_receive_budget(results):
    """Device-level dropping at the receivers adds no host sync to the split exchange (its budget and masks stay
    on the device); the receive budget adds its all-reduced totals and, where it drops, one ``nonzero`` per
    layer. Catches a mask composed by boolean indexing, or a budget read on the host per destination."""
    reports = results("ep2", "host_syncs/dropping")
    assert sum(r["budget_and_device_drop"]["budget_dropped"] for r in reports) > 0  # the budget really drops
    for r in reports:
        layers = r["moe_layers"]
        drop = r["device_drop"]
        assert drop["forward"] == ["tolist"] * layers and drop["backward"] == [] and drop["dropped"] > 0, drop
        both = r["budget_and_device_drop"]
        assert both["backward"] == [], both
        assert both["forward"].count("tolist") == 2 * layers, both
        assert set(both["forward"]) == {"tolist", "nonzero"} and both["forward"].count("nonzero") <= layers, both


@pytest.mark.parity
def test_device_limited_routing_reaches_at_most_m_ranks_and_bytes_match_formula(results):
    reports = results("ep4", "device_limited")
    assert all(r["max_ranks"] <= 2 for r in reports)
    assert all(r["rows"] < r["naive_rows"] for r in reports)  # dedup sends fewer rows than one per (token, expert)


@pytest.mark.parity
def test_receive_budget_error_names_layer_rank_and_counts(results):
    reports = results("ep2", "guardrail/error")
    for r in reports:  # both ranks stop with the same one-line message (nobody hangs in a collective)
        assert r["overflow"] == reports[0]["overflow"]
        assert "\n" not in r["overflow"]
    assert reports[0]["overflow"].startswith("MoE layer 3: EP rank 0 would receive 22 expert rows, over the budget 18")
    assert reports[0]["overflow"].endswith("(rows per EP rank: [22, 2])")


@pytest.mark.parity
def test_receive_budget_drop_keeps_highest_weights_within_budget(results):
    reports = results("ep2", "guardrail/drop")
    # 22 rows for rank 0, budget floor(1.5 * 24 / 2) = 18: each sender keeps 18 * 11 // 22 = 9 of its 11.
    assert reports[0]["recv"] == 18 and reports[1]["recv"] == 2
    assert reports[0]["dropped"] == reports[1]["dropped"] == 2


# ----------------------------------------------------------------------------- single-process unit tests


@pytest.mark.unit
def test_layout_errors_name_the_key():
    from moetrain.config import ConfigError, TrainConfig, validate
    from moetrain.parallel.context import check_layout

    with pytest.raises(ConfigError, match=r"^parallel.ep=3: must divide the world size \(4 ranks\)$"):
        check_layout(4, 3)
    with pytest.raises(ConfigError, match=r"^parallel.ep=4: must divide moe.num_experts=6$"):
        check_layout(4, 4, 6)
    cfg = TrainConfig()
    cfg.moe.recv_overflow = "ignore"
    with pytest.raises(ConfigError, match=r"^moe.recv_overflow='ignore': must be one of drop, error$"):
        validate(cfg)
    cfg = TrainConfig()
    cfg.parallel.ep = 2
    with pytest.raises(ConfigError, match=r"^parallel.ep=2: must divide the world size"):
        validate(cfg, world_size=3)


@pytest.mark.unit
def test_sharding_keeps_global_slices_and_parameter_count():
    from moetrain.parallel.expert_parallel import shard_experts

    full = build_model(MODEL, _moe_cfg({}), V, S, ep=2, seed=0)
    counts = (full.num_params(), full.num_params(active=True))
    for ep_rank in range(2):
        model = copy.deepcopy(full)
        for i, layer in model.moe_layers().items():
            shard_experts(layer.experts, 2, ep_rank)
            ref = full.moe_layers()[i].experts
            assert layer.experts.expert_offset == ep_rank * 4 and layer.experts.num_global_experts == N
            assert torch.equal(layer.experts.w13, ref.w13[ep_rank * 4 : ep_rank * 4 + 4])
            assert torch.equal(layer.experts.w2, ref.w2[ep_rank * 4 : ep_rank * 4 + 4])
        assert (model.num_params(), model.num_params(active=True)) == counts  # the whole model's, whatever ep


@pytest.mark.unit
def test_stray_hydra_dir_of_a_nonzero_rank_is_removed_but_never_a_real_one(tmp_path):
    from moetrain.train.cli import remove_stray_run_dir

    agreed = tmp_path / "rank0"
    agreed.mkdir()
    stray = tmp_path / "rank1"
    (stray / ".hydra").mkdir(parents=True)
    (stray / ".hydra" / "config.yaml").write_text("x")
    (stray / "train.log").write_text("")
    assert not remove_stray_run_dir(agreed, agreed)
    assert remove_stray_run_dir(stray, agreed) and not stray.exists()
    real = tmp_path / "real"
    real.mkdir()
    (real / "metrics.jsonl").write_text("{}")
    assert not remove_stray_run_dir(real, agreed) and (real / "metrics.jsonl").exists()


@pytest.mark.unit
def test_kept_after_dispatch():
    from moetrain.moe.dispatch import kept_after_dispatch

    keep_TK = torch.tensor([[True, False], [True, True]])
    out = kept_after_dispatch(keep_TK, torch.tensor([True, False, True]))  # the 2nd kept one (token 1, slot 0) drops
    assert out.tolist() == [[True, False], [False, True]]
    assert kept_after_dispatch(keep_TK, None) is keep_TK


@pytest.mark.parity
def test_balance_losses_equal_for_one_process_accumulation_and_ep2_x_dp2(results):
    """The DP-invariance matrix (docs/parallelism.md): every global-scope balance loss (expert, device, comm, seq, z),
    its gradient and the loss-free bias update: EP=2 x DP=2, with and without FSDP, = one process with
    accumulation 1 / 2 / 4."""
    reports = results("ep2xdp2", "balance_matrix")
    assert all(r["logged"] == reports[0]["logged"] for r in reports)  # every rank logs the same numbers


@pytest.mark.e2e
def test_torchrun_two_ranks_agree_on_one_run_dir_and_only_rank0_logs(tmp_path):
    """The real entry point under torchrun with EP=2: each rank's Hydra makes its own dir (rank0, rank1 here, as
    with ranks starting in different seconds); rank 1 removes its stray one and rank 0 alone writes the logs."""
    import os
    import subprocess
    import sys

    from tests.conftest import cli_corpus_overrides

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "moetrain.train",
        "experiment=smoke",
        *cli_corpus_overrides(tmp_path),
        "parallel.ep=2",
        "logger=none",
        "trainer.max_steps=2",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "checkpoint.enabled=false",
        f"hydra.run.dir={tmp_path / 'runs'}/rank${{oc.env:RANK}}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["rank0"]
    records = [json.loads(x) for x in (tmp_path / "runs" / "rank0" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2]  # once each: only rank 0 writes
    assert train[-1]["moe/layer_1/comm_rows"] > 0 and len(train[-1]["moe/layer_1/recv_rows"]) == 2
