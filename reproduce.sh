#!/usr/bin/env bash
# The paper's three tables end to end (kd_finetune: KD while fine-tuning; compression: truncation, pre-training,
# distillation; cleaning: the pre-training data raw or cleaned): tokenize → truncate → pre-train or distil →
# fine-tune (with or without KD) → evaluate, then results.md, results.csv and results.png under OUTPUT_ROOT.
#   ROWS="ft-kd alt-kd"               only these rows (and the stages they need)
#   ARCH=llama                        mini scale: a Llama-architecture teacher instead of GPT-2
#   SCALE=mini  bash reproduce.sh     offline, CPU, minutes: a small teacher pre-trained here on Python's docs
#   SCALE=paper bash reproduce.sh     GPT-2, OpenWebText, WikiText-103, the paper's settings, on the GPUs present
#   DRY_RUN=1   prints the commands without running them.
# A stage whose output is complete is skipped, so re-running after a crash resumes where it stopped.
set -euo pipefail

SCALE=${SCALE:-mini}
ARCH=${ARCH:-gpt2}                      # mini scale: gpt2 | llama, the architecture of the teacher built here
SUFFIX=$([[ "$ARCH" == gpt2 ]] || echo "-$ARCH")   # ARCH=llama writes its own results beside gpt2's
OUTPUT_ROOT=${OUTPUT_ROOT:-outputs/reproduce-$SCALE$SUFFIX}
DRY_RUN=${DRY_RUN:-0}

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$OUTPUT_ROOT
export NPROC_PER_NODE=${NPROC_PER_NODE:-}

RUNS="teacher random-init first distil-kd alt-pretrain alt-kd importance ft-kd ft-kd-hidden ft-kd-attention ft-reverse-kl alt-pretrain-raw"
ROWS=${ROWS:-$RUNS}
WANTED=""   # the runs of the rows asked for: ft-none is distil-kd's run, alt-pretrain-clean alt-pretrain's
for row in $ROWS; do
  case "$row" in ft-none) row=distil-kd ;; alt-pretrain-clean) row=alt-pretrain ;; esac
  if [[ " $RUNS " != *" $row "* ]]; then
    echo "reproduce.sh: error: ROWS: no row $row; the rows are: $RUNS ft-none alt-pretrain-clean" >&2; exit 2
  fi
  WANTED+=" $row"
done
want() { [[ " $WANTED " == *" $1 "* ]]; }
want_distil_kd() { want distil-kd || [[ " $WANTED " == *" ft-"* ]]; }   # every ft-* row starts from distil-kd's student

case "$SCALE" in
  mini)
    INPUTS=$ROOT/inputs
    TOKENIZER=$INPUTS/tokenizer
    TEACHER_LAYERS=${TEACHER_LAYERS:-4}
    STUDENT_LAYERS=${STUDENT_LAYERS:-2}
    WIDTH=${WIDTH:-128}
    VOCAB_SIZE=${VOCAB_SIZE:-4096}          # of the BPE trained here when GPT-2's is not in the hub cache
    BLOCK_SIZE=${BLOCK_SIZE:-128}
    BATCH_SIZE=${BATCH_SIZE:-16}
    TEACHER_STEPS=${TEACHER_STEPS:-1000}    # the teacher's own pre-training: long enough that it leads every student clearly
    STUDENT_STEPS=${STUDENT_STEPS:-40}      # each student's pre-training or distillation
    FINETUNE_STEPS=${FINETUNE_STEPS:-50}    # every row's fine-tuning, with or without KD
    PROMPT=${PROMPT:-"The for statement is used to"}
    export NPROC_PER_NODE=${NPROC_PER_NODE:-1} PRECISION=${PRECISION:-fp32} BLOCK_SIZE BATCH_SIZE EVAL_BATCH_SIZE=16 \
      GRAD_ACC=1 LOGGING_STEPS=10 WARMUP_RATIO=0.05
    QUIET=(--save_strategy no --report_to none --disable_tqdm True)
    PRETRAIN_FLAGS=(--max_steps "$TEACHER_STEPS" --learning_rate 2e-3 "${QUIET[@]}")
    STUDENT_FLAGS=(--max_steps "$STUDENT_STEPS" --learning_rate 1e-3 "${QUIET[@]}")
    FINETUNE_FLAGS=(--max_steps "$FINETUNE_STEPS" --learning_rate 1e-3 --eval_strategy steps --eval_steps 25 "${QUIET[@]}")
    KD_FINETUNE_ENV=() KD_FINETUNE_FLAGS=()
    CALIBRATION_TOKENS=${CALIBRATION_TOKENS:-4096}
    STUDENT_CONFIG=$INPUTS/student-config.json
    ;;
  paper)
    TOKENIZER=gpt2
    STUDENT_LAYERS=6
    BLOCK_SIZE=1024
    PROMPT=${PROMPT:-"The history of the"}
    PRETRAIN_FLAGS=() STUDENT_FLAGS=() FINETUNE_FLAGS=()   # the launch scripts' defaults are the paper's settings
    # fine-tuning with KD: the original's distil_pkd.sh settings (WikiText-103, 6 epochs, batch 8 x 4, T 1, each alpha
    # .2; its runner's learning rate 5e-5, no warmup, position embeddings trained: train.sh's, as for ft-none)
    KD_FINETUNE_ENV=(EPOCHS=6 BATCH_SIZE=8 GRAD_ACC=4 TEMPERATURE=1.0 ALPHA_CE=0.2 ALPHA_CLM=0.2 ALPHA_COS=0.2
      LEARNING_RATE=5e-5 WARMUP_RATIO=0.0 FREEZE_POS_EMBS=0)
    KD_FINETUNE_FLAGS=(--eval_strategy epoch)   # selected and reported like a fine-tuned model
    CALIBRATION_TOKENS=${CALIBRATION_TOKENS:-262144}
    STUDENT_CONFIG=$HERE/configs/distilgpt2.json
    ;;
  *) echo "reproduce.sh: error: SCALE=$SCALE: use mini or paper" >&2; exit 2 ;;
