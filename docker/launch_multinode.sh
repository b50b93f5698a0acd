#!/usr/bin/env bash
# Multi-node launch with torchrun's rendezvous (no ssh needed): run this on EVERY node, e.g.
#   NNODES=2 RDZV_HOST=node1 ./docker/launch_multinode.sh pretrain model=palm_8b data=pile zero=stage3 precision=bf16
# Each node starts GPUS_PER_NODE ranks; they find each other at $RDZV_HOST:$RDZV_PORT.
set -euo pipefail
: "${NNODES:?set NNODES to the number of nodes}"
: "${RDZV_HOST:?set RDZV_HOST to the hostname of one node (the rendezvous)}"
RDZV_PORT=${RDZV_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
exec torchrun \
  --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv_id "palmrl-${RUN_ID:-default}" \
  -m palmrl "$@"
