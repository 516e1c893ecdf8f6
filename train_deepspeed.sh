#!/usr/bin/env bash
# Fine-tune a causal LM on WikiText-103 with the paper's settings, under DeepSpeed: train.sh's twin, with the same variables and
# defaults (set them as for train.sh) plus the DeepSpeed ones in
# scripts/deepspeed.sh (DS_CONFIG, HOSTFILE, INCLUDE, EXCLUDE, MASTER_PORT). For example:
#   MODEL=outputs/pretrain NPROC_PER_NODE=2 bash train_deepspeed.sh --max_steps 100
#   HOSTFILE=hostfile DS_CONFIG=ds_config_zero3.json bash train_deepspeed.sh
set -euo pipefail

exec bash "$(dirname "$0")/scripts/deepspeed.sh" train.sh "$@"
