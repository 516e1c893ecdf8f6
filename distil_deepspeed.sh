#!/usr/bin/env bash
# Distil GPT-2 into a truncated student on OpenWebText with the paper's settings, under DeepSpeed: distil.sh's twin, with the same variables and
# defaults (set them as for distil.sh) plus the DeepSpeed ones in
# scripts/deepspeed.sh (DS_CONFIG, HOSTFILE, INCLUDE, EXCLUDE, MASTER_PORT).
# Under ZeRO-3 the teacher is partitioned too and runs as ZeRO inference. For example:
#   STUDENT=outputs/truncated/gpt2-distil NPROC_PER_NODE=8 bash distil_deepspeed.sh --max_steps 100
#   HOSTFILE=hostfile DS_CONFIG=ds_config_zero3.json bash distil_deepspeed.sh
set -euo pipefail

exec bash "$(dirname "$0")/scripts/deepspeed.sh" distil.sh "$@"
