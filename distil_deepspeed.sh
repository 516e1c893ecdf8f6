#!/usr/bin/env bash
# Distil GPT-2 into a truncated student on OpenWebText with the paper's settings, under DeepSpeed: distil.sh's twin, with the same variables and
# defaults (set them as for distil.sh) plus the DeepSpeed ones below.
# Under ZeRO-3 the teacher is partitioned too and runs as ZeRO inference. For example:
#   STUDENT=outputs/truncated/gpt2-distil NPROC_PER_NODE=8 bash distil_deepspeed.sh --max_steps 100
#   HOSTFILE=hostfile DS_CONFIG=ds_config_zero3.json bash distil_deepspeed.sh
set -euo pipefail

DS_CONFIG=${DS_CONFIG:-ds_config.json}  # ZeRO-2 with optimizer offload; ds_config_zero3.json partitions the parameters too
HOSTFILE=${HOSTFILE:-}                 # multi-node: "host slots=N" lines; the deepspeed launcher reaches them over ssh
INCLUDE=${INCLUDE:-}                   # e.g. localhost:0,1 or worker-1@worker-2:0 (instead of NPROC_PER_NODE)
EXCLUDE=${EXCLUDE:-}                   # e.g. worker-2:3
MASTER_PORT=${MASTER_PORT:-29500}

export DS_CONFIG HOSTFILE INCLUDE EXCLUDE MASTER_PORT LAUNCHER=deepspeed
exec bash "$(dirname "$0")/distil.sh" "$@"
