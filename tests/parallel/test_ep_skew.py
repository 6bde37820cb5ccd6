"""Expert parallelism under skewed routing, with capacity dropping and active gradient clipping, vs one process.

``test_ep.py``'s parity cases route near-uniformly: no rank or expert ever gets
0 rows and clipping never acts. Here a large loss-free bias (selection only, so
the gradients are still the router's) sends every token of layer 0 to the last
EP rank's experts, and every token of layer 1 to expert 0 plus one of the last
rank's: some ranks receive nothing, some send nothing to others, most experts
get no row. Each case clips to a third of the true global norm; the reference
clips with ``torch.nn.utils.clip_grad_norm_`` over the full model, so a wrong
norm (an expert shard counted once per EDP copy, or not at all) or a wrong EP
gradient scale changes the clipped gradients.

Reference: one process, the W ranks' slices of the global batch as W
micro-batches (as in ``test_ep.py``); with device-level dropping, which each
receiving device decides over all the senders of its EP group, one micro-batch
per EP group. EP=2 runs on 2 ranks, EP=4 and EP=2 x DP=2
on 4, in the shared spawns of :mod:`tests.helpers.spawned`.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.distributed as dist

from moetrain.config import BalanceConfig, ModelConfig, MoEConfig, ParallelConfig, RouterConfig
from moetrain.data import rank_slice
from moetrain.model import build_model
from moetrain.parallel import clip_grad_norm, init_parallel
from moetrain.parallel.all_to_all import AllToAllDispatcher
from tests.helpers import spawned
from tests.helpers.ep_parity import assert_grads_equal_reference, ep_backward, ep_model, model_loss

pytestmark = pytest.mark.parity

V, S, B, N = 64, 12, 8, 8
MODEL = ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden_size=32, first_k_dense=0)
BALANCE = BalanceConfig(expert_coef=0.01, z_loss_coef=1e-3)
CASES: dict[str, dict[str, Any]] = {
    "skew": {},
    "skew_capacity": {"capacity_factor": 1.0},
    "skew_device_capacity": {"device_capacity_factor": 1.0},
}


def skew_bias() -> list[torch.Tensor]:
    """Layer 0: experts 6 and 7 (the last EP rank's) win every token. Layer 1: expert 0 and one of 6 / 7."""
    b0 = torch.full((N,), -10.0)
    b0[6:] = 10.0
    b1 = torch.full((N,), -10.0)
    b1[0], b1[6:] = 20.0, 0.0
    return [b0, b1]


_loss = model_loss


def _skew_case(rank: int, world: int, pc: Any, name: str, router_kw: dict[str, Any]) -> dict[str, Any]:
    ep = pc.ep_size
    router = RouterConfig(bias_update_rate=1e-3, **router_kw)
    device_level = router_kw.get("device_capacity_factor") is not None
    # Device-level dropping is decided by each receiving device over all the senders of its EP group
    # (DeepSeek-V2 sec. 2.2.4), so its reference sees one EP group's tokens as one micro-batch; the
    # per-micro-batch expert loss would then differ by construction, so it is off there.
    balance = BalanceConfig(expert_coef=0.0, z_loss_coef=1e-3) if device_level else BALANCE
    moe = MoEConfig(num_experts=N, top_k=2, expert_hidden_size=8, router=router, balance=balance)
    ref = build_model(MODEL, moe, V, S, ep=ep, seed=0)
    for layer, bias in zip(ref.moe_layers().values(), skew_bias()):
        layer.router.expert_bias.copy_(bias)
    model = ep_model(ref, pc)
    batch = torch.randint(0, V, (B, S + 1), generator=torch.Generator().manual_seed(1))

    groups = world // ep if device_level else world  # the reference's micro-batches: EP groups, or ranks
    ref_loss = torch.zeros(())
    for g in range(groups):
        loss, _ = _loss(ref, rank_slice(batch, g, groups))
        (loss / groups).backward()
        ref_loss += loss.detach() / groups
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf"))
    max_norm = float(ref_norm) / 3
    torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)

    global_loss, out = ep_backward(model, pc, rank_slice(batch, rank, world))
    norm = clip_grad_norm(model, pc, max_norm)

    # what the skew did: per layer, rows this rank computed and rows it sent to others; global loads
    recv = torch.stack([s.comm.recv_rows_W[pc.rank] for s in out.moe_stats.values()])
    sent = torch.stack([s.comm.rows_sent for s in out.moe_stats.values()])
    load = torch.stack([s.load_N for s in out.moe_stats.values()])
    dist.all_reduce(load)
    dropped = sum(float(s.num_dropped) for s in out.moe_stats.values())

    torch.testing.assert_close(global_loss, ref_loss, rtol=1e-6, atol=1e-7, msg=f"{name}: loss")
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=1e-8, msg=f"{name}: grad norm")
    assert_grads_equal_reference(model, ref, pc, f"{name} (clipped)")
    return {
        "recv": recv.tolist(),
        "sent": sent.tolist(),
        "load": load.tolist(),
        "dropped": dropped,
        "clipped": float(norm) > max_norm * 1.5,
    }


