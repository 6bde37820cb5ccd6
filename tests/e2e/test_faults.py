"""Fault injection: 10 seeded 2-rank jobs lose a rank at random points (after a step, during a save, in the
first step after a resume); every restarted job resumes from the newest *complete* checkpoint and ends
with the uninterrupted job's metrics, bitwise. The jobs run under ``tests/helpers/fault_driver.py``."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from moetrain.config import to_dict
from moetrain.train.checkpoint import complete_checkpoints
from tests.train.checkpoint.test_checkpoint import ckpt_config, records

SEEDS = range(10)
SAVE_EVERY = 2
MAX_STEPS = 6


def plan(seed: int) -> tuple[str, list[int]]:
    """``MOETRAIN_FAULTS`` of run ``seed`` and the step each restarted attempt must resume from (0 = afresh).

    Odd seeds die during a save (data written, not published), even seeds after a step; every third seed's
    restarted job loses a rank again in its first step after the resume.
    """
    rng = random.Random(seed)
    if seed % 2:
        step = rng.choice(range(SAVE_EVERY, MAX_STEPS + 1, SAVE_EVERY))
        faults, resumed = [f"0:during_save:{step}:{rng.randrange(2)}"], step - SAVE_EVERY
    else:
        step = rng.randrange(1, MAX_STEPS)
        faults, resumed = [f"0:after_step:{step}:{rng.randrange(2)}"], step - step % SAVE_EVERY
    expected = [resumed]
    if seed % 3 == 0:
        faults.append(f"1:after_step:{resumed + 1}:{rng.randrange(2)}")
        expected.append(resumed)
    return ",".join(faults), expected


def resumed_step(lines: list[str]) -> int:
    """The step of the one "resumed from ... at step N" line (0: the attempt started afresh)."""
    assert len(lines) <= 1, lines
    return int(lines[0].rsplit("at step ", 1)[1]) if lines else 0


@pytest.mark.unit
def test_plans_cover_every_kind_of_fault():
    plans = [plan(s)[0] for s in SEEDS]
    assert sum("during_save" in p for p in plans) == 5 and sum(p.startswith("0:after_step") for p in plans) == 5
    assert sum(",1:after_step" in p for p in plans) == 4 and len(set(plans)) >= 8


@pytest.fixture(scope="module")
def fault_jobs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("faults")
    cfg = ckpt_config(tmp, max_steps=MAX_STEPS, every=SAVE_EVERY, micro_batch_size=4)
    cfg.parallel.ep = 2
    cfg.trainer.eval_every = 3
    jobs = {"straight": "", **{f"seed{s}": plan(s)[0] for s in SEEDS}}
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"cfg": to_dict(cfg), "jobs": jobs}))
    driver = Path(__file__).absolute().parents[1] / "helpers" / "fault_driver.py"
    proc = subprocess.run([sys.executable, str(driver), str(spec)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
@pytest.mark.parametrize("seed", SEEDS)
def test_killed_rank_resumes_from_the_newest_complete_checkpoint_bitwise(fault_jobs, seed):
    tmp, results = fault_jobs
    faults, expected = plan(seed)
    attempts = results[f"seed{seed}"]
    assert [a["codes"] for a in results["straight"]] == [[0, 0]]
    assert len(attempts) == len(expected) + 1, (faults, [a["log_tail"] for a in attempts])
    for attempt in attempts[:-1]:
        assert 17 in attempt["codes"], (faults, attempt["log_tail"])  # the planned fault, no other failure
    assert attempts[-1]["codes"] == [0, 0], attempts[-1]["log_tail"]
    assert resumed_step(attempts[0]["resumed"]) == 0
    assert [resumed_step(a["resumed"]) for a in attempts[1:]] == expected, faults  # never a partial save
    run = tmp / f"seed{seed}"
    assert records(run) == records(tmp / "straight")
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [4, 6]
    assert not list((run / "checkpoints").glob("*.tmp"))
