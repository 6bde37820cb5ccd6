"""Optional packages skip single tests, never whole modules; under CI=true an unexpected skip fails the run.

Before, ``test_deepspeed.py`` and ``test_export.py`` skipped at module level when
their package failed to import, taking the tests that never use it along, and
CI (which installs every extra) would have passed with them silently skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BLOCKED = ("deepspeed", "transformers", "safetensors", "matplotlib")

# Runs pytest with the optional packages made unimportable (a None entry in sys.modules raises ImportError).
BLOCKING_RUNNER = (
    f"import sys, pytest\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\nsys.exit(pytest.main(sys.argv[1:]))\n"
)


def pytest_run(args: list[str], cwd: Path, ci: bool, runner: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("CI", None)
    if ci:
        env["CI"] = "true"
    cmd = [sys.executable, "-c", runner, *args] if runner else [sys.executable, "-m", "pytest", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_missing_optional_packages_skip_only_the_tests_that_use_them():
    files = ["tests/train/test_deepspeed.py", "tests/tools/test_export.py", "tests/tools/test_plot.py"]
    proc = pytest_run(["-q", "-rA", "-m", "unit", "-p", "no:cacheprovider", *files], REPO, False, BLOCKING_RUNNER)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    passed = "\n".join(line for line in proc.stdout.splitlines() if line.startswith("PASSED"))
    skipped = "\n".join(line for line in proc.stdout.splitlines() if line.startswith("SKIPPED"))
    for name in (  # tests that need no optional package still run
        "test_generated_config_follows_the_hydra_keys",
        "test_user_json_overrides_generated_keys",
        "test_deepspeed_launcher_local_rank_flag_is_stripped",
        "test_rope_permutation_maps_interleaved_pairs_to_halves",
        "test_unmappable_models_are_refused_with_one_line",
        "test_plot_data_extraction",
    ):
        assert name in passed, name
    assert "needs the deepspeed extra" in skipped and "needs the plot extra" in skipped


SYNTHETIC = """
import pytest


@pytest.mark.cuda
def test_cuda_marked_skip():
    pytest.skip("no device here")


def test_gpu_reason_skip():
    pytest.skip("needs a CUDA GPU")


@pytest.mark.xfail(strict=True, reason="a known bug")
def test_known_bug():
    assert False


def test_runs():
    pass
"""


def test_ci_true_fails_on_unexpected_skips_only(tmp_path):
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_synthetic.py").write_text(SYNTHETIC)
    body = 'def test_needs_missing():\n    pytest.importorskip("no_such_package_one")\n'
    (tmp_path / "test_missing.py").write_text("import pytest\n\n\n" + body)
    body = 'pytest.importorskip("no_such_package_two")\n\n\ndef test_a():\n    pass\n'
    (tmp_path / "test_module_skip.py").write_text("import pytest\n\n" + body)
    args = ["-q", "-rA", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning"]
    relaxed = pytest_run([*args, "."], tmp_path, ci=False)
    assert relaxed.returncode == 0 and "4 skipped" in relaxed.stdout, relaxed.stdout[-2000:]
    # cuda-marked and CUDA/GPU-reason skips are expected under CI; an xfail is not a skip
    strict = pytest_run([*args, "test_synthetic.py"], tmp_path, ci=True)
    assert strict.returncode == 0, strict.stdout[-2000:]
    assert "2 skipped" in strict.stdout and "1 xfailed" in strict.stdout
    # a skipped test and a skipped module each fail the run, naming the reason
    strict = pytest_run([*args, "--continue-on-collection-errors", "test_missing.py", "test_module_skip.py"],
                        tmp_path, ci=True)  # fmt: skip
    assert strict.returncode == 1, strict.stdout[-2000:]
    assert "unexpected skip under CI=true" in strict.stdout and "no_such_package_one" in strict.stdout
    assert "unexpected module skip under CI=true" in strict.stdout and "no_such_package_two" in strict.stdout
