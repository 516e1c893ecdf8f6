# shellcheck shell=bash
# Shared by train.sh and pretrain.sh (train.py): the settings whose defaults they share, and the launch of
# train.py. Each script sets its own defaults first, then sources this file and calls run_train_py.
# Override any of these from the environment, as the scripts' own settings.

CONFIG=${CONFIG:-}                     # a config JSON: random initialisation instead of MODEL's weights
TOKENIZER=${TOKENIZER:-}               # default: MODEL's tokenizer
DATASET_DIR=${DATASET_DIR:-}           # a tokenize_datasets.py folder; else the files; else the hub dataset
TRAIN_FILE=${TRAIN_FILE:-}
VALIDATION_FILE=${VALIDATION_FILE:-}
TEST_FILE=${TEST_FILE:-}
BLOCK_SIZE=${BLOCK_SIZE:-1024}
WEIGHT_DECAY=${WEIGHT_DECAY:-0.0}
SEED=${SEED:-42}
PRECISION=${PRECISION:-}               # fp32 | fp16 | bf16 (default: bf16 on GPUs of compute capability ≥ 8.0, fp16 older, fp32 CPU)
RESUME=${RESUME:-}                     # auto: continue from the newest complete checkpoint in OUTPUT_DIR, if any

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ -n "$CONFIG" ]]; then MODEL_ARGS=(--config_name "$CONFIG" --tokenizer_name "${TOKENIZER:-$MODEL}")
else MODEL_ARGS=(--model_name_or_path "$MODEL" ${TOKENIZER:+--tokenizer_name "$TOKENIZER"}); fi

# run_train_py ARGS...: train.py with every setting above and the calling script's, then ARGS (its own flags
# and the user's).
run_train_py() {
  run train.py "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${PRECISION_ARGS[@]}" \
    --output_dir "$OUTPUT_DIR" --num_train_epochs "$EPOCHS" --block_size "$BLOCK_SIZE" \
    --per_device_train_batch_size "$BATCH_SIZE" --per_device_eval_batch_size "$EVAL_BATCH_SIZE" \
    --gradient_accumulation_steps "$GRAD_ACC" --learning_rate "$LEARNING_RATE" --warmup_ratio "$WARMUP_RATIO" \
    --weight_decay "$WEIGHT_DECAY" --do_eval --save_steps "$SAVE_STEPS" \
    --logging_steps "$LOGGING_STEPS" --seed "$SEED" --report_to tensorboard \
    ${RESUME:+--resume_from_checkpoint "$RESUME"} "$@"
}
