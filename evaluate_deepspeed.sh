#!/usr/bin/env bash
# Perplexity on the WikiText-103 test split, under DeepSpeed: evaluate.sh's twin, with the same variables and
# defaults (set them as for evaluate.sh) plus the DeepSpeed ones below. For example:
#   MODEL=outputs/finetune DS_CONFIG=ds_config_zero3.json bash evaluate_deepspeed.sh
#   HOSTFILE=hostfile DS_CONFIG=ds_config_zero3.json bash evaluate_deepspeed.sh
set -euo pipefail

DS_CONFIG=${DS_CONFIG:-ds_config.json}  # ZeRO-2 with optimizer offload; ds_config_zero3.json partitions the parameters too
HOSTFILE=${HOSTFILE:-}                 # multi-node: "host slots=N" lines; the deepspeed launcher reaches them over ssh
INCLUDE=${INCLUDE:-}                   # e.g. localhost:0,1 or worker-1@worker-2:0 (instead of NPROC_PER_NODE)
EXCLUDE=${EXCLUDE:-}                   # e.g. worker-2:3
MASTER_PORT=${MASTER_PORT:-29500}

export DS_CONFIG HOSTFILE INCLUDE EXCLUDE MASTER_PORT LAUNCHER=deepspeed
exec bash "$(dirname "$0")/evaluate.sh" "$@"
