#!/usr/bin/env bash
# The GPU checks of the MoE path in one go, sized for one call on one H200 (< 5 min):
#   1. the CUDA tests (tests/test_cuda.py: bf16/fp32 parity, Triton and grouped_mm backends,
#      no host sync in a dropless step, regional compile vs eager),
#   2. scripts/bench_moe.py at the GPU issue's shapes (with a kernel profile of moetrain's layer),
#   3. scripts/bench_train.py: MoE vs its dense twin at model=small (eager, then compiled).
# Each part has its own time limit, so one that hangs cannot take the others with it.
# Output goes to the terminal and to $OUT (default: gpu_check_out/): tests.log, bench_moe.md, bench_train*.md.
#
#   scripts/gpu_check.sh                  # with the Python on PATH (python3), e.g. inside .venv
#   PYTHON=.venv/bin/python scripts/gpu_check.sh
#   QUICK=1 scripts/gpu_check.sh          # tiny sizes: checks the script itself (also on CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 WANDB_MODE=${WANDB_MODE:-disabled}
status=0
step() { echo; echo "== $1 ($(date +%T))"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
"$py" -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None, "python", sys.version.split()[0])'

step "CUDA tests"
timeout 180 "$py" -m pytest -q -rs tests/test_cuda.py 2>&1 | tee "$out/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ -n "${QUICK:-}" ]; then
  moe_args=(--tokens 512 --reps 2 --shapes fine --no-memory)
  model=(data.seq_len=64 trainer.global_batch_size=4 trainer.micro_batch_size=4)
  steps=(--steps 2 --warmup 1 --block 1)
else
  moe_args=(--profile --primitives)
  model=(model=small moe.num_experts=64 moe.top_k=6 moe.expert_hidden_size=256 moe.num_shared_experts=2
         data.seq_len=1024 trainer.global_batch_size=16 trainer.micro_batch_size=16)
  steps=(--steps 20 --warmup 3 --block 5)
fi

step "one MoE layer: bench_moe"
timeout 150 "$py" scripts/bench_moe.py "${moe_args[@]}" 2>&1 | tee "$out/bench_moe.md"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "end to end: bench_train (eager)"
timeout 120 "$py" scripts/bench_train.py "${steps[@]}" -- "${model[@]}" 2>&1 | tee "$out/bench_train.md"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "end to end: bench_train (trainer.compile)"
timeout 180 "$py" scripts/bench_train.py --compile "${steps[@]}" -- "${model[@]}" 2>&1 | tee "$out/bench_train_compile.md"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "done (status $status)"
exit $status
