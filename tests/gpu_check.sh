#!/usr/bin/env bash
# GPU check (issue 4), one GPU, offline, under 8 minutes: CUDA fp16 and bf16 training and distillation steps with
# GPT-2-small-sized random models, DeepSpeed ZeRO-2 with optimizer offload and ZeRO-3 (training, distillation and
# ZeRO inference), and evaluate.py in fp16. Each run must have a finite, falling loss (or a finite perplexity) and
# prints a tokens/s and MFU line; the script exits 1 if any run failed. Tokenizer and models are made on the fly.
#   bash tests/gpu_check.sh
set -euo pipefail

WORK_DIR=${WORK_DIR:-outputs/gpu-check}
STEPS=${STEPS:-40}
BLOCK_SIZE=${BLOCK_SIZE:-512}
BATCH_SIZE=${BATCH_SIZE:-8}
LEARNING_RATE=${LEARNING_RATE:-6e-4}
VOCAB_SIZE=${VOCAB_SIZE:-8192}         # the tokenizer's; the models keep GPT-2's 50257 rows
PEAK_TFLOPS=${PEAK_TFLOPS:-}           # dense fp16/bf16 peak of the GPU (default from its name: H100/H200 989, A100 312)
RUN_TIMEOUT=${RUN_TIMEOUT:-240}        # seconds per run

cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false LMCOMPRESS_CACHE="$WORK_DIR/token-cache"
export NPROC_PER_NODE=1 NNODES=1
source scripts/lib.sh
DATA=$WORK_DIR/data
FAILED=()

prepare() {
  mkdir -p "$DATA"
  "$PYTHON" - "$DATA" "$VOCAB_SIZE" <<'EOF'
import json, sys
from pathlib import Path
from lmcompress.corpus import topics
from lmcompress.vocab import train_bpe_tokenizer

data, vocab_size = Path(sys.argv[1]), int(sys.argv[2])
docs = list(topics())
parts = {"train": docs[:-40], "validation": docs[-40:-20], "test": docs[-20:]}
for split, texts in parts.items():
    (data / f"{split}.txt").write_text("\n\n".join(texts) + "\n", encoding="utf-8")
train_bpe_tokenizer(["\n\n".join(parts["train"])], vocab_size, data / "tokenizer")
gpt2 = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
        "bos_token_id": 0, "eos_token_id": 0}
(data / "gpt2-small.json").write_text(json.dumps(gpt2))
(data / "student.json").write_text(json.dumps({**gpt2, "n_layer": 6}))
EOF
}

