"""Every command the README and the pages under ``docs/`` show runs as written: the short ones are run, a training
command's overrides are composed and validated (what ``moetrain-train`` does before any work), and the long ones
(installs, multi-GPU, full runs) are listed here by name, so a new command on any page must be classified.
``scripts/newcomer_check.sh`` runs the long path end to end."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
"""The README and every topic page: their commands are checked alike."""
README = "\n".join(page.read_text() for page in PAGES)

LONG = (
    "scripts/setup.sh",  # installs (newcomer_check.sh, wheel_check.sh)
    "torchrun ",  # multi-rank jobs (tests/parallel/test_ep.py, test_faults.py, ...)
    "deepspeed ",
    "scripts/launch_",
    "scripts/smoke_gloo_ranks.sh",
    "sbatch ",
    "docker ",
    "python scripts/",  # benchmarks and comparisons (minutes)
    ".venv/bin/python -m pytest",
    "moetrain-export --from-hf ./DeepSeek",  # a downloaded checkpoint: tests/hf/ round-trips tiny ones
    "moetrain-export runs/v2lite_cpt",
    "moetrain-inspect runs/",  # needs a trained run: scripts/newcomer_check.sh inspects one
    "moetrain-train -m ",  # sweeps: composed below, run by tests/launch/test_*sweep*.py and newcomer_check.sh
)
"""Command prefixes not run here, and where they are exercised instead."""
PLACEHOLDER = re.compile(r"<[a-z]+>|\.\.\.|my_ds\.json|OUT_DIR|HF_DIR|runs/big")


def bash_commands(text: str) -> list[str]:
    """The commands of every ```bash block: continuation lines joined, trailing comments dropped."""
    out: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.split(r"\s{2,}#|^#", line)[0].strip()
            if line:
                out.append(line)
    return out


def train_overrides(cmd: str) -> list[str] | None:
    """The overrides of a ``moetrain-train`` command (first value of each swept list), else ``None``."""
    words = shlex.split(cmd)
    if not words or words[0] != "moetrain-train" or "--help" in words or "--config-path" in words:
        # --help: tests/config/test_key_reference.py; --config-path: an imported checkpoint's config
        # (tests/hf/ trains from one)
        return None
    words = [w for w in words[1:] if w not in ("-m", "--multirun") and not w.startswith("hydra")]
    return [w.split(",")[0] if "," in w and "[" not in w else w for w in words]


def world_size(cmd: str, ep: int) -> int:
    """Ranks the command runs on: a torchrun sweep's ``nproc_per_node x nnodes``, else what ``parallel.ep`` needs."""
    nproc = re.search(r"hydra\.launcher\.nproc_per_node=(\d+)", cmd)
    nodes = re.search(r"hydra\.launcher\.nnodes=(\d+)", cmd)
    if nproc:
        return int(nproc.group(1)) * (int(nodes.group(1)) if nodes else 1)
    return max(ep, 1)


def test_every_page_is_read_and_links_to_pages_that_exist():
    """Catches a topic page left out of the checks (a glob that finds nothing) and a link to a page or picture
    that was moved or never written."""
    assert len(PAGES) >= 10
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")) and not (page.parent / target).exists():
                missing.append(f"{page.relative_to(REPO)} -> {target}")
    assert missing == []


def test_every_readme_command_is_classified():
    commands = bash_commands(README)
    assert len(commands) > 20
    unknown = [
        c
        for c in commands
        if not c.startswith(LONG)
        and train_overrides(c) is None
        and not c.startswith(("moetrain-plan ", "moetrain-train"))
        and not PLACEHOLDER.search(c)
    ]
    assert unknown == [], "classify these README commands in tests/e2e/test_readme.py"


def test_every_readme_training_command_composes_and_validates():
    from moetrain.config import validate
    from moetrain.config.docs import composed_defaults

    checked = 0
    for cmd in bash_commands(README):
        overrides = train_overrides(cmd)
        if overrides is None or PLACEHOLDER.search(cmd):  # e.g. engine.config_json=my_ds.json: the user's file
            continue
        cfg = composed_defaults(overrides)
        validate(cfg, world_size=world_size(cmd, cfg.parallel.ep))
        checked += 1
    assert checked >= 12


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "MOETRAIN_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_the_readme_config_error_example_prints_what_it_shows(tmp_path):
    shown = re.search(r"\$ moetrain-train (model\.dim=250)\n(moetrain: config error: .*)\n", README)
    assert shown is not None
    proc = cli(["-m", "moetrain.train", shown.group(1)], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == shown.group(2)


@pytest.mark.e2e
def test_the_readme_plan_command_runs(tmp_path):
    commands = [c for c in bash_commands(README) if c.startswith("moetrain-plan ")]
    assert len(commands) >= 2
    for cmd in commands:
        proc = cli(["-m", "moetrain.tools.plan", *shlex.split(cmd)[1:]], tmp_path)
        assert proc.returncode == 0, (cmd, proc.stderr[-2000:])
        assert "active" in proc.stdout.lower()


@pytest.mark.e2e
def test_the_readme_python_snippet_runs_as_written(tmp_path, monkeypatch):
    # the Python API's example; docs/architecture.md's snippets are fragments of modules (a new strategy's file)
    (snippet,) = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "configuration.md").read_text(), re.S)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOETRAIN_CACHE", str(tmp_path / "cache"))
    exec(compile(snippet, "docs/configuration.md", "exec"), {})
    assert (tmp_path / "runs" / "api" / "summary.json").is_file()
