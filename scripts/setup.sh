#!/usr/bin/env bash
# Create .venv and install moetrain into it. Usage: scripts/setup.sh [EXTRAS]
#   scripts/setup.sh          # the trainer
#   scripts/setup.sh dev      # + test/lint tools and every optional extra (transformers, plot, deepspeed, slurm)
# torch is installed first, pinned (TORCH_SPEC, default torch==2.13.0), so that pip
# never resolves a bare `torch` requirement to a multi-GB build you did not ask for.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
# Editable "compat" mode puts the checkout on sys.path (as CI tests it). Every other install mode works too:
# `pip install -e .`, `pip install .` and the wheel (tests/e2e/test_install.py, scripts/wheel_check.sh).
editable=(--config-settings editable_mode=compat -e)
case "${1:-}" in
  "") "${pip[@]}" "${editable[@]}" . ;;
  dev) "${pip[@]}" "${editable[@]}" ".[dev,transformers,plot,deepspeed,slurm]" ;;
  *) "${pip[@]}" "${editable[@]}" ".[$1]" ;;
esac
