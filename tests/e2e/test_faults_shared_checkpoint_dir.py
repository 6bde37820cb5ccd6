"""Fault injection: two live runs on one ``checkpoint.dir`` (issue 27). The second is refused in one line naming the
first, before it writes anything; the first trains, saves and stops on SIGTERM untouched.

Failed on main before this change: the second run (same config, another run_dir) resumed the first one's newest
checkpoint, deleted its ``step_*.tmp`` staging directory mid-save and pruned its checkpoints.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from moetrain.train.checkpoint import complete_checkpoints
from tests.conftest import cli_corpus_overrides
from tests.train.test_guards_and_refusals import TINY_CLI, error_lines


@pytest.mark.e2e
def test_a_second_live_run_on_the_same_checkpoint_dir_is_refused_and_the_first_is_untouched(tmp_path):
    """Catches an unlocked shared ``checkpoint.dir`` (main: run B resumed run A's checkpoints and pruned them)."""
    shared = tmp_path / "shared_ckpts"
    common = [
        sys.executable,
        "-m",
        "moetrain.train",
        *TINY_CLI,
        *cli_corpus_overrides(tmp_path),
        f"checkpoint.dir={shared}",
        "checkpoint.every=1",
        "checkpoint.keep_last=3",
        "trainer.max_steps=100000",
    ]
    first = subprocess.Popen(
        [*common, f"run_dir={tmp_path / 'run_a'}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 240
        while not complete_checkpoints(shared):
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "run A wrote no checkpoint in time"
            time.sleep(0.5)
        second = subprocess.run(
            [*common, f"run_dir={tmp_path / 'run_b'}"], cwd=tmp_path, capture_output=True, text=True, timeout=240
        )
        assert first.poll() is None  # A was alive throughout B's attempt
        lines = error_lines(second)
        assert second.returncode == 2, second.stderr[-3000:]
        assert len(lines) == 1 and f"checkpoint.dir {shared}: in use by another run (pid {first.pid} on " in lines[0]
        assert not (tmp_path / "run_b").exists()  # refused before writing: not even its lock file is left
    finally:
        first.send_signal(signal.SIGTERM)  # A saves at the next step boundary and exits 143
        _, err = first.communicate(timeout=240)
    assert first.returncode == 143, err[-3000:]
    steps = [step for step, _ in complete_checkpoints(shared)]
    assert 1 <= len(steps) <= 3 and steps == sorted(steps)
    for _, path in complete_checkpoints(shared):
        meta = json.loads((path / "meta.json").read_text())
        assert meta["config"]["run_dir"] == str(tmp_path / "run_a")
    assert not list(shared.glob("step_*.tmp"))
