"""A newcomer's defaults (issue 31): one config that runs on any number of ranks, threads that fit the CPUs
the process may use, and tools that print sizes a person can read."""

from __future__ import annotations

import pytest

from moetrain.config import ConfigError, TrainConfig, default_threads, micro_batch_for, validate, with_micro_batch
from moetrain.config_docs import composed_defaults


@pytest.mark.unit
@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_default_and_smoke_configs_validate_unchanged_on_1_2_and_4_ranks(world):
    """Before: ``micro_batch_size: 16`` with ``global_batch_size: 16`` refused two ranks, so every multi-rank
    command needed a hand-set micro-batch. Catches a default micro-batch that does not follow the world size."""
    for overrides in ([], ["experiment=smoke"]):
        cfg = with_micro_batch(composed_defaults(overrides), world)
        validate(cfg, world_size=world)
        t = cfg.trainer
        assert t.global_batch_size % (t.micro_batch_size * world) == 0
    assert with_micro_batch(composed_defaults([]), world).trainer.micro_batch_size == 16 // world


@pytest.mark.unit
def test_an_unset_micro_batch_is_each_ranks_share_and_a_global_batch_that_does_not_split_is_one_line():
    """Catches an unset micro-batch resolved to the global batch (accumulating nothing but refusing W>1), and
    an uneven global batch that reaches the loader (silently dropping sequences) instead of one line."""
    t = TrainConfig().trainer
    assert t.micro_batch_size is None
    assert [micro_batch_for(t, w) for w in (1, 2, 4, 8, 16)] == [16, 8, 4, 2, 1]
    t.global_batch_size = 6
    with pytest.raises(ConfigError, match=r"^trainer.global_batch_size=6: must be divisible by the world size=4"):
        micro_batch_for(t, 4)
    cfg = TrainConfig()
    cfg.trainer.micro_batch_size = 16
    with pytest.raises(ConfigError, match=r"set trainer.micro_batch_size to a divisor of 8 .* or unset it"):
        validate(cfg, world_size=2)


@pytest.mark.unit
def test_default_threads_share_the_cpus_of_the_affinity_mask_between_the_local_ranks(monkeypatch):
    """Before: torch's default counted the machine's cores (a shared 2-core slice ran 5x slower). Catches a
    default above the CPUs the process may use, or one per rank that oversubscribes them under torchrun."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert [default_threads(n) for n in (1, 2, 4, 8)] == [4, 2, 1, 1]
