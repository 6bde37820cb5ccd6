#!/usr/bin/env bash
# CI: build the wheel, install it into a fresh venv, and run a 2-job torchrun sweep from it (tiny, CPU).
#   scripts/wheel_check.sh            # uses .venv (scripts/setup.sh) for the dependencies
# The fresh venv sees .venv's site-packages through one .pth line (torch, hydra, ... are not reinstalled;
# .venv's own editable moetrain is not active there), and runs from outside the checkout, so every import
# of moetrain, the console scripts and the hydra_plugins launcher come from the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=${PYTHON:-$repo/.venv/bin/python}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moetrain-wheel.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# Build with .venv's setuptools when it is recent enough (no download), else in pip's isolated build env.
isolation=()
"$py" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 70)' 2>/dev/null \
  && isolation=(--no-build-isolation)
"$py" -m pip wheel --quiet --disable-pip-version-check --no-deps "${isolation[@]}" -w "$tmp/dist" .
"$py" -m venv --without-pip "$tmp/venv"
deps=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
site=$("$tmp/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$deps" > "$site/_moetrain_deps.pth"
"$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$tmp"/dist/moetrain-*.whl
cd "$tmp"
export WANDB_MODE=offline WANDB_SILENT=true MOETRAIN_CACHE="$tmp/cache"
"$tmp/venv/bin/python" -c 'import moetrain, sys; sys.exit("moetrain imported from the checkout" if sys.argv[1] in moetrain.__file__ else 0)' "$repo"
"$tmp/venv/bin/moetrain-train" -m hydra/launcher=torchrun hydra.launcher.nproc_per_node=2 hydra.launcher.max_parallel=1 \
    hydra.sweep.dir="$tmp/sweep" experiment=smoke parallel.ep=2 trainer.max_steps=4 trainer.eval_every=0 \
    data.max_val_sequences=8 optim.lr=1e-3,3e-3
"$tmp/venv/bin/moetrain-sweep-summary" "$tmp/sweep"
test "$(grep -c completed "$tmp/sweep/summary.md")" -eq 2
echo "wheel_check: OK (wheel installed in a fresh venv, 2-job torchrun sweep completed)"
