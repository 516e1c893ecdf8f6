#!/usr/bin/env bash
# The *_deepspeed.sh twins: run the launch script named first (train.sh, pretrain.sh, distil.sh, evaluate.sh)
# under the deepspeed launcher, with that script's variables and defaults plus these.
set -euo pipefail

DS_CONFIG=${DS_CONFIG:-ds_config.json}  # ZeRO-2 with optimizer offload; ds_config_zero3.json partitions the parameters too
HOSTFILE=${HOSTFILE:-}                 # multi-node: "host slots=N" lines; the deepspeed launcher reaches them over ssh
INCLUDE=${INCLUDE:-}                   # e.g. localhost:0,1 or worker-1@worker-2:0 (instead of NPROC_PER_NODE)
EXCLUDE=${EXCLUDE:-}                   # e.g. worker-2:3
MASTER_PORT=${MASTER_PORT:-29500}

export DS_CONFIG HOSTFILE INCLUDE EXCLUDE MASTER_PORT LAUNCHER=deepspeed
script=$1
shift
exec bash "$(dirname "${BASH_SOURCE[0]}")/../$script" "$@"
