#!/usr/bin/env bash
# The paper's table end to end: tokenize → truncate → pre-train or distil → fine-tune → evaluate, every row,
# then results.md, results.csv and results.png under OUTPUT_ROOT.
#   SCALE=mini  bash reproduce.sh     offline, CPU, minutes: a small teacher pre-trained here on Python's docs
#   SCALE=paper bash reproduce.sh     GPT-2, OpenWebText, WikiText-103, the paper's settings, on the GPUs present
#   DRY_RUN=1   prints the commands without running them.
# A stage whose output is complete is skipped, so re-running after a crash resumes where it stopped.
set -euo pipefail

SCALE=${SCALE:-mini}
OUTPUT_ROOT=${OUTPUT_ROOT:-outputs/reproduce-$SCALE}
DRY_RUN=${DRY_RUN:-0}

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$OUTPUT_ROOT
export NPROC_PER_NODE=${NPROC_PER_NODE:-}

case "$SCALE" in
  mini)
    INPUTS=$ROOT/inputs
    TOKENIZER=$INPUTS/tokenizer
    TEACHER_CONFIG=${TEACHER_CONFIG:-$ROOT/inputs/teacher-config.json}
    TEACHER_LAYERS=${TEACHER_LAYERS:-4}
    STUDENT_LAYERS=${STUDENT_LAYERS:-2}
    WIDTH=${WIDTH:-128}
    VOCAB_SIZE=${VOCAB_SIZE:-4096}          # of the BPE trained here when GPT-2's is not in the hub cache
    BLOCK_SIZE=${BLOCK_SIZE:-128}
    BATCH_SIZE=${BATCH_SIZE:-16}
    TEACHER_STEPS=${TEACHER_STEPS:-900}     # the teacher's own pre-training
    STUDENT_STEPS=${STUDENT_STEPS:-40}      # each student's pre-training or distillation
    FINETUNE_STEPS=${FINETUNE_STEPS:-60}   # every row's fine-tuning
    PROMPT=${PROMPT:-"The for statement is used to"}
    # every stage: one process, full precision, a fixed number of steps, no intermediate checkpoints
    export NPROC_PER_NODE=${NPROC_PER_NODE:-1} PRECISION=${PRECISION:-fp32} BLOCK_SIZE BATCH_SIZE EVAL_BATCH_SIZE=16 \
      GRAD_ACC=1 LOGGING_STEPS=10 WARMUP_RATIO=0.05
    QUIET="--save_strategy no --report_to none --disable_tqdm True"
    PRETRAIN_FLAGS="--max_steps $TEACHER_STEPS --learning_rate 2e-3 $QUIET"
    STUDENT_FLAGS="--max_steps $STUDENT_STEPS --learning_rate 1e-3 $QUIET"
    FINETUNE_FLAGS="--max_steps $FINETUNE_STEPS --learning_rate 1e-3 --eval_strategy steps --eval_steps 30 $QUIET"
    STUDENT_CONFIG=$ROOT/inputs/student-config.json
    ;;
  paper)
    TOKENIZER=gpt2
    TEACHER_LAYERS=12
    STUDENT_LAYERS=6
    PROMPT=${PROMPT:-"The history of the"}
    PRETRAIN_FLAGS="" STUDENT_FLAGS="" FINETUNE_FLAGS=""   # the launch scripts' defaults are the paper's settings
    STUDENT_CONFIG=$HERE/configs/distilgpt2.json
    ;;
  *) echo "reproduce.sh: error: SCALE=$SCALE: use mini or paper" >&2; exit 2 ;;
esac

PRETRAIN_DATA=$ROOT/data/pretrain
FINETUNE_DATA=$ROOT/data/finetune
TEACHER=$ROOT/teacher/pretrain
[[ "$SCALE" == paper ]] && TEACHER=gpt2
LOG=$ROOT/reproduce.log

source "$HERE/scripts/lib.sh"

if [[ "$DRY_RUN" != 1 ]]; then
  mkdir -p "$ROOT/timings"
  exec > >(tee -a "$LOG") 2>&1
fi

# stage NAME DONE_FILE COMMAND...: run COMMAND unless DONE_FILE exists; record its wall time.
stage() {
  local name=$1 done_file=$2; shift 2
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; echo; return; fi
  if [[ -e "$done_file" ]]; then echo "== $name: done ($done_file), skipped"; return; fi
  echo "== $name: $(date '+%H:%M:%S')"
  local start=$SECONDS
  "$@"
  echo $(( SECONDS - start )) > "$ROOT/timings/$name.seconds"
}

