"""moetrain-plan under pipeline parallelism (moetrain.tools.plan_pipeline): each pipeline rank's parameters,
gradients, optimizer state and activations in flight, against numbers computed by hand."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from moetrain.config import ModelConfig, MoEConfig, TrainConfig
from moetrain.config.pipeline_layout import stage_specs
from moetrain.tools.plan import Cluster, main, memory_per_gpu, param_counts, pipeline_ranks, report, totals
from moetrain.tools.plan_pipeline import Layout, ModelParts, in_flight, model_parts, rank_memory

pytestmark = pytest.mark.unit

PARTS = ModelParts(embedding=1000, head=1100, blocks_dense=(100, 100, 100, 100), blocks_experts=(0, 800, 800, 800))
"""4 blocks (the first dense), on 2 stages of 2 blocks: stage 0 embedding + blocks 0-1, stage 1 blocks 2-3 + head."""


def test_model_parts_puts_each_parameter_where_a_stage_holds_it() -> None:
    """Catches experts counted as a rank's EP share instead of all N (the planner's rule), a block's tensors
    given to another block, or the final norm / LM head left out of the head."""
    named = [
        ("embed.weight", 100, 10),
        ("blocks.0.attn.wq", 20, 4),
        ("blocks.1.attn.wq", 20, 4),
        ("blocks.1.ffn.experts.w13", 40, 2),  # 2 of the 4 experts
        ("blocks.1.ffn.experts.w2", 24, 2),
        ("norm.weight", 5, 5),
        ("lm_head.weight", 100, 10),
    ]
    assert model_parts(named, num_experts=4) == ModelParts(100, 105, (20, 20), (0, 128))


def test_in_flight_micro_batches_per_schedule() -> None:
    """Catches a schedule's peak activations counted as 1F1B's everywhere: GPipe holds all m, 1F1B pp - r on rank
    r (at most m), interleaved Megatron's warmup + 1 stage-forwards over v, ZBV pp on every rank."""
    assert [in_flight("1f1b", 4, r, 8, 1) for r in range(4)] == [4, 3, 2, 1]
    assert [in_flight("1f1b", 4, r, 2, 1) for r in range(4)] == [2, 2, 2, 1]
    assert in_flight("gpipe", 4, 3, 8, 1) == 8
    # rank 0 of 2, v = 2: 2 (2 - 0 - 1) + (2 - 1) 2 + 1 = 5 stage-forwards, of half the rank's blocks each
    assert [in_flight("interleaved_1f1b", 2, r, 4, 2) for r in range(2)] == [2.5, 1.5]
    assert in_flight("interleaved_1f1b", 2, 0, 1, 2) == 1.0  # m v = 2 stage-forwards at most
    assert [in_flight("zbv", 4, r, 8, 2) for r in range(4)] == [4, 4, 4, 4]
    assert in_flight("gpipe", 1, 0, 8, 1) == 1  # one process: accumulation frees each micro-batch


def test_rank_memory_by_hand_zero1_zero2_and_fsdp() -> None:
    """Catches the embedding or head counted on the wrong stage, experts not split over EP or their optimizer
    state sharded over the stage's dp ranks instead of its dp / ep, ZeRO-2's gradients unsharded, or the
    logits counted on a rank without the head. PP=2, EP=2, DP=4 per stage; 10 activation bytes per block and
    micro-batch, 7 for the logits."""
    s0, s1 = stage_specs(4, 2)
    zero1 = Layout(pp=2, ep=2, dp=4, zero=1)
    r0 = rank_memory(PARTS, [s0], 0, zero1, act_per_block=10, logits=7, in_flight_mb=2)
    # dense 100 + 100 + 1000 = 1200 (dp = 4 replicas); experts 800 / 2 = 400 (dp / ep = 2 replicas)
    assert (r0.dense_params, r0.expert_params) == (1200, 400)
    assert (r0.weights, r0.grads) == (2 * 1600, 2 * 1600)
    assert r0.optimizer == 12 * 1200 / 4 + 12 * 400 / 2
    assert r0.activations == 2 * 10 * 2 and r0.total == 3200 + 3200 + 6000 + 40
    r1 = rank_memory(PARTS, [s1], 1, zero1, act_per_block=10, logits=7, in_flight_mb=1)
    assert (r1.dense_params, r1.expert_params) == (1300, 800)
    assert r1.optimizer == 12 * 1300 / 4 + 12 * 800 / 2 and r1.activations == 1 * 10 * 2 + 7
    zero2 = rank_memory(PARTS, [s0], 0, Layout(2, 2, 4, zero=2), 10, 7, 2)
    assert zero2.grads == 2 * 1200 / 4 + 2 * 400 / 2 and zero2.weights == 3200
    fsdp = rank_memory(PARTS, [s0], 0, Layout(2, 2, 4, fsdp=True), 10, 7, 2)
    assert (fsdp.weights, fsdp.grads, fsdp.optimizer) == (1000, 1000, 6000)


