#!/usr/bin/env bash
# One node, N ranks: torchrun --standalone (env:// rendezvous on localhost).
#
#   scripts/launch_single_node.sh 8 parallel.ep=8 model=small trainer.max_steps=2000
#   NPROC=2 scripts/launch_single_node.sh parallel.ep=2 trainer.max_steps=30 logger=none
#
# The first argument is the number of ranks if it is a number (else $NPROC, else
# the GPU count, else 2); the rest are Hydra overrides. Every rank gets the same
# run_dir (also Hydra's output dir), decided here once, so ranks never resolve ${now:...} each
# (set RUN_DIR to choose it). Backend: NCCL on GPUs, gloo on CPU
# (override with parallel.backend=gloo|nccl).
set -euo pipefail

if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
  NPROC="$1"
  shift
fi
if [[ -z "${NPROC:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC="$(nvidia-smi -L | wc -l)"
  else
    NPROC=2
  fi
fi
RUN_DIR="${RUN_DIR:-runs/$(date +%Y%m%d-%H%M%S)}"

echo "launch: ${NPROC} ranks on this node, run dir ${RUN_DIR}" >&2
exec torchrun --standalone --nproc_per_node="${NPROC}" -m moetrain.train "run_dir=${RUN_DIR}" "$@"
