#!/usr/bin/env bash
# Distil GPT-2 into a truncated student on OpenWebText with the paper's settings (DistilGPT2's recipe).
# Override any setting from the environment and append distiller.py flags, e.g.
#   STUDENT=outputs/truncated/gpt2-distil NPROC_PER_NODE=8 bash distil.sh --max_steps 100
set -euo pipefail

TEACHER=${TEACHER:-gpt2}
STUDENT=${STUDENT:-outputs/truncated/gpt2-distil}   # a truncate.py folder
STUDENT_CONFIG=${STUDENT_CONFIG:-}     # a config JSON: a new student instead of STUDENT
STUDENT_WEIGHTS=${STUDENT_WEIGHTS:-}   # with STUDENT_CONFIG: a state dict to start from
TOKENIZER=${TOKENIZER:-}               # default: the student's, else the teacher's
OUTPUT_DIR=${OUTPUT_DIR:-outputs/distil}
DATASET_DIR=${DATASET_DIR:-}           # a tokenize_datasets.py folder (recommended for OpenWebText: tokenize once)
TRAIN_FILE=${TRAIN_FILE:-}
VALIDATION_FILE=${VALIDATION_FILE:-}
TEST_FILE=${TEST_FILE:-}
DATASET_NAME=${DATASET_NAME:-openwebtext}
DATASET_CONFIG=${DATASET_CONFIG:-}
EPOCHS=${EPOCHS:-4}
BLOCK_SIZE=${BLOCK_SIZE:-1024}
BATCH_SIZE=${BATCH_SIZE:-4}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-4}
GRAD_ACC=${GRAD_ACC:-128}
TEMPERATURE=${TEMPERATURE:-2.0}
ALPHA_CE=${ALPHA_CE:-5.0}
ALPHA_CLM=${ALPHA_CLM:-2.0}
ALPHA_COS=${ALPHA_COS:-1.0}
ALPHA_MSE=${ALPHA_MSE:-0.0}
DIVERGENCE=${DIVERGENCE:-forward_kl}   # forward_kl | reverse_kl | jsd
JSD_BETA=${JSD_BETA:-0.5}
ALPHA_HIDDEN=${ALPHA_HIDDEN:-}         # PKD hidden-state loss over mapped blocks (passed only when set)
LAYER_MAP=${LAYER_MAP:-}               # student:teacher blocks, e.g. 0:0,1:2,2:4 (default: the student's truncation.json)
ALPHA_ATT=${ALPHA_ATT:-}               # MiniLM last-layer attention-distribution KL (passed only when set)
ALPHA_VAL=${ALPHA_VAL:-}               # MiniLM last-layer value-relation KL (passed only when set)
LEARNING_RATE=${LEARNING_RATE:-2.5e-4}
WARMUP_RATIO=${WARMUP_RATIO:-0.05}
WEIGHT_DECAY=${WEIGHT_DECAY:-0.0}
ADAM_EPSILON=${ADAM_EPSILON:-1e-6}
MAX_GRAD_NORM=${MAX_GRAD_NORM:-5.0}
FREEZE_POS_EMBS=${FREEZE_POS_EMBS:-1}  # 1: do not train the position embeddings
SAVE_STEPS=${SAVE_STEPS:-500}
LOGGING_STEPS=${LOGGING_STEPS:-10}
SEED=${SEED:-56}                       # the original distiller's seed
PRECISION=${PRECISION:-}               # fp32 | fp16 | bf16 (default: bf16 on GPUs of compute capability ≥ 8.0, fp16 older, fp32 CPU)
RESUME=${RESUME:-}                     # auto: continue from the newest complete checkpoint in OUTPUT_DIR, if any

source "$(dirname "$0")/scripts/lib.sh"

if [[ -n "$STUDENT_CONFIG" ]]; then
  STUDENT_ARGS=(--student_config "$STUDENT_CONFIG" ${STUDENT_WEIGHTS:+--student_pretrained_weights "$STUDENT_WEIGHTS"})
else STUDENT_ARGS=(--student_name_or_path "$STUDENT"); fi
FREEZE_ARGS=(); if [[ "$FREEZE_POS_EMBS" == 1 ]]; then FREEZE_ARGS=(--freeze_pos_embs); fi
LAYER_ARGS=(${ALPHA_HIDDEN:+--alpha_hidden "$ALPHA_HIDDEN"} ${LAYER_MAP:+--layer_map "$LAYER_MAP"}
            ${ALPHA_ATT:+--alpha_att "$ALPHA_ATT"} ${ALPHA_VAL:+--alpha_val "$ALPHA_VAL"})

run distiller.py --teacher_name_or_path "$TEACHER" "${STUDENT_ARGS[@]}" ${TOKENIZER:+--tokenizer_name "$TOKENIZER"} \
  "${DATA_ARGS[@]}" "${PRECISION_ARGS[@]}" --output_dir "$OUTPUT_DIR" --num_train_epochs "$EPOCHS" --block_size "$BLOCK_SIZE" \
  --per_device_train_batch_size "$BATCH_SIZE" --per_device_eval_batch_size "$EVAL_BATCH_SIZE" \
  --gradient_accumulation_steps "$GRAD_ACC" --temperature "$TEMPERATURE" --alpha_ce "$ALPHA_CE" \
  --alpha_clm "$ALPHA_CLM" --alpha_cos "$ALPHA_COS" --alpha_mse "$ALPHA_MSE" --divergence "$DIVERGENCE" \
  --jsd_beta "$JSD_BETA" "${LAYER_ARGS[@]}" "${FREEZE_ARGS[@]}" --learning_rate "$LEARNING_RATE" --warmup_ratio "$WARMUP_RATIO" \
  --weight_decay "$WEIGHT_DECAY" --adam_epsilon "$ADAM_EPSILON" --max_grad_norm "$MAX_GRAD_NORM" --do_eval \
  --save_steps "$SAVE_STEPS" --logging_steps "$LOGGING_STEPS" --seed "$SEED" --report_to tensorboard \
  ${RESUME:+--resume_from_checkpoint "$RESUME"} "$@"
