#!/usr/bin/env bash
# Perplexity on the WikiText-103 test split, under DeepSpeed: evaluate.sh's twin, with the same variables and
# defaults (set them as for evaluate.sh) plus the DeepSpeed ones in
# scripts/deepspeed.sh (DS_CONFIG, HOSTFILE, INCLUDE, EXCLUDE, MASTER_PORT). For example:
#   MODEL=outputs/finetune DS_CONFIG=ds_config_zero3.json bash evaluate_deepspeed.sh
#   HOSTFILE=hostfile DS_CONFIG=ds_config_zero3.json bash evaluate_deepspeed.sh
set -euo pipefail

exec bash "$(dirname "$0")/scripts/deepspeed.sh" evaluate.sh "$@"
