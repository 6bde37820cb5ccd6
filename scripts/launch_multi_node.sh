#!/usr/bin/env bash
# Many nodes: run this once on every node with the same MASTER (host:port of node 0) and RUN_DIR.
#
#   # on node 0 and node 1 (8 GPUs each), EP groups of 8 stay inside a node:
#   NNODES=2 NODE_RANK=0 MASTER=node0:29500 RUN_DIR=/shared/runs/exp1 scripts/launch_multi_node.sh parallel.ep=8
#   NNODES=2 NODE_RANK=1 MASTER=node0:29500 RUN_DIR=/shared/runs/exp1 scripts/launch_multi_node.sh parallel.ep=8
#
# Variables: NNODES (required), NODE_RANK (required; the c10d rendezvous also
# works without it, but a fixed rank keeps node 0 = global ranks 0..G-1),
# MASTER (required, host:port reachable from every node), NPROC_PER_NODE
# (default: the node's GPU count), RUN_DIR (required: a path every node sees,
# the one run directory of the job), RDZV_ID (default: the run dir's name).
#
# EP groups are contiguous blocks of parallel.ep global ranks; with
# parallel.ep <= NPROC_PER_NODE the all-to-all traffic stays on NVLink.
set -euo pipefail

: "${NNODES:?set NNODES}"
: "${NODE_RANK:?set NODE_RANK}"
: "${MASTER:?set MASTER=host:port of node 0}"
: "${RUN_DIR:?set RUN_DIR to a directory every node can see}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="$(nvidia-smi -L 2>/dev/null | wc -l)"
  [[ "${NPROC_PER_NODE}" -gt 0 ]] || { echo "no GPU found: set NPROC_PER_NODE" >&2; exit 2; }
fi
RDZV_ID="${RDZV_ID:-$(basename "${RUN_DIR}")}"

# NCCL: fail loudly instead of hanging, and say which interface it uses. Override as needed
# (NCCL_SOCKET_IFNAME=eth0, NCCL_IB_HCA=mlx5, NCCL_DEBUG=WARN ...).
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export TORCH_NCCL_BLOCKING_WAIT="${TORCH_NCCL_BLOCKING_WAIT:-0}"
export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"
[[ -n "${NCCL_SOCKET_IFNAME:-}" ]] && export NCCL_SOCKET_IFNAME
[[ -n "${NCCL_IB_HCA:-}" ]] && export NCCL_IB_HCA
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

echo "launch: node ${NODE_RANK}/${NNODES}, ${NPROC_PER_NODE} ranks per node, rendezvous ${MASTER}, run dir ${RUN_DIR}" >&2
exec torchrun \
  --nnodes="${NNODES}" \
  --node-rank="${NODE_RANK}" \
  --nproc-per-node="${NPROC_PER_NODE}" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="${MASTER}" \
  --rdzv-id="${RDZV_ID}" \
  -m moetrain.train "run_dir=${RUN_DIR}" "$@"
