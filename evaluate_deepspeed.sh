#!/usr/bin/env bash
# Perplexity on the WikiText-103 test split under DeepSpeed (evaluate.sh's twin): with a ZeRO-3 config the
# parameters stay partitioned across the processes (ZeRO inference); with ZeRO-1/2 each process holds a copy.
# Non-overlapping blocks by default (the paper), a sliding window with STRIDE < BLOCK_SIZE. Override any setting
# from the environment and append evaluate.py flags, e.g.
#   MODEL=outputs/finetune DS_CONFIG=ds_config_zero3.json NPROC_PER_NODE=2 bash evaluate_deepspeed.sh
set -euo pipefail

MODEL=${MODEL:-outputs/finetune}
TOKENIZER=${TOKENIZER:-}               # default: MODEL's tokenizer
DATASET_DIR=${DATASET_DIR:-}
TRAIN_FILE=${TRAIN_FILE:-}
VALIDATION_FILE=${VALIDATION_FILE:-}
TEST_FILE=${TEST_FILE:-}
DATASET_NAME=${DATASET_NAME:-wikitext}
DATASET_CONFIG=${DATASET_CONFIG:-wikitext-103-raw-v1}
SPLIT=${SPLIT:-test}
BLOCK_SIZE=${BLOCK_SIZE:-1024}
STRIDE=${STRIDE:-$BLOCK_SIZE}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-8}
OUTPUT_FILE=${OUTPUT_FILE:-$MODEL/perplexity.json}
PRECISION=${PRECISION:-}               # fp32 | fp16 | bf16 (default: fp16 on CUDA, else fp32)
DS_CONFIG=${DS_CONFIG:-ds_config.json}  # ZeRO-2 with optimizer offload; ds_config_zero3.json partitions the parameters too
HOSTFILE=${HOSTFILE:-}                 # multi-node: "host slots=N" lines; the deepspeed launcher reaches them over ssh
INCLUDE=${INCLUDE:-}                   # e.g. localhost:0,1 or worker-1@worker-2:0 (instead of NPROC_PER_NODE)
EXCLUDE=${EXCLUDE:-}                   # e.g. worker-2:3
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-}     # processes on this node without HOSTFILE (default: number of GPUs, else 1)

source "$(dirname "$0")/scripts/lib.sh"

# shellcheck disable=SC2046
run_deepspeed evaluate.py --model_name_or_path "$MODEL" ${TOKENIZER:+--tokenizer_name "$TOKENIZER"} $(data_args) \
  $(precision_args) --split "$SPLIT" --block_size "$BLOCK_SIZE" --stride "$STRIDE" \
  --per_device_eval_batch_size "$EVAL_BATCH_SIZE" --output_file "$OUTPUT_FILE" "$@"