esac
case "$ARCH" in gpt2|llama) ;; *) echo "reproduce.sh: error: ARCH=$ARCH: use gpt2 or llama" >&2; exit 2 ;; esac
if [[ "$SCALE" == paper && "$ARCH" != gpt2 ]]; then
  echo "reproduce.sh: error: ARCH=$ARCH: SCALE=paper compresses the GPT-2 checkpoint; ARCH picks the teacher built here at SCALE=mini (use SCALE=mini ARCH=$ARCH, or drop ARCH)" >&2
  exit 2
fi

PRETRAIN_DATA=$ROOT/data/pretrain          # cleaned, as the paper's OpenWebText
PRETRAIN_RAW=$ROOT/data/pretrain-raw       # the same text, not cleaned: the cleaning table's other row
FINETUNE_DATA=$ROOT/data/finetune
TEACHER=$ROOT/teacher/pretrain
[[ "$SCALE" == paper ]] && TEACHER=gpt2
FINETUNED_TEACHER=$ROOT/teacher/finetune
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
  stage inputs "$INPUTS/inputs.json" "$PYTHON" -m lmcompress.mini --output_dir "$INPUTS" --vocab_size "$VOCAB_SIZE" \
    --arch "$ARCH" --block_size "$BLOCK_SIZE" --width "$WIDTH" --teacher_layers "$TEACHER_LAYERS" \
    --student_layers "$STUDENT_LAYERS"
  PRETRAIN_SOURCE=(--train_file "$INPUTS/pretrain.txt")
  FINETUNE_SOURCE=(--train_file "$INPUTS/finetune-train.txt" --validation_file "$INPUTS/finetune-validation.txt"
    --test_file "$INPUTS/finetune-test.txt")
else
  PRETRAIN_SOURCE=(--dataset_name openwebtext --num_proc 8)
  FINETUNE_SOURCE=(--dataset_name wikitext --dataset_config_name wikitext-103-raw-v1)
fi
stage tokenize-pretrain "$PRETRAIN_DATA/meta.json" "$PYTHON" "$HERE/tokenize_datasets.py" \
  --tokenizer_name_or_path "$TOKENIZER" "${PRETRAIN_SOURCE[@]}" --clean --output_dir "$PRETRAIN_DATA"
if want alt-pretrain-raw; then
  stage tokenize-pretrain-raw "$PRETRAIN_RAW/meta.json" "$PYTHON" "$HERE/tokenize_datasets.py" \
    --tokenizer_name_or_path "$TOKENIZER" "${PRETRAIN_SOURCE[@]}" --output_dir "$PRETRAIN_RAW"
fi
stage tokenize-finetune "$FINETUNE_DATA/meta.json" "$PYTHON" "$HERE/tokenize_datasets.py" \
  --tokenizer_name_or_path "$TOKENIZER" "${FINETUNE_SOURCE[@]}" --output_dir "$FINETUNE_DATA"
if [[ "$SCALE" == mini ]]; then
  # the teacher: pre-trained here, since no GPT-2 weights can be had offline
  stage teacher-pretrain "$TEACHER/eval_results.json" env CONFIG="$INPUTS/teacher-config.json" TOKENIZER="$TOKENIZER" \
    DATASET_DIR="$PRETRAIN_DATA" OUTPUT_DIR="$TEACHER" bash "$HERE/pretrain.sh" "${PRETRAIN_FLAGS[@]}"
fi

