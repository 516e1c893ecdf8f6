#!/usr/bin/env bash
# Pre-train a (truncated) student on OpenWebText with the LM loss, the paper's "gpt2-alt" route.
# Override any setting from the environment and append train.py flags, e.g.
#   MODEL=outputs/truncated/gpt2-alt bash pretrain.sh --max_steps 100
# The settings shared with train.sh (CONFIG, TOKENIZER, DATASET_DIR (recommended for OpenWebText: tokenize once),
# TRAIN_FILE, VALIDATION_FILE, TEST_FILE, BLOCK_SIZE=1024, WEIGHT_DECAY=0.0, SEED=42, PRECISION, RESUME) are in
# scripts/lm.sh.
set -euo pipefail

MODEL=${MODEL:-outputs/truncated/gpt2-alt}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/pretrain}
DATASET_NAME=${DATASET_NAME:-openwebtext}
DATASET_CONFIG=${DATASET_CONFIG:-}
EPOCHS=${EPOCHS:-3}
BATCH_SIZE=${BATCH_SIZE:-16}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-16}
GRAD_ACC=${GRAD_ACC:-4}
LEARNING_RATE=${LEARNING_RATE:-2.5e-4}
WARMUP_RATIO=${WARMUP_RATIO:-0.05}
SAVE_STEPS=${SAVE_STEPS:-2000}
LOGGING_STEPS=${LOGGING_STEPS:-100}

source "$(dirname "$0")/scripts/lm.sh"

run_train_py "$@"