# report NAME KIND FOLDER: check the run and print tokens/s and MFU. KIND: train | distil | eval.
report() {
  "$PYTHON" - "$@" "$STEPS" "$BATCH_SIZE" "$BLOCK_SIZE" "$PEAK_TFLOPS" <<'EOF'
import json, math, sys
from pathlib import Path
import torch

name, kind, folder, steps, batch, block, peak = sys.argv[1:8]
folder, steps, batch, block = Path(folder), int(steps), int(batch), int(block)
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
peak = float(peak) if peak else next((tf for key, tf in (("H100", 989), ("H200", 989), ("A100", 312)) if key in gpu), None)

def flops_per_token(config_file, passes):
    """passes 3 for forward + backward, 1 for a forward: (2N + 4·L·d·T) per pass (PaLM's estimate)."""
    config = json.loads(Path(config_file).read_text())
    d, layers = config["n_embd"], config["n_layer"]
    params = config["vocab_size"] * d + config["n_positions"] * d + layers * 12 * d * d
    return passes * (2 * params + 4 * layers * d * block)

if kind == "eval":
    result = json.loads((folder / "perplexity.json").read_text())
    ok = math.isfinite(result["perplexity"])
    tokens_per_second = result["tokens_per_second"]
    flops = flops_per_token(folder / "config.json", 1)
    detail = f"perplexity {result['perplexity']:.1f} ({result['precision']})"
else:
    state = json.loads((folder / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    head, tail = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    ok = all(math.isfinite(loss) for loss in losses) and tail < head - 0.3
    results = json.loads((folder / "train_results.json").read_text())
    tokens_per_second = results.get("train_tokens", steps * batch * block) / results["train_runtime"]
    flops = flops_per_token(folder / "config.json", 3)
    if kind == "distil":
        flops += flops_per_token(json.loads((folder / "distillation.json").read_text())["teacher"] + "/config.json", 1)
    detail = f"loss {head:.3f} -> {tail:.3f} over {len(losses)} logs (runtime includes the first steps' warm-up)"
mfu = f"{100 * tokens_per_second * flops / (peak * 1e12):.1f}%" if peak else "n/a (set PEAK_TFLOPS)"
print(f"[{'PASS' if ok else 'FAIL'}] {name:<22} {detail}; {tokens_per_second:,.0f} tokens/s; MFU {mfu} on {gpu}",
      flush=True)
sys.exit(0 if ok else 1)
EOF
}

# check NAME KIND FOLDER COMMAND...: run the command (output in WORK_DIR/NAME.log), then report on FOLDER.
check() {
  local name=$1 kind=$2 folder=$3; shift 3
  local start=$SECONDS log=$WORK_DIR/${name// /-}.log
  if timeout "$RUN_TIMEOUT" "$@" > "$log" 2>&1 && report "$name" "$kind" "$folder"; then
    echo "      ($(( SECONDS - start )) s, log $log)"
  else
    echo "[FAIL] $name: see $log"; tail -5 "$log"; FAILED+=("$name")
  fi
}

train_env() {  # train_env PRECISION OUTPUT_DIR: the variables shared by the training runs
  echo CONFIG="$DATA/gpt2-small.json" TOKENIZER="$DATA/tokenizer" TRAIN_FILE="$DATA/train.txt" \
    VALIDATION_FILE="$DATA/validation.txt" PRECISION="$1" OUTPUT_DIR="$2" BLOCK_SIZE="$BLOCK_SIZE" \
    BATCH_SIZE="$BATCH_SIZE" EVAL_BATCH_SIZE="$BATCH_SIZE" GRAD_ACC=1 LEARNING_RATE="$LEARNING_RATE" \
    WARMUP_RATIO=0.1 LOGGING_STEPS=2
}

distil_env() {  # distil_env PRECISION OUTPUT_DIR
  echo TEACHER="$WORK_DIR/train-bf16" STUDENT_CONFIG="$DATA/student.json" TOKENIZER="$DATA/tokenizer" \
    TRAIN_FILE="$DATA/train.txt" VALIDATION_FILE="$DATA/validation.txt" PRECISION="$1" OUTPUT_DIR="$2" \
    BLOCK_SIZE="$BLOCK_SIZE" BATCH_SIZE="$BATCH_SIZE" EVAL_BATCH_SIZE="$BATCH_SIZE" GRAD_ACC=1 \
    LEARNING_RATE="$LEARNING_RATE" WARMUP_RATIO=0.1 LOGGING_STEPS=2
}

FLAGS=(--max_steps "$STEPS" --eval_strategy no --save_strategy no --report_to none --overwrite_output_dir)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# The launch scripts' PRECISION default for this GPU (scripts/lib.sh): bf16 from compute capability 8.0, else fp16.
"$PYTHON" -c 'import torch; major, minor = torch.cuda.get_device_capability(0)
print(f"compute capability {major}.{minor}: PRECISION defaults to", "bf16" if major >= 8 else "fp16")' || true
prepare
for precision in fp16 bf16; do
  # shellcheck disable=SC2046
  check "train $precision" train "$WORK_DIR/train-$precision" \
    env $(train_env "$precision" "$WORK_DIR/train-$precision") bash train.sh "${FLAGS[@]}"
done
for precision in fp16 bf16; do
  # shellcheck disable=SC2046
  check "distil $precision" distil "$WORK_DIR/distil-$precision" \
    env $(distil_env "$precision" "$WORK_DIR/distil-$precision") bash distil.sh "${FLAGS[@]}"
done
# shellcheck disable=SC2046
check "ZeRO-2 offload fp16" train "$WORK_DIR/zero2" \
  env $(train_env fp16 "$WORK_DIR/zero2") DS_CONFIG=ds_config.json bash train_deepspeed.sh "${FLAGS[@]}"
# shellcheck disable=SC2046
check "ZeRO-3 bf16" train "$WORK_DIR/zero3" \
  env $(train_env bf16 "$WORK_DIR/zero3") DS_CONFIG=ds_config_zero3.json bash train_deepspeed.sh "${FLAGS[@]}"
# shellcheck disable=SC2046
check "distil ZeRO-3 fp16" distil "$WORK_DIR/distil-zero3" \
  env $(distil_env fp16 "$WORK_DIR/distil-zero3") DS_CONFIG=ds_config_zero3.json bash distil_deepspeed.sh "${FLAGS[@]}"
check "evaluate fp16" eval "$WORK_DIR/train-fp16" \
  env MODEL="$WORK_DIR/train-fp16" TEST_FILE="$DATA/test.txt" PRECISION=fp16 BLOCK_SIZE="$BLOCK_SIZE" bash evaluate.sh
# bf16 evaluation (the issue's figure: run the whole script with BLOCK_SIZE=1024 for block 1024 throughout)
check "evaluate bf16" eval "$WORK_DIR/train-bf16" \
  env MODEL="$WORK_DIR/train-bf16" TEST_FILE="$DATA/test.txt" PRECISION=bf16 BLOCK_SIZE="$BLOCK_SIZE" bash evaluate.sh
check "evaluate ZeRO-3 fp16" eval "$WORK_DIR/zero3" \
  env MODEL="$WORK_DIR/zero3" TEST_FILE="$DATA/test.txt" PRECISION=fp16 BLOCK_SIZE="$BLOCK_SIZE" \
  DS_CONFIG=ds_config_zero3.json bash evaluate_deepspeed.sh

echo "total ${SECONDS} s"
if (( ${#FAILED[@]} )); then echo "FAILED: ${FAILED[*]}"; exit 1; fi
echo "all GPU checks passed"
