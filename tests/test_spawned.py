"""tests/helpers/spawned.py: a spawn that fails as a whole is run once; its dependants fail at once with its cause."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import spawned

pytestmark = pytest.mark.unit


def _check(rank: int, world: int, tmp: str) -> int:
    return rank


def test_a_failed_spawn_is_recorded_once_and_fails_every_dependant_with_its_cause(monkeypatch):
    """Catches the harness re-spawning (and waiting out its 300 s timeout again) for every test that needs a
    world size whose spawn already failed: 31 minutes for one planted bug."""
    calls: list[int] = []

    def failing_spawn(fn: Any, world: int, *args: Any) -> list[Any]:
        calls.append(world)
        raise RuntimeError("rank 1 failed:\nboom in a collective")

    monkeypatch.setattr(spawned, "run_distributed", failing_spawn)
    monkeypatch.setattr(spawned, "CHECKS", {})
    monkeypatch.setattr(spawned, "_RESULTS", {})
    monkeypatch.setattr(spawned, "_FAILED", {})
    spawned.register(3, "first", _check)
    spawned.register(3, "second", _check)
    for name in ("first", "second", "first"):
        with pytest.raises(spawned.SpawnFailed, match=rf"(?s)^{name}: the 3-rank spawn failed.*boom in a collective"):
            spawned.result(3, name)
    assert calls == [3]  # spawned once, not once per dependant


def test_a_check_that_raises_fails_only_its_own_test(monkeypatch):
    """The spawn itself succeeded: a check's exception is that check's failure, not a recorded spawn failure."""
    monkeypatch.setattr(spawned, "CHECKS", {})
    monkeypatch.setattr(spawned, "_RESULTS", {})
    monkeypatch.setattr(spawned, "_FAILED", {})
    monkeypatch.setattr(
        spawned, "run_distributed", lambda fn, world, *args: [fn(r, world, *args) for r in range(world)]
    )

    def bad(rank: int, world: int, tmp: str) -> int:
        raise ValueError(f"wrong on rank {rank}")

    spawned.register(2, "good", _check)
    spawned.register(2, "bad", bad)
    assert spawned.result(2, "good") == [0, 1]
    with pytest.raises(AssertionError, match=r"(?s)rank 1: .*wrong on rank 1"):
        spawned.result(2, "bad")
    assert spawned._FAILED == {}


def test_the_shared_corpus_is_rewritten_atomically_and_only_when_it_changed(tmp_path, monkeypatch):
    """The checks of one spawn (both ranks, every case) write the same corpus under one ``tmp`` while the other
    rank tokenises it. Catches the old ``write_text`` (truncate, then write): a rewrite changed the files' mtime,
    part of the data cache's key, and a reader could catch a document half written (the suspected cause of
    ``test_fsdp_steps_equal_the_replicated_run[2-ep2]`` failing only under load: step-1 loss 0.07% off)."""
    from pathlib import Path

    from tests.conftest import write_corpus

    paths = [Path(p) for p in write_corpus(tmp_path, n_docs=2)]
    stamps = [p.stat().st_mtime_ns for p in paths]
    truncated: list[str] = []
    real_write_text = Path.write_text

    def watched(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if self in paths:  # written in place: a reader may see it empty or half written
            truncated.append(self.name)
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", watched)
    assert [Path(p) for p in write_corpus(tmp_path, n_docs=2)] == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps  # unchanged text: untouched
    real_write_text(paths[0], "damaged")
    write_corpus(tmp_path, n_docs=2)
    assert truncated == [] and paths[0].read_text() != "damaged"  # replaced whole, by a rename
    assert not list(tmp_path.glob(".*.tmp"))
