"""moetrain-plan: parameter counts equal the built model's, all-to-all bytes equal the dispatcher's counters."""

from __future__ import annotations

import pytest
import torch

from moetrain.config import ModelConfig, MoEConfig, TrainConfig
from moetrain.model import build_model
from moetrain.tools.plan import (
    Cluster,
    dispatch_bytes,
    expected_remote_ranks,
    memory_per_gpu,
    param_counts,
    plan,
    report,
    totals,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("model", "moe"),
    [
        ({}, {}),
        ({"tie_embeddings": True, "n_kv_heads": None}, {"num_shared_experts": 0}),
        ({"first_k_dense": 0, "moe_every": 2}, {"num_experts": 16, "top_k": 4, "num_shared_experts": 2}),
        ({}, {"router": {"strategy": "noisy_topk"}}),
    ],
)
def test_param_counts_are_exact(model, moe):
    cfg = TrainConfig()
    for k, v in model.items():
        setattr(cfg.model, k, v)
    for k, v in moe.items():
        if k == "router":
            for rk, rv in v.items():
                setattr(cfg.moe.router, rk, rv)
        else:
            setattr(cfg.moe, k, v)
    built = build_model(cfg.model, cfg.moe, 320, cfg.data.seq_len, seed=0)
    total, active = totals(param_counts(cfg, 320))
    assert total == built.num_params()
    assert active == built.num_params(active=True)


def test_expected_remote_ranks_matches_enumeration():
    import itertools

    N, K, ep = 8, 2, 4
    subsets = list(itertools.combinations(range(N), K))
    mean = sum(len({e // (N // ep) for e in s} - {0}) for s in subsets) / len(subsets)  # seen from rank 0
    assert expected_remote_ranks(N, K, ep) == pytest.approx(mean)
    assert expected_remote_ranks(N, K, 1) == 0.0


def test_dispatch_bytes_counts_rows_once_per_rank():
    # 4 experts on 2 ranks (2 each); rank 0's tokens: t0 -> {0, 1} (local), t1 -> {2, 3} (one row to rank 1),
    # t2 -> {1, 3} (one row to rank 1)
    idx = torch.tensor([[0, 1], [2, 3], [1, 3]])
    b = dispatch_bytes(idx, ep=2, ep_rank=0, num_experts=4, dim=8, itemsize=4)
    assert b["rows_sent"] == 2 and b["assignments_sent"] == 3
    assert b["send_bytes"] == 2 * 8 * 4 + 3 * 20


def test_plan_report_and_device_limited_routing_sends_less():
    cfg = TrainConfig(model=ModelConfig(dim=1024, n_layers=8), moe=MoEConfig(num_experts=64, top_k=6))
    cfg.parallel.ep = 8
    cfg.trainer.global_batch_size = cfg.trainer.micro_batch_size = 8
    cfg.moe.router.topk_groups = 3
    p = plan(cfg, Cluster(nodes=1, gpus_per_node=8), vocab_size=32000)
    assert p["remote_ranks_topm"] < p["remote_ranks_topk"] <= 7
    assert p["remote_ranks_topm"] <= 3
    assert p["a2a_bytes_topm"] < p["a2a_bytes_topk"]
    text = report(cfg, Cluster(), 32000, zero=1)
    assert "top-M" in text and "GFLOPs/token" in text


def _ep_bytes(rank: int, world: int) -> tuple[float, dict[str, int], list[list[int]]]:
    from moetrain.config import ParallelConfig
    from moetrain.parallel.context import init_parallel
    from moetrain.parallel.expert_parallel import apply_expert_parallel

    pc = init_parallel(ParallelConfig(ep=world), "cpu", num_experts=8)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=48, first_k_dense=1)
    moe = MoEConfig(num_experts=8, top_k=3, expert_hidden_size=16)
    model = apply_expert_parallel(build_model(cfg, moe, 64, 16, ep=world, seed=0), pc)
    captured = {}
    router = model.moe_layers()[1].router

    def hook(_module, _inputs, out) -> None:
        captured["idx"] = out.expert_idx_TK.clone()

    router.register_forward_hook(hook)
    torch.manual_seed(rank)
    out = model(torch.randint(0, 64, (2, 16)))
    counted = out.moe_stats[1].comm.bytes_sent.item()
    return counted, dispatch_bytes(captured["idx"], world, rank, 8, 32, 4), captured["idx"].tolist()


@pytest.mark.parity
def test_planned_bytes_equal_the_dispatchers_counters():
    from tests.helpers.distributed import run_distributed

    results = run_distributed(_ep_bytes, 2)
    for rank, (counted, planned, _) in enumerate(results):
        other = results[1 - rank][2]
        # what this rank receives (and returns in the combine) = the other rank's rows sent here
        recv_rows = sum(1 for experts in other if any(e // 4 == rank for e in experts))
        assert counted == planned["send_bytes"] + recv_rows * 32 * 4


def test_fsdp_memory_shards_the_non_expert_part_over_dp_and_the_experts_over_edp():
    cfg = TrainConfig(model=ModelConfig(dim=1024, n_layers=8), moe=MoEConfig(num_experts=64, top_k=6))
    cfg.parallel.ep = 8
    W, vocab = 16, 32000
    counts = param_counts(cfg, vocab)
    dense = totals(counts)[0] - counts["routed_experts"]
    plain = memory_per_gpu(cfg, vocab, W, zero=0, micro_batch=1)
    fsdp = memory_per_gpu(cfg, vocab, W, zero=0, micro_batch=1, fsdp=True)
    expert_bytes = counts["routed_experts"] / 8 * 16 / 1e9  # bf16 weights + grads + fp32 master and moments
    # without FSDP every rank holds the non-expert part whole; with it, 1/W of it (W = DP for that part), and
    # 1/(W/ep) of its N/ep experts (their EDP ranks)
    assert plain["weights"] + plain["grads"] + plain["optimizer"] == pytest.approx(16 * dense / 1e9 + expert_bytes)
    edp = W // 8
    want = 16 * dense / W / 1e9 + expert_bytes / edp
    assert fsdp["weights"] + fsdp["grads"] + fsdp["optimizer"] == pytest.approx(want)
    assert fsdp["activations"] == plain["activations"]
    p = plan(cfg, Cluster(nodes=2, gpus_per_node=8), vocab, zero=0)
    assert p["fsdp_mem_total_gb"] < p["mem_total_gb"]
    assert "with FSDP" in report(cfg, Cluster(nodes=2, gpus_per_node=8), vocab, zero=0)


def test_plan_prints_the_pipeline_bubble_of_the_layout():
    """Catches a plan that counts the pipeline's micro-batches over the whole world instead of its DP = W / pp
    replicas, or prints no bubble, for a layout that validation (for planning) accepts."""
    from moetrain.config import validate

    cfg = TrainConfig(model=ModelConfig(dim=256, n_layers=8), moe=MoEConfig(num_experts=16, top_k=2))
    cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.pp_schedule = 4, 2, "interleaved_1f1b"
    cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size = 64, 1
    validate(cfg, world_size=16, for_training=False)
    p = plan(cfg, Cluster(nodes=2, gpus_per_node=8), vocab_size=32000)
    assert p["pp_microbatches"] == 16  # 64 sequences over DP = 16 / 4 pipelines, one per micro-batch
    assert p["pp_bubble"] == pytest.approx(3 / (2 * 16 + 3))
    assert "pipeline: PP=4, 2 stage(s)/rank, interleaved_1f1b, 16 micro-batches/step: bubble 8.6%" in report(
        cfg, Cluster(nodes=2, gpus_per_node=8), 32000, zero=1
    )
