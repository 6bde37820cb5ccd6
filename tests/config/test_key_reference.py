"""``moetrain-train --help`` and the key reference in docs/configuration.md come from the config dataclasses."""

from __future__ import annotations

from pathlib import Path

import pytest

from moetrain.config import TrainConfig, config_keys
from moetrain.config.docs import BEGIN, END, composed_defaults, key_docs, readme_reference
from moetrain.train.cli import print_help

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.unit
def test_every_key_has_a_docstring():
    missing = [k.key for k in key_docs(TrainConfig()) if not k.doc]
    assert missing == []
    assert {k.key for k in key_docs(TrainConfig())} == config_keys(TrainConfig())


@pytest.mark.unit
def test_help_lists_every_key_with_its_composed_default_and_doc(capsys):
    assert print_help(["moe=deepseek_v3", "trainer.max_steps=7", "--help"]) == 0
    out = capsys.readouterr().out
    for k in key_docs(TrainConfig()):
        assert f"  {k.key}=" in out, k.key
    for line in ("  moe.num_experts=32", "  trainer.max_steps=7", "  trainer.progress=true", "  checkpoint.every=100"):
        assert line in out.splitlines()
    assert "Show a console progress bar." in out and "AdamW beta1" in out
    assert "powered by Hydra" not in out


@pytest.mark.unit
def test_help_with_a_bad_override_is_one_line(capsys):
    assert print_help(["moe=nope", "--help"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "moe/nope" in err


@pytest.mark.unit
def test_readme_key_reference_is_the_generated_one():
    """Regenerate with: python -m moetrain.config.docs --write docs/configuration.md"""
    readme = (REPO / "docs" / "configuration.md").read_text()
    assert BEGIN in readme and END in readme
    current = readme[readme.index(BEGIN) : readme.index(END) + len(END)]
    assert current == readme_reference(composed_defaults())
    for key in (
        "trainer.progress",
        "trainer.num_threads",
        "trainer.compile",
        "checkpoint.every",
        "trainer.peak_tflops",
    ):
        assert f"| `{key}` |" in current
