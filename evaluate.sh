#!/usr/bin/env bash
# Perplexity on the WikiText-103 test split: non-overlapping blocks by default (the paper), a sliding
# window with STRIDE < BLOCK_SIZE. Override any setting from the environment and append evaluate.py flags.
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
OUTPUT_FILE=${OUTPUT_FILE:-}           # default: evaluate.py's (beside a model folder, else here)
PRECISION=${PRECISION:-}               # fp32 | fp16 | bf16 (default: bf16 on GPUs of compute capability ≥ 8.0, fp16 older, fp32 CPU)

source "$(dirname "$0")/scripts/lib.sh"

run evaluate.py --model_name_or_path "$MODEL" ${TOKENIZER:+--tokenizer_name "$TOKENIZER"} "${DATA_ARGS[@]}" \
  "${PRECISION_ARGS[@]}" --split "$SPLIT" --block_size "$BLOCK_SIZE" --stride "$STRIDE" \
  --per_device_eval_batch_size "$EVAL_BATCH_SIZE" ${OUTPUT_FILE:+--output_file "$OUTPUT_FILE"} "$@"
