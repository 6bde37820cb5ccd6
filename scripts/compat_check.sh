#!/usr/bin/env bash
# The fast suite (tests marked unit or parity) on the oldest torch that pyproject.toml admits, in its own venv.
#
#   scripts/compat_check.sh                   # venv .venv-compat, torch at pyproject.toml's floor
#   scripts/compat_check.sh -x -k fsdp        # extra arguments go to pytest
#   TORCH_SPEC=torch==2.12.1 VENV=.venv-2.12 scripts/compat_check.sh   # another version
#
# PyPI's Linux wheels of torch are CUDA builds: the first run downloads about 3 GB (torch and the nvidia-*
# libraries) and the venv takes about 6 GB; later runs reuse the venv. The floor is the version the suite
# passed on last (the GPU machine's own torch); it is not part of CI, which runs the pinned torch of
# scripts/setup.sh. Numbers: docs/performance.md, "Supported torch versions".
set -euo pipefail
cd "$(dirname "$0")/.."
floor=$(sed -nE 's/^ *"torch>=([0-9.]+)".*/\1/p' pyproject.toml | head -n 1)
[ -n "$floor" ] || { echo "compat_check: no \"torch>=X\" floor in pyproject.toml" >&2; exit 2; }
spec=${TORCH_SPEC:-torch==$floor}
venv=${VENV:-.venv-compat}
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "$spec"
"${pip[@]}" --config-settings editable_mode=compat -e ".[dev,transformers,plot,deepspeed]" "$spec"
"$venv/bin/python" -c 'import torch; print("compat_check: torch", torch.__version__)'
CI= "$venv/bin/python" -m pytest -q -m "unit or parity" -p no:cacheprovider "$@"
