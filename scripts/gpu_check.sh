#!/usr/bin/env bash
# The GPU checks of the MoE path in one call of a lent GPU machine (one H100 or H200, under 450 s in all):
#   0. prerequisites, each missing one named in one line before anything runs: the GPU, torch, triton, numpy,
#      PyYAML, pytest, a C compiler and the Python headers (Triton builds its launcher with them at the first
#      kernel launch), 2 GB free for the Triton / inductor caches;
#   1. the CUDA tests (tests/moe/test_cuda.py: bf16/fp32 parity, Triton and grouped_mm backends, no host sync in a
#      dropless step, regional compile vs eager);
#   2. scripts/bench_moe.py at the GPU issue's shapes (with the primitives and a kernel profile);
#   3. scripts/bench_train.py: MoE vs its dense twin at model=small (eager, then compiled).
# It installs nothing and needs only what the GPU machine has (python 3.12, torch, triton, numpy, transformers,
# pytest): no hydra-core, omegaconf, datasets, wandb or deepspeed (the benchmarks compose the config without
# Hydra and read the standard library's files as tokens). It imports moetrain from this checkout.
# Every part has a hard time limit; its output is appended to $OUT/gpu_check.log as it comes, so a part that
# hangs, or the call's own limit, still leaves what was measured before it.
#
#   scripts/gpu_check.sh                            # python3 on PATH
#   PYTHON=.venv/bin/python scripts/gpu_check.sh
#   ALLOW_CPU=1 QUICK=1 scripts/gpu_check.sh        # the rehearsal on a CPU: tiny sizes, CUDA tests skip
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${OUT:-gpu_check_out}
log="$out/gpu_check.log"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
status=0
started=$SECONDS
say() { echo "$*" | tee -a "$log"; }
step() { say ""; say "== $1 ($(date +%T), +$((SECONDS - started)) s)"; }

# part LIMIT_S NAME COMMAND...: run with a hard limit, output appended to the log as it comes.
part() {
  local limit=$1 name=$2 rc
  shift 2
  step "$name (limit $limit s)"
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    say "gpu_check: $name stopped at its limit of $limit s"
  fi
  [ "$rc" -eq 0 ] || { say "gpu_check: $name exited $rc"; status=1; }
}

step "prerequisites"
if ! "$py" scripts/gpu_prereqs.py 2>&1 | tee -a "$log"; then
  say "gpu_check: stopped before running anything (see the lines above)"
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | tee -a "$log"

if [ -n "${QUICK:-}" ]; then
  moe_args=(--tokens 512 --reps 2 --shapes fine --no-memory --primitives)
  model=(data.seq_len=64 trainer.global_batch_size=4 trainer.micro_batch_size=4)
  steps=(--steps 2 --warmup 1 --block 1)
else
  moe_args=(--profile --primitives)
  model=(model=small moe.num_experts=64 moe.top_k=6 moe.expert_hidden_size=256 moe.num_shared_experts=2
         data.seq_len=1024 trainer.global_batch_size=16 trainer.micro_batch_size=16)
  steps=(--steps 20 --warmup 3 --block 5)
fi

part 110 "CUDA tests" "$py" -m pytest -q -rs -p no:cacheprovider tests/moe/test_cuda.py
part 120 "one MoE layer: bench_moe" "$py" scripts/bench_moe.py "${moe_args[@]}"
part 80 "end to end: bench_train (eager)" "$py" scripts/bench_train.py "${steps[@]}" -- "${model[@]}"
part 120 "end to end: bench_train (trainer.compile)" "$py" scripts/bench_train.py --compile "${steps[@]}" -- "${model[@]}"

step "done: status $status in $((SECONDS - started)) s"
exit $status
