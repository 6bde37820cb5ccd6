#!/usr/bin/env bash
# The reference runs of a behaviour-preserving change: their metrics.jsonl must stay bitwise equal.
#
#   scripts/metrics_baseline.sh OUT_DIR            # run every reference configuration into OUT_DIR/<name>/
#   python scripts/compare_metrics.py BEFORE AFTER  # every non-perf/ value of every record, exactly
#
# Take BEFORE from a clean checkout of the old commit (git worktree add /tmp/old <commit>; run it there),
# or run this script with PYTHONPATH naming the old checkout (the runs import moetrain, and its configs, from there).
# ~4 min on 2 CPU cores for the first ten runs. Extra arguments are Hydra overrides added to every run.
# RUNS="ep2 ep2_shared_gate" runs only the runs named (a quick check of a change to one part; same RUNS both sides).
set -euo pipefail
OUT=${1:?usage: scripts/metrics_baseline.sh OUT_DIR [overrides]}; shift
PY=${PYTHON:-.venv/bin/python}
export WANDB_MODE=offline OMP_NUM_THREADS=1
rm -rf "${OUT}"; mkdir -p "${OUT}"
selected() { [[ -z "${RUNS:-}" || " ${RUNS} " == *" $1 "* ]]; }
one() {
  local name=$1; shift
  selected "${name}" || return 0
  "${PY}" -m moetrain.train logger=none trainer.progress=false "run_dir=${OUT}/${name}" "$@" > "${OUT}/${name}.log" 2>&1 \
    || { echo "FAILED ${name}: see ${OUT}/${name}.log" >&2; return 1; }
}
two() {
  local name=$1; shift
  selected "${name}" || return 0
  "${PY}" -m torch.distributed.run --standalone --nproc_per_node=2 -m moetrain.train logger=none \
    trainer.progress=false parallel.backend=gloo parallel.ep=2 trainer.micro_batch_size=2 "run_dir=${OUT}/${name}" "$@" \
    > "${OUT}/${name}.log" 2>&1 || { echo "FAILED ${name}: see ${OUT}/${name}.log" >&2; return 1; }
}
one default trainer.max_steps=60 trainer.eval_every=30 checkpoint.every=30 "$@"
one smoke_global experiment=smoke moe.balance.scope=global "$@"
one smoke_deepseek_v2 experiment=smoke moe=deepseek_v2 "$@"
one smoke_loss_free experiment=smoke moe=loss_free "$@"
one smoke_switch experiment=smoke moe=switch "$@"
# every routing strategy and balance loss (the registries of moe/strategies.py and moe/losses.py), the global
# counts through activation checkpointing's recompute
one smoke_deepseek_v3 experiment=smoke moe=deepseek_v3 "$@"
one smoke_mixtral_z experiment=smoke moe=mixtral moe.balance.z_loss_coef=0.001 "$@"
one smoke_noisy_topk experiment=smoke moe=noisy_topk "$@"
one smoke_expert_choice experiment=smoke moe=expert_choice "$@"
one smoke_hash_balanced experiment=smoke moe=hash moe.router.hash_table=balanced "$@"
one smoke_global_ac experiment=smoke moe.balance.scope=global trainer.activation_checkpointing=true "$@"
one deepspeed experiment=smoke engine=deepspeed "$@"
two ep2 experiment=smoke "$@"
two ep2_global_deepseek_v2 experiment=smoke moe=deepseek_v2 moe.balance.scope=global "$@"
two ep2_shared_gate experiment=smoke moe.num_shared_experts=2 moe.shared_expert_gate=true "$@"
two deepspeed_ep2 experiment=smoke engine=deepspeed "$@"
echo "runs in ${OUT}"
