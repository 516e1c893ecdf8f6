#!/usr/bin/env bash
# Pre-train a (truncated) student on OpenWebText with the LM loss, the paper's "gpt2-alt" route.
# Override any setting from the environment and append train.py flags, e.g.
#   MODEL=outputs/truncated/gpt2-alt bash pretrain.sh --max_steps 100
set -euo pipefail

MODEL=${MODEL:-outputs/truncated/gpt2-alt}
CONFIG=${CONFIG:-}                     # a config JSON: random initialisation instead of MODEL's weights
TOKENIZER=${TOKENIZER:-}               # default: MODEL's tokenizer
OUTPUT_DIR=${OUTPUT_DIR:-outputs/pretrain}
DATASET_DIR=${DATASET_DIR:-}           # a tokenize_datasets.py folder (recommended for OpenWebText: tokenize once)
TRAIN_FILE=${TRAIN_FILE:-}
VALIDATION_FILE=${VALIDATION_FILE:-}
TEST_FILE=${TEST_FILE:-}
DATASET_NAME=${DATASET_NAME:-openwebtext}
DATASET_CONFIG=${DATASET_CONFIG:-}
EPOCHS=${EPOCHS:-3}
BLOCK_SIZE=${BLOCK_SIZE:-1024}
BATCH_SIZE=${BATCH_SIZE:-16}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-16}
GRAD_ACC=${GRAD_ACC:-4}
LEARNING_RATE=${LEARNING_RATE:-2.5e-4}
WARMUP_RATIO=${WARMUP_RATIO:-0.05}
WEIGHT_DECAY=${WEIGHT_DECAY:-0.0}
SAVE_STEPS=${SAVE_STEPS:-2000}
LOGGING_STEPS=${LOGGING_STEPS:-100}
SEED=${SEED:-42}
PRECISION=${PRECISION:-}               # fp32 | fp16 | bf16 (default: bf16 on GPUs of compute capability ≥ 8.0, fp16 older, fp32 CPU)
RESUME=${RESUME:-}                     # auto: continue from the newest complete checkpoint in OUTPUT_DIR, if any

source "$(dirname "$0")/scripts/lib.sh"

if [[ -n "$CONFIG" ]]; then MODEL_ARGS=(--config_name "$CONFIG" --tokenizer_name "${TOKENIZER:-$MODEL}")
else MODEL_ARGS=(--model_name_or_path "$MODEL" ${TOKENIZER:+--tokenizer_name "$TOKENIZER"}); fi

run train.py "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${PRECISION_ARGS[@]}" \
  --output_dir "$OUTPUT_DIR" --num_train_epochs "$EPOCHS" --block_size "$BLOCK_SIZE" \
  --per_device_train_batch_size "$BATCH_SIZE" --per_device_eval_batch_size "$EVAL_BATCH_SIZE" \
  --gradient_accumulation_steps "$GRAD_ACC" --learning_rate "$LEARNING_RATE" --warmup_ratio "$WARMUP_RATIO" \
  --weight_decay "$WEIGHT_DECAY" --do_eval --save_steps "$SAVE_STEPS" \
  --logging_steps "$LOGGING_STEPS" --seed "$SEED" --report_to tensorboard \
  ${RESUME:+--resume_from_checkpoint "$RESUME"} "$@"
