#!/usr/bin/env bash
# The reference runs of a behaviour-preserving change: their metrics.jsonl must stay bitwise equal.
#
#   scripts/metrics_baseline.sh OUT_DIR            # run every reference configuration into OUT_DIR/<name>/
#   python scripts/compare_metrics.py BEFORE AFTER  # every non-perf/ value of every record, exactly
#
# Take BEFORE from a clean checkout of the old commit (git worktree add /tmp/old <commit>; run it there).
# ~4 min on 2 CPU cores. Extra arguments are Hydra overrides added to every run.
set -euo pipefail
OUT=${1:?usage: scripts/metrics_baseline.sh OUT_DIR [overrides]}; shift
PY=${PYTHON:-.venv/bin/python}
export WANDB_MODE=offline OMP_NUM_THREADS=1
rm -rf "${OUT}"; mkdir -p "${OUT}"
one() {
  local name=$1; shift
  "${PY}" -m moetrain.train logger=none trainer.progress=false "run_dir=${OUT}/${name}" "$@" > "${OUT}/${name}.log" 2>&1 \
    || { echo "FAILED ${name}: see ${OUT}/${name}.log" >&2; return 1; }
}
two() {
  local name=$1; shift
  "${PY}" -m torch.distributed.run --standalone --nproc_per_node=2 -m moetrain.train logger=none \
    trainer.progress=false parallel.backend=gloo parallel.ep=2 trainer.micro_batch_size=2 "run_dir=${OUT}/${name}" "$@" \
    > "${OUT}/${name}.log" 2>&1 || { echo "FAILED ${name}: see ${OUT}/${name}.log" >&2; return 1; }
}
one default trainer.max_steps=60 trainer.eval_every=30 checkpoint.every=30 "$@"
one smoke_global experiment=smoke moe.balance.scope=global "$@"
one smoke_deepseek_v2 experiment=smoke moe=deepseek_v2 "$@"
one smoke_loss_free experiment=smoke moe=loss_free "$@"
one smoke_switch experiment=smoke moe=switch "$@"
one deepspeed experiment=smoke engine=deepspeed "$@"
two ep2 experiment=smoke "$@"
two ep2_global_deepseek_v2 experiment=smoke moe=deepseek_v2 moe.balance.scope=global "$@"
two deepspeed_ep2 experiment=smoke engine=deepspeed "$@"
echo "runs in ${OUT}"
