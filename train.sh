#!/usr/bin/env bash
# Fine-tune a causal LM on WikiText-103 with the paper's settings.
# Override any setting from the environment and append train.py flags, e.g.
#   MODEL=outputs/pretrain NPROC_PER_NODE=2 bash train.sh --max_steps 100
set -euo pipefail

MODEL=${MODEL:-gpt2}
CONFIG=${CONFIG:-}                     # a config JSON: random initialisation instead of MODEL's weights
TOKENIZER=${TOKENIZER:-}               # default: MODEL's tokenizer
OUTPUT_DIR=${OUTPUT_DIR:-outputs/finetune}
DATASET_DIR=${DATASET_DIR:-}           # a tokenize_datasets.py folder; else the files; else the hub dataset
TRAIN_FILE=${TRAIN_FILE:-}
VALIDATION_FILE=${VALIDATION_FILE:-}
TEST_FILE=${TEST_FILE:-}
DATASET_NAME=${DATASET_NAME:-wikitext}
DATASET_CONFIG=${DATASET_CONFIG:-wikitext-103-raw-v1}
EPOCHS=${EPOCHS:-6}
BLOCK_SIZE=${BLOCK_SIZE:-1024}
BATCH_SIZE=${BATCH_SIZE:-8}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-8}
GRAD_ACC=${GRAD_ACC:-16}
LEARNING_RATE=${LEARNING_RATE:-5e-5}
WARMUP_RATIO=${WARMUP_RATIO:-0.0}
WEIGHT_DECAY=${WEIGHT_DECAY:-0.0}
SAVE_STEPS=${SAVE_STEPS:-500}
LOGGING_STEPS=${LOGGING_STEPS:-50}
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
  --weight_decay "$WEIGHT_DECAY" --do_eval --eval_strategy epoch --save_steps "$SAVE_STEPS" \
  --logging_steps "$LOGGING_STEPS" --seed "$SEED" --report_to tensorboard \
  ${RESUME:+--resume_from_checkpoint "$RESUME"} "$@"
