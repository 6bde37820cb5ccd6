"""The metric recorder: declared reductions over micro-batches and ranks, reduced in one place."""

from __future__ import annotations

import pytest
import torch

from moetrain.parallel.context import ParallelContext
from moetrain.train.metrics import MetricRecorder
from tests.helpers.distributed import run_distributed


def _record(rec: MetricRecorder, rank: int, micro: int) -> None:
    """Rank r's micro-batch m records loss r+m (mean), load [r, m, 1] (sum), peak 10r+m (max), a float64 sum."""
    for m in range(micro):
        rec.record("train/loss", torch.tensor(float(rank + m)), "mean")
        rec.record("moe/layer_1/load", torch.tensor([float(rank), float(m), 1.0]), "sum")
        rec.record("peak", torch.tensor(10.0 * rank + m), "max")
        rec.record("val/loss_sum", torch.tensor(0.1 * (rank + 1), dtype=torch.float64), "sum")


def expected(world: int, micro: int) -> dict:
    pairs = [(r, m) for r in range(world) for m in range(micro)]
    return {
        "train/loss": sum(r + m for r, m in pairs) / len(pairs),
        "moe/layer_1/load": [float(sum(r for r, _ in pairs)), float(sum(m for _, m in pairs)), float(len(pairs))],
        "peak": 10.0 * (world - 1) + micro - 1,
        "val/loss_sum": sum(0.1 * (r + 1) for r, _ in pairs),
    }


@pytest.mark.unit
def test_one_process_reductions_are_hand_computed():
    rec = MetricRecorder()
    _record(rec, 0, 3)
    host = rec.reduce(ParallelContext()).host()
    want = expected(1, 3)
    assert host["train/loss"] == want["train/loss"] and host["moe/layer_1/load"] == want["moe/layer_1/load"]
    assert host["peak"] == want["peak"]
    assert host["val/loss_sum"] == pytest.approx(want["val/loss_sum"], rel=1e-15)  # float64 stays float64
    assert rec.reduce(ParallelContext()).tensor("val/loss_sum").dtype == torch.float64


@pytest.mark.unit
def test_a_name_keeps_one_reduction():
    rec = MetricRecorder()
    rec.record("x", torch.tensor(1.0), "sum")
    with pytest.raises(ValueError, match="x: recorded with reduce=sum and mean"):
        rec.record("x", torch.tensor(1.0), "mean")
    with pytest.raises(ValueError, match="reduce must be one of"):
        rec.record("y", torch.tensor(1.0), "median")  # type: ignore[arg-type]


def _two_ranks(rank: int, world: int) -> dict:
    import torch.distributed as dist

    pc = ParallelContext(rank=rank, world_size=world)
    assert dist.is_initialized()
    rec = MetricRecorder()
    _record(rec, rank, 2 + rank)  # ranks may record a mean different numbers of times (counts are reduced too)
    return rec.reduce(pc).host()


@pytest.mark.parity
def test_two_gloo_ranks_reduce_sums_means_and_maxima_over_both():
    out = run_distributed(_two_ranks, 2)
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    want_loss = sum(r + m for r, m in pairs) / len(pairs)
    for host in out:
        assert host["train/loss"] == pytest.approx(want_loss, rel=1e-12)
        assert host["moe/layer_1/load"] == [3.0, 4.0, 5.0]
        assert host["peak"] == 12.0
        assert host["val/loss_sum"] == pytest.approx(0.1 * 2 + 0.2 * 3, rel=1e-12)
    assert out[0] == out[1]


@pytest.mark.unit
def test_per_token_means_stay_means_over_micro_batches():
    """Catches ``devices_per_token`` (a per-token mean, like the router entropy) reduced as a sum: over 2
    micro-batches (on one rank or two, one reduction) it would log 2.5 devices per token with 2 devices."""
    from moetrain.moe.layer import MoEStats
    from moetrain.train.moe_metrics import moe_log_metrics, record_moe

    rec = MetricRecorder()
    for dpt, entropy in ((1.0, 0.5), (1.5, 0.7)):
        stats = MoEStats(load_N=torch.tensor([3.0, 1.0, 2.0, 2.0]), aux_loss=torch.tensor(0.0))
        stats.devices_per_token, stats.router_entropy = torch.tensor(dpt), torch.tensor(entropy)
        record_moe(rec, {1: stats})
    reduced = rec.reduce(ParallelContext())
    out = moe_log_metrics(reduced, reduced.host(), [1], {1: 2})
    assert out["moe/layer_1/devices_per_token"] == pytest.approx(1.25)
    assert out["moe/layer_1/router_entropy"] == pytest.approx(0.6)
    assert out["moe/layer_1/load"] == [6, 2, 4, 4]  # loads are sums


def test_mfu_divides_by_every_rank_peak() -> None:
    """Catches MFU over one device's peak while tokens/s counts the whole job (a 2-rank run logged 100% where
    each rank ran at 50%): 1000 tokens/s x 6e9 FLOPs/token is 6 TFLOP/s, over 2 ranks of 6 TFLOP/s = 0.5."""
    from moetrain.train.flops import mfu

    assert mfu(1000.0, 6e9, 6.0, 2) == pytest.approx(0.5)
    assert mfu(1000.0, 6e9, 6.0, 1) == pytest.approx(1.0)
