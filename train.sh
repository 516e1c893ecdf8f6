#!/usr/bin/env bash
# Fine-tune a causal LM on WikiText-103 with the paper's settings.
# Override any setting from the environment and append train.py flags, e.g.
#   MODEL=outputs/pretrain NPROC_PER_NODE=2 bash train.sh --max_steps 100
# The settings shared with pretrain.sh (CONFIG, TOKENIZER, DATASET_DIR, TRAIN_FILE, VALIDATION_FILE, TEST_FILE,
# BLOCK_SIZE=1024, WEIGHT_DECAY=0.0, SEED=42, PRECISION, RESUME) are in scripts/lm.sh.
set -euo pipefail

MODEL=${MODEL:-gpt2}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/finetune}
DATASET_NAME=${DATASET_NAME:-wikitext}
DATASET_CONFIG=${DATASET_CONFIG:-wikitext-103-raw-v1}
EPOCHS=${EPOCHS:-6}
BATCH_SIZE=${BATCH_SIZE:-8}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-8}
GRAD_ACC=${GRAD_ACC:-16}
LEARNING_RATE=${LEARNING_RATE:-5e-5}
WARMUP_RATIO=${WARMUP_RATIO:-0.0}
SAVE_STEPS=${SAVE_STEPS:-500}
LOGGING_STEPS=${LOGGING_STEPS:-50}

source "$(dirname "$0")/scripts/lm.sh"

run_train_py --eval_strategy epoch "$@"