def _cfg(pp: int) -> TrainConfig:
    cfg = TrainConfig(model=ModelConfig(dim=256, n_layers=8), moe=MoEConfig(num_experts=16, top_k=2))
    cfg.parallel.pp, cfg.parallel.ep = pp, 2
    cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size = 64, 1
    return cfg


@pytest.mark.parametrize(("zero", "fsdp"), [(0, False), (1, False), (2, False), (0, True)])
def test_one_stage_equals_the_planner_without_pp_and_stages_cover_the_model(zero: int, fsdp: bool) -> None:
    """Catches the pipeline planner drifting from the planner without PP (PP=1 must give memory_per_gpu's
    weights, grads and optimizer state) or losing / doubling parameters over the stages (PP=4: the ranks'
    non-expert parts sum to the model's, their expert shares times EP to all routed experts)."""
    vocab, world = 32000, 16
    (one,) = pipeline_ranks(_cfg(1), vocab, world, zero, fsdp)
    want = memory_per_gpu(_cfg(1), vocab, world, zero, micro_batch=1, fsdp=fsdp)
    for key in ("weights", "grads", "optimizer"):
        assert getattr(one, key) / 1e9 == pytest.approx(want[key], rel=1e-12)
    counts = param_counts(_cfg(4), vocab)
    ranks = pipeline_ranks(_cfg(4), vocab, world, zero, fsdp)
    assert sum(r.dense_params for r in ranks) == totals(counts)[0] - counts["routed_experts"]
    assert sum(r.expert_params for r in ranks) * 2 == counts["routed_experts"]


def test_report_prints_each_pipeline_ranks_memory_and_the_largest() -> None:
    """Catches a report without the per-rank lines or naming the wrong rank as the one that must fit."""
    text = report(_cfg(4), Cluster(nodes=2, gpus_per_node=8), 32000, zero=1)
    ranks = pipeline_ranks(_cfg(4), 32000, 16, 1)
    assert "cluster: 2 x 8 GPUs, PP=4, EP=2, DP=4, ZeRO-1" in text
    assert "  rank 0: stage 0 (embedding + blocks 0-1): weights" in text and "(4 micro-batches in flight)" in text
    assert "  rank 3: stage 3 (blocks 6-7 + head)" in text and "(1 micro-batch in flight)" in text
    largest = max(ranks, key=lambda r: r.total)
    assert f"  largest: rank {largest.pp_rank}, " in text


def test_the_worked_example_of_docs_pipeline_md_is_what_the_planner_prints(capsys: pytest.CaptureFixture) -> None:
    """Catches the DeepSeek-V2-Lite example in docs/pipeline.md going stale: its command, run, prints exactly the
    output shown under it."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "pipeline.md").read_text()
    shown = re.search(r"```bash\n(moetrain-plan model=deepseek_v2_lite [^\n]*)\n```\n\n```text\n(.*?)\n```", page, re.S)
    assert shown is not None
    try:
        main(shlex.split(shown.group(1))[1:])
    except SystemExit as e:
        assert e.code in (0, None)
    assert capsys.readouterr().out.strip() == shown.group(2).strip()
