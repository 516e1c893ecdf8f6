#!/usr/bin/env bash
# Pre-train a (truncated) student on OpenWebText with the LM loss, under DeepSpeed: pretrain.sh's twin, with the same variables and
# defaults (set them as for pretrain.sh) plus the DeepSpeed ones in
# scripts/deepspeed.sh (DS_CONFIG, HOSTFILE, INCLUDE, EXCLUDE, MASTER_PORT). For example:
#   MODEL=outputs/truncated/gpt2-alt NPROC_PER_NODE=8 bash pretrain_deepspeed.sh
#   HOSTFILE=hostfile DS_CONFIG=ds_config_zero3.json bash pretrain_deepspeed.sh
set -euo pipefail

exec bash "$(dirname "$0")/scripts/deepspeed.sh" pretrain.sh "$@"
