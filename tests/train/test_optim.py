"""The learning-rate schedule (``moetrain.train.optim``) against hand-computed values: linear warmup to the peak,
then cosine decay to ``min_lr_ratio`` at ``max_steps``, held there after it."""

from __future__ import annotations

import math

import pytest
import torch

from moetrain.config import OptimConfig
from moetrain.train.optim import build_scheduler, lr_multiplier

pytestmark = pytest.mark.unit


def test_warmup_and_cosine_multipliers_are_the_hand_computed_ones():
    """Catches a warmup off by one (step 0 at rate 0: a wasted first step), a cosine that does not start at the
    peak or does not reach ``min_lr_ratio`` at ``max_steps`` (a wrong decay length), and a rate that turns back
    up after ``max_steps`` (progress not clamped). Warmup 4, max 12, min_lr_ratio 0.1: the steps taken 0-3 warm
    up as 1/4 .. 4/4, step 4 is the peak, step 8 half way down the cosine (0.1 + 0.9 x 0.5 = 0.55), 12 is 0.1."""
    cfg = OptimConfig(warmup_steps=4, min_lr_ratio=0.1)
    expected = {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0, 6: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)),
                8: 0.55, 12: 0.1, 20: 0.1}  # fmt: skip
    for step, want in expected.items():
        assert lr_multiplier(step, cfg, max_steps=12) == pytest.approx(want, rel=1e-12), step
    no_warmup = OptimConfig(warmup_steps=0, min_lr_ratio=0.0)
    assert [lr_multiplier(s, no_warmup, max_steps=4) for s in (0, 2, 4)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)


def test_the_scheduler_gives_each_step_its_multiplier_times_the_peak():
    """Catches the scheduler stepping the multiplier at the wrong time (the first optimizer step taken at the
    second step's rate) or scaling by something other than ``optim.lr``."""
    cfg = OptimConfig(lr=0.5, warmup_steps=2, min_lr_ratio=0.2)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, max_steps=6)
    rates = []
    for _ in range(7):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cosine = [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * p / 4)) for p in range(5)]
    assert rates == pytest.approx([0.5 * m for m in [0.5, 1.0, *cosine]], rel=1e-12)
