"""Every install mode gives the console scripts and a sweep launcher Hydra can instantiate.

Each test makes a fresh venv whose only link to this interpreter's packages is a ``.pth`` line naming its
site-packages directory (torch, hydra, ... without reinstalling them; that directory's own ``.pth`` files, such
as a source checkout's editable install, are not run), installs moetrain from this checkout in one mode with
``--no-deps``, and runs from outside the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ("moetrain-train", "moetrain-export", "moetrain-sweep-summary", "moetrain-plot", "moetrain-inspect")

CHECK = """
import moetrain, moetrain.tools.export, moetrain.hf.mapping, moetrain.train.cli
from hydra.core.plugins import Plugins
from omegaconf import OmegaConf
from moetrain.launch.torchrun import TorchrunLauncherConf
launcher = Plugins.instance()._instantiate(OmegaConf.structured(TorchrunLauncherConf))
assert type(launcher).__name__ == "TorchrunLauncher", launcher
assert "{repo}" not in moetrain.__file__ or {editable}, moetrain.__file__
print("ok", moetrain.__file__)
"""


def fresh_venv(root: Path) -> Path:
    """A venv seeing (pip and setuptools included) interpreter's site-packages through a ``.pth`` line; its python."""
    venv.EnvBuilder(with_pip=False).create(root)  # pip, setuptools: through the .pth line
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "_moetrain_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def build_isolation() -> list[str]:
    """``--no-build-isolation`` when this interpreter's setuptools builds moetrain (>= 70: bdist_wheel built in),
    so nothing is downloaded; else pip's isolated build environment."""
    try:
        import setuptools
    except ImportError:
        return []
    return ["--no-build-isolation"] if int(setuptools.__version__.split(".")[0]) >= 70 else []


def pip_install(python: Path, *args: str) -> None:
    cmd = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps"]
    proc = subprocess.run([*cmd, *build_isolation(), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def build_wheel(out: Path) -> Path:
    """``pip wheel`` of this checkout into ``out``; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *build_isolation(), "-w", str(out)]
    proc = subprocess.run([*cmd, str(REPO)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(out.glob("moetrain-*.whl"))


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["editable", "source", "wheel"])
def test_every_install_mode_has_the_scripts_and_the_torchrun_launcher(tmp_path, mode):
    """Default ``pip install -e .`` used to answer ``Unknown plugin class: hydra_plugins.moetrain_launcher...``."""
    python = fresh_venv(tmp_path / "venv")
    if mode == "editable":
        pip_install(python, "-e", str(REPO))
    elif mode == "source":
        pip_install(python, str(REPO))
    else:
        pip_install(python, "--force-reinstall", str(build_wheel(tmp_path / "dist")))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = CHECK.format(repo=REPO, editable=mode == "editable")
    proc = subprocess.run([str(python), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    for script in SCRIPTS:
        assert (tmp_path / "venv" / "bin" / script).is_file(), script
    helped = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "moetrain-sweep-summary"), "--help"], env=env, capture_output=True
    )
    assert helped.returncode == 0