# ---------------------------------------------------------------------------- inputs and token folders
if [[ "$SCALE" == mini ]]; then
  stage inputs "$INPUTS/inputs.json" "$PYTHON" -m lmcompress.mini --output_dir "$INPUTS" --vocab_size "$VOCAB_SIZE"
  write_configs() {
    local vocab
    vocab=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$INPUTS/inputs.json")
    for spec in "teacher-config.json:$TEACHER_LAYERS" "student-config.json:$STUDENT_LAYERS"; do
      printf '{"model_type": "gpt2", "vocab_size": %s, "n_positions": %s, "n_embd": %s, "n_layer": %s, "n_head": 4, "bos_token_id": 0, "eos_token_id": 0}\n' \
        "$vocab" "$BLOCK_SIZE" "$WIDTH" "${spec#*:}" > "$INPUTS/${spec%%:*}"
    done
  }
  stage configs "$INPUTS/student-config.json" write_configs
  stage tokenize-pretrain "$PRETRAIN_DATA/meta.json" "$PYTHON" "$HERE/tokenize_datasets.py" \
    --tokenizer_name_or_path "$TOKENIZER" --train_file "$INPUTS/pretrain.txt" --output_dir "$PRETRAIN_DATA"
  stage tokenize-finetune "$FINETUNE_DATA/meta.json" "$PYTHON" "$HERE/tokenize_datasets.py" \
    --tokenizer_name_or_path "$TOKENIZER" --train_file "$INPUTS/finetune-train.txt" \
    --validation_file "$INPUTS/finetune-validation.txt" --test_file "$INPUTS/finetune-test.txt" \
    --output_dir "$FINETUNE_DATA"
  # the teacher: pre-trained here, since no GPT-2 weights can be had offline
  # shellcheck disable=SC2086
  stage teacher-pretrain "$TEACHER/eval_results.json" env CONFIG="$TEACHER_CONFIG" TOKENIZER="$TOKENIZER" \
    DATASET_DIR="$PRETRAIN_DATA" OUTPUT_DIR="$TEACHER" bash "$HERE/pretrain.sh" $PRETRAIN_FLAGS
else
  stage tokenize-pretrain "$PRETRAIN_DATA/meta.json" "$PYTHON" "$HERE/tokenize_datasets.py" \
    --tokenizer_name_or_path "$TOKENIZER" --dataset_name openwebtext --clean --num_proc 8 --output_dir "$PRETRAIN_DATA"
  stage tokenize-finetune "$FINETUNE_DATA/meta.json" "$PYTHON" "$HERE/tokenize_datasets.py" \
    --tokenizer_name_or_path "$TOKENIZER" --dataset_name wikitext --dataset_config_name wikitext-103-raw-v1 \
    --output_dir "$FINETUNE_DATA"
fi

# ---------------------------------------------------------------------------- students by truncation
for strategy in first distil alt; do
  stage "truncate-$strategy" "$ROOT/truncated/$strategy/truncation.json" "$PYTHON" "$HERE/truncate.py" \
    --teacher_name_or_path "$TEACHER" --strategy "$strategy" --num_layers "$STUDENT_LAYERS" \
    --output_dir "$ROOT/truncated/$strategy"
done

# ---------------------------------------------------------------------------- first stage of each route
# shellcheck disable=SC2086
stage alt-pretrain-pretrain "$ROOT/alt-pretrain/pretrain/eval_results.json" env MODEL="$ROOT/truncated/alt" \
  DATASET_DIR="$PRETRAIN_DATA" OUTPUT_DIR="$ROOT/alt-pretrain/pretrain" bash "$HERE/pretrain.sh" $STUDENT_FLAGS
for row in distil-kd:distil alt-kd:alt; do
  # shellcheck disable=SC2086
  stage "${row%%:*}-distil" "$ROOT/${row%%:*}/distil/eval_results.json" env TEACHER="$TEACHER" \
    STUDENT="$ROOT/truncated/${row#*:}" DATASET_DIR="$PRETRAIN_DATA" OUTPUT_DIR="$ROOT/${row%%:*}/distil" \
    bash "$HERE/distil.sh" $STUDENT_FLAGS
done

# ---------------------------------------------------------------------------- fine-tuning and test
finetune() {  # finetune ROW MODEL_OR_CONFIG_VARIABLE=VALUE
  local row=$1 init=$2
  # shellcheck disable=SC2086
  stage "$row-finetune" "$ROOT/$row/finetune/eval_results.json" env "$init" TOKENIZER="$TOKENIZER" \
    DATASET_DIR="$FINETUNE_DATA" OUTPUT_DIR="$ROOT/$row/finetune" bash "$HERE/train.sh" $FINETUNE_FLAGS
  stage "$row-test" "$ROOT/$row/finetune/perplexity.json" env MODEL="$ROOT/$row/finetune" \
    DATASET_DIR="$FINETUNE_DATA" bash "$HERE/evaluate.sh"
}
finetune teacher MODEL="$TEACHER"
finetune random-init CONFIG="$STUDENT_CONFIG"
finetune first MODEL="$ROOT/truncated/first"
finetune distil-kd MODEL="$ROOT/distil-kd/distil"
finetune alt-pretrain MODEL="$ROOT/alt-pretrain/pretrain"
finetune alt-kd MODEL="$ROOT/alt-kd/distil"

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "$PYTHON" -m lmcompress.report --output_root "$ROOT" --prompt "$PROMPT"; echo
else
  "$PYTHON" -m lmcompress.report --output_root "$ROOT" --prompt "$PROMPT"
fi