# ---------------------------------------------------------------------------- students by truncation
truncate_student() {  # truncate_student STRATEGY FLAGS...
  local strategy=$1; shift
  stage "truncate-$strategy" "$ROOT/truncated/$strategy/truncation.json" "$PYTHON" "$HERE/truncate.py" \
    --teacher_name_or_path "$TEACHER" --strategy "$strategy" --num_layers "$STUDENT_LAYERS" \
    --output_dir "$ROOT/truncated/$strategy" "$@"
}
want first && truncate_student first
want_distil_kd && truncate_student distil
want alt-pretrain || want alt-kd || want alt-pretrain-raw && truncate_student alt
want importance && truncate_student importance --importance block_influence --dataset_dir "$PRETRAIN_DATA" \
  --calibration_split train --calibration_tokens "$CALIBRATION_TOKENS" --block_size "$BLOCK_SIZE"

# ---------------------------------------------------------------------------- first stage of each route
pretrain_student() {  # pretrain_student ROW DATA
  stage "$1-pretrain" "$ROOT/$1/pretrain/eval_results.json" env MODEL="$ROOT/truncated/alt" \
    DATASET_DIR="$2" OUTPUT_DIR="$ROOT/$1/pretrain" bash "$HERE/pretrain.sh" "${STUDENT_FLAGS[@]}"
}
want alt-pretrain && pretrain_student alt-pretrain "$PRETRAIN_DATA"
want alt-pretrain-raw && pretrain_student alt-pretrain-raw "$PRETRAIN_RAW"
for row in distil-kd:distil alt-kd:alt importance:importance; do
  if [[ "${row%%:*}" == distil-kd ]]; then want_distil_kd || continue; else want "${row%%:*}" || continue; fi
  stage "${row%%:*}-distil" "$ROOT/${row%%:*}/distil/eval_results.json" env TEACHER="$TEACHER" \
    STUDENT="$ROOT/truncated/${row#*:}" DATASET_DIR="$PRETRAIN_DATA" OUTPUT_DIR="$ROOT/${row%%:*}/distil" \
    bash "$HERE/distil.sh" "${STUDENT_FLAGS[@]}"
done

# ---------------------------------------------------------------------------- fine-tuning and test
test_row() {
  stage "$1-test" "$ROOT/$1/finetune/perplexity.json" env MODEL="$ROOT/$1/finetune" \
    DATASET_DIR="$FINETUNE_DATA" bash "$HERE/evaluate.sh"
}
finetune() {  # finetune ROW MODEL_OR_CONFIG_VARIABLE=VALUE
  local row=$1 init=$2
  stage "$row-finetune" "$ROOT/$row/finetune/eval_results.json" env "$init" TOKENIZER="$TOKENIZER" \
    DATASET_DIR="$FINETUNE_DATA" OUTPUT_DIR="$ROOT/$row/finetune" bash "$HERE/train.sh" "${FINETUNE_FLAGS[@]}"
  test_row "$row"
}
finetune teacher MODEL="$TEACHER"   # every ft-* row needs the fine-tuned teacher
want random-init && finetune random-init CONFIG="$STUDENT_CONFIG"
want first && finetune first MODEL="$ROOT/truncated/first"
want distil-kd && finetune distil-kd MODEL="$ROOT/distil-kd/distil"   # also the kd_finetune table's ft-none
want alt-pretrain && finetune alt-pretrain MODEL="$ROOT/alt-pretrain/pretrain"   # also alt-pretrain-clean
want alt-kd && finetune alt-kd MODEL="$ROOT/alt-kd/distil"
want importance && finetune importance MODEL="$ROOT/importance/distil"
want alt-pretrain-raw && finetune alt-pretrain-raw MODEL="$ROOT/alt-pretrain-raw/pretrain"

# the distil student after its distillation stage (its truncation.json maps its blocks to the teacher's),
# fine-tuned with KD from the fine-tuned teacher
kd_finetune() {  # kd_finetune ROW DISTILLER_FLAGS...
  local row=$1; shift
  want "$row" || return 0
  stage "$row-finetune" "$ROOT/$row/finetune/eval_results.json" env "${KD_FINETUNE_ENV[@]}" \
    TEACHER="$FINETUNED_TEACHER" STUDENT="$ROOT/distil-kd/distil" TOKENIZER="$TOKENIZER" \
    DATASET_DIR="$FINETUNE_DATA" OUTPUT_DIR="$ROOT/$row/finetune" bash "$HERE/distil.sh" \
    "${FINETUNE_FLAGS[@]}" "${KD_FINETUNE_FLAGS[@]}" "$@"
  test_row "$row"
}
kd_finetune ft-kd
kd_finetune ft-kd-hidden --alpha_hidden 0.2
kd_finetune ft-kd-attention --alpha_att 0.2 --alpha_val 0.2
kd_finetune ft-reverse-kl --divergence reverse_kl

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "$PYTHON" -m lmcompress.report --output_root "$ROOT" --prompt "$PROMPT"; echo
else
  "$PYTHON" -m lmcompress.report --output_root "$ROOT" --prompt "$PROMPT"
fi