def _ep_dispatch_order(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Rows reach the experts by (local expert, source rank, token): the documented deterministic order."""
    T, K, E = 12, 2, 2
    x = torch.stack([torch.full((T,), float(rank)), torch.arange(T, dtype=torch.float32)], dim=1)  # (src, t)
    g = torch.Generator().manual_seed(30 + rank)
    idx_TK = torch.rand(T, E * world, generator=g).topk(K, dim=-1).indices
    disp = AllToAllDispatcher(E * world, world, rank, dist.group.WORLD, rank, world)
    d = disp.dispatch(x, torch.arange(T).repeat_interleave(K), idx_TK.reshape(-1), torch.rand(T * K, generator=g))
    keys = [(int(s), int(t)) for s, t in d.rows_RD.tolist()]
    # who sends what to this rank's experts, from every rank's routing
    all_idx = [torch.zeros_like(idx_TK) for _ in range(world)]
    dist.all_gather(all_idx, idx_TK)
    expected = []
    for e in range(E):
        for src in range(world):
            expected += [(src, t) for t in range(T) if rank * E + e in all_idx[src][t].tolist()]
    assert keys == expected
    return {"rows": len(keys)}


_PCS: dict[int, Any] = {}


def _pc(ep: int) -> Any:
    """This rank's parallel context for ``ep`` (groups built once per spawn)."""
    if ep not in _PCS:
        _PCS[ep] = init_parallel(ParallelConfig(ep=ep), "cpu", num_experts=N)
    return _PCS[ep]


def _check(rank: int, world: int, tmp: str, ep: int, case: str) -> dict[str, Any]:
    return _skew_case(rank, world, _pc(ep), case, CASES[case])


TOPOLOGY = {"ep2": (2, 2), "ep4": (4, 4), "ep2xdp2": (4, 2)}  # name -> (world size, EP size)
for _topology, (_world, _ep) in TOPOLOGY.items():
    for _case in CASES:
        spawned.register(_world, f"skew/{_topology}/{_case}", functools.partial(_check, ep=_ep, case=_case))
spawned.register(2, "skew/ep2/dispatch_order", _ep_dispatch_order)


@pytest.mark.parametrize("topology", list(TOPOLOGY))
@pytest.mark.parametrize("case", list(CASES))
def test_skewed_routing_with_dropping_and_clipping_equals_one_process(topology, case):
    reports = spawned.result(TOPOLOGY[topology][0], f"skew/{topology}/{case}")
    world, ep = TOPOLOGY[topology]
    assert all(r["clipped"] for r in reports)  # clipping acted
    load = reports[0]["load"]
    assert all(load[layer][e] == 0 for layer in range(2) for e in range(1, 6))  # experts 1..5 got no row
    recv = [r["recv"] for r in reports]  # [rank][layer]
    sent = [r["sent"] for r in reports]
    # layer 0: only the last EP rank computes; it sends nothing to the others
    for rank in range(world):
        ep_rank = rank % ep
        assert (recv[rank][0] > 0) == (ep_rank == ep - 1), (rank, recv)
        assert (sent[rank][0] == 0) == (ep_rank == ep - 1), (rank, sent)
    if case == "skew":
        assert all(r["dropped"] == 0 for r in reports)
    else:
        assert sum(r["dropped"] for r in reports) > 0


def test_ep_dispatch_hands_rows_to_experts_by_expert_source_rank_and_token():
    assert all(r["rows"] > 0 for r in spawned.result(2, "skew/ep2/dispatch_order"))
