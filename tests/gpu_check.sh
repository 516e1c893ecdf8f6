#!/usr/bin/env bash
# GPU check, one GPU, offline, under 8 minutes: CUDA fp16 and bf16 training and distillation steps with
# GPT-2-small-sized random models, DeepSpeed ZeRO-2 with optimizer offload and ZeRO-3 (training, distillation and
# ZeRO inference), and evaluate.py in fp16 and bf16. Each run must have a finite, falling loss (or a finite
# perplexity) and prints its tokens/s, MFU and peak GPU memory (peak_memory_bytes of train_results.json or of the
# perplexity JSON); the script first prints the PRECISION default the launch scripts give this GPU, and exits 1 if
# any run failed. Tokenizer and models are made on the fly.
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
unset PRECISION  # so that lib.sh sets the default it gives this GPU
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
DEFAULT_PRECISION=$PRECISION
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
    peak_bytes = result.get("peak_memory_bytes")
else:
    state = json.loads((folder / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    head, tail = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    ok = all(math.isfinite(loss) for loss in losses) and tail < head - 0.3
    results = json.loads((folder / "train_results.json").read_text())
    tokens_per_second = results.get("train_tokens", steps * batch * block) / results["train_runtime"]
    peak_bytes = results.get("peak_memory_bytes")
    flops = flops_per_token(folder / "config.json", 3)
    if kind == "distil":
        flops += flops_per_token(json.loads((folder / "distillation.json").read_text())["teacher"] + "/config.json", 1)
    detail = f"loss {head:.3f} -> {tail:.3f} over {len(losses)} logs (runtime includes the first steps' warm-up)"
mfu = f"{100 * tokens_per_second * flops / (peak * 1e12):.1f}%" if peak else "n/a (set PEAK_TFLOPS)"
ok = ok and peak_bytes is not None
peak_memory = f"{peak_bytes / 2**30:.2f} GiB" if peak_bytes is not None else "missing"
print(f"[{'PASS' if ok else 'FAIL'}] {name:<22} {detail}; {tokens_per_second:,.0f} tokens/s; MFU {mfu}; "
      f"peak GPU memory {peak_memory} on {gpu}", flush=True)
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

# The variables of the runs, as env arguments; each run adds PRECISION and OUTPUT_DIR.
COMMON_ENV=(TOKENIZER="$DATA/tokenizer" TRAIN_FILE="$DATA/train.txt" VALIDATION_FILE="$DATA/validation.txt"
            BLOCK_SIZE="$BLOCK_SIZE" BATCH_SIZE="$BATCH_SIZE" EVAL_BATCH_SIZE="$BATCH_SIZE" GRAD_ACC=1
            LEARNING_RATE="$LEARNING_RATE" WARMUP_RATIO=0.1 LOGGING_STEPS=2)
TRAIN_ENV=("${COMMON_ENV[@]}" CONFIG="$DATA/gpt2-small.json")
DISTIL_ENV=("${COMMON_ENV[@]}" TEACHER="$WORK_DIR/train-bf16" STUDENT_CONFIG="$DATA/student.json")

FLAGS=(--max_steps "$STEPS" --eval_strategy no --save_strategy no --report_to none --overwrite_output_dir)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "PRECISION defaults to $DEFAULT_PRECISION on this machine (scripts/lib.sh: bf16 from compute capability 8.0," \
  "fp16 before, fp32 without a GPU; compute capability $GPU_MAJOR.x)"
prepare
for precision in fp16 bf16; do
  check "train $precision" train "$WORK_DIR/train-$precision" \
    env "${TRAIN_ENV[@]}" PRECISION="$precision" OUTPUT_DIR="$WORK_DIR/train-$precision" bash train.sh "${FLAGS[@]}"
done
for precision in fp16 bf16; do
  check "distil $precision" distil "$WORK_DIR/distil-$precision" \
    env "${DISTIL_ENV[@]}" PRECISION="$precision" OUTPUT_DIR="$WORK_DIR/distil-$precision" bash distil.sh "${FLAGS[@]}"
done
check "ZeRO-2 offload fp16" train "$WORK_DIR/zero2" \
  env "${TRAIN_ENV[@]}" PRECISION=fp16 OUTPUT_DIR="$WORK_DIR/zero2" DS_CONFIG=ds_config.json \
  bash train_deepspeed.sh "${FLAGS[@]}"
check "ZeRO-3 bf16" train "$WORK_DIR/zero3" \
  env "${TRAIN_ENV[@]}" PRECISION=bf16 OUTPUT_DIR="$WORK_DIR/zero3" DS_CONFIG=ds_config_zero3.json \
  bash train_deepspeed.sh "${FLAGS[@]}"
check "distil ZeRO-3 fp16" distil "$WORK_DIR/distil-zero3" \
  env "${DISTIL_ENV[@]}" PRECISION=fp16 OUTPUT_DIR="$WORK_DIR/distil-zero3" DS_CONFIG=ds_config_zero3.json \
  bash distil_deepspeed.sh "${FLAGS[@]}"
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
