"""The micro-batch a config leaves unset (``trainer.micro_batch_size=null``): each rank's share, and under
pipeline parallelism a split of the pipeline's share that every schedule can run."""

from __future__ import annotations

import dataclasses

import pytest

from moetrain.config import TrainConfig, validate, with_micro_batch
from moetrain.config.world import pipeline_micro_batch


@pytest.mark.parametrize(
    ("share", "pp", "micro"),
    [
        (16, 2, 2),  # 8 micro-batches: a multiple of 2, 4 per stage
        (16, 4, 1),  # 16 = 4 per stage at micro-batch 1
        (64, 4, 4),  # 16 micro-batches
        (12, 2, 1),  # 12 micro-batches of 1 (6 of 2 would be under 4 per stage)
        (6, 4, 1),  # no split reaches 4 per stage: the most micro-batches (validation judges them)
    ],
)
def test_pipeline_micro_batch_hand_computed(share: int, pp: int, micro: int) -> None:
    """Catches a default that leaves a pipeline one micro-batch (refused by 1F1B) or a count that is not a
    multiple of pp (refused by the interleaved schedules)."""
    assert pipeline_micro_batch(share, pp) == micro


SCHEDULES = ["gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble", "zbv"]
# the default model's 4 blocks take at most 4 stages: PP=4 only with one stage per rank
LAYOUTS = [(w, 2, s) for w in (2, 4) for s in SCHEDULES] + [(4, 4, "gpipe"), (4, 4, "1f1b")]


@pytest.mark.parametrize(("world", "pp", "schedule"), LAYOUTS)
def test_the_default_micro_batch_validates_under_every_schedule(world: int, pp: int, schedule: str) -> None:
    """Catches the null default resolved over all ranks instead of the pipelines (one micro-batch per pipeline),
    which config validation refuses: the default config must train at any PP layout the world allows."""
    cfg = TrainConfig()
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, pp=pp, pp_schedule=schedule))
    resolved = with_micro_batch(cfg, world)
    validate(cfg, world_size=world)  # unresolved, as the CLI validates it
    validate(resolved, world_size=world)
    share = cfg.trainer.global_batch_size // (world // pp)
    m = share // resolved.trainer.micro_batch_size
    assert m % pp == 0 and m >= min(4 * pp, share)


def test_without_pipeline_the_default_is_the_rank_share() -> None:
    """Catches the pipeline split leaking into runs without PP (their accumulation would change)."""
    assert with_micro_batch(TrainConfig(), 4).trainer.micro_batch_size == TrainConfig().trainer.global_batch_size // 4
