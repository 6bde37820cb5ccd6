#!/usr/bin/env bash
# Several gloo ranks on ONE device (a laptop CPU, or one GPU shared by all ranks): a quick
# expert-parallel smoke run of the real entry point.
#
#   scripts/smoke_gloo_ranks.sh                 # 2 ranks, EP=2, experiment=smoke, CPU
#   NPROC=4 EP=2 scripts/smoke_gloo_ranks.sh    # EP=2 x DP=2
#   DEVICE=cuda scripts/smoke_gloo_ranks.sh     # every rank on cuda:0, gloo (all-to-all via host memory)
#
# Extra arguments are Hydra overrides. NCCL cannot put two ranks on one GPU,
# hence parallel.backend=gloo here.
set -euo pipefail

NPROC="${NPROC:-2}"
EP="${EP:-${NPROC}}"
DEVICE="${DEVICE:-cpu}"
RUN_DIR="${RUN_DIR:-runs/smoke-gloo-$(date +%Y%m%d-%H%M%S)}"
if [[ "${DEVICE}" == "cuda" ]]; then
  export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"  # one GPU: local_rank % 1 = 0 for every rank
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# experiment=smoke's global batch of 8 sequences, split over the ranks (same batch whatever NPROC <= 8).
GLOBAL=$(( NPROC <= 8 ? 8 : NPROC ))
MICRO=$(( GLOBAL / NPROC ))

echo "smoke: ${NPROC} gloo ranks, EP=${EP}, device ${DEVICE}, run dir ${RUN_DIR}" >&2
exec torchrun --standalone --nproc_per_node="${NPROC}" -m moetrain.train \
  experiment=smoke logger=none parallel.ep="${EP}" parallel.backend=gloo trainer.device="${DEVICE}" \
  trainer.global_batch_size="${GLOBAL}" trainer.micro_batch_size="${MICRO}" \
  "run_dir=${RUN_DIR}" "$@"
