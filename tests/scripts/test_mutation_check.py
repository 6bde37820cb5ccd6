"""scripts/mutation_check.py cannot rot silently: every mutation's anchor still applies (checked here, in CI),
a stale one stops the script before it runs anything, and one sampled fast mutation is caught."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load("mutation_check")


@pytest.mark.unit
def test_every_mutation_applies_and_every_package_is_covered(script):
    """Catches a source change that moves a mutation's anchor (the mutation would silently stop applying) and
    a package left without a planted bug."""
    assert script.anchor_problems(script.MUTATIONS) == []
    assert {m.package for m in script.MUTATIONS} == {"moe", "parallel", "train", "data", "hf", "model", "config"}
    assert sum(m.fast for m in script.MUTATIONS) >= 5


@pytest.mark.unit
def test_a_stale_anchor_fails_the_script_before_anything_runs(script, monkeypatch, capsys):
    """Catches the old failure mode: a stale mutation raising mid-run (after minutes of others, no summary)."""
    good = script.MUTATIONS[0]
    stale = script.Mutation("stale", "moe", "gone", (("moetrain/moe/layer.py", "no such text", "x"),), good.tests)
    missing = script.Mutation("missing", "moe", "gone", (("moetrain/nowhere.py", "a", "b"),), ("tests/nowhere.py",))
    monkeypatch.setattr(script, "MUTATIONS", [good, stale, missing])
    monkeypatch.setattr(script, "check", lambda *a: pytest.fail("a mutation ran despite stale anchors"))
    assert script.main(["--only", good.name]) == 2
    err = capsys.readouterr().err
    assert "3 stale mutation anchor(s)" in err
    assert "stale: moetrain/moe/layer.py holds 0 copies (1 needed) of the anchor 'no such text'" in err
    assert "missing: moetrain/nowhere.py does not exist" in err and "missing: test file tests/nowhere.py" in err


@pytest.mark.unit
def test_edits_of_one_file_apply_in_order(script, tmp_path):
    (tmp_path / "a.py").write_text("x = 1\ny = 2\n")
    (tmp_path / "t.py").write_text("")
    m = script.Mutation("two", "moe", "", (("a.py", "x = 1", "x = 3"), ("a.py", "x = 3\ny", "x = 4\ny")), ("t.py",))
    texts, problems = script.mutated_texts(tmp_path, m)
    assert problems == [] and texts == {"a.py": "x = 4\ny = 2\n"}


@pytest.mark.e2e
def test_anchors_only_mode_and_one_sampled_fast_mutation_is_caught():
    """The CI mode: ``--anchors-only`` exits 0; ``--sample`` plants one fast mutation (the day's) in a copy and
    its tests catch it."""
    run = [sys.executable, str(SCRIPTS / "mutation_check.py")]
    anchors = subprocess.run([*run, "--anchors-only"], capture_output=True, text=True, cwd=REPO)
    assert anchors.returncode == 0 and "mutations apply (7 packages)" in anchors.stdout, anchors.stderr
    sampled = subprocess.run([*run, "--sample"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert sampled.returncode == 0 and "1/1 mutations caught" in sampled.stdout, sampled.stdout + sampled.stderr
