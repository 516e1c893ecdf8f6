# shellcheck shell=bash disable=SC2034  # DATA_ARGS, PRECISION_ARGS: read by the scripts that source this file
# Shared by the launch scripts: data flags, precision, and the launcher (python, torchrun or deepspeed).
# Each script sets its variables first, then sources this file.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -z "${VIRTUAL_ENV:-}" && -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

# Ask torch about GPUs only when a setting depends on them: the count when NPROC_PER_NODE is unset, the
# lowest compute capability when PRECISION is unset (bf16 from 8.0 on, fp16 before, fp32 without a GPU).
gpu_probe() {
  "$PYTHON" -c 'import torch; n = torch.cuda.device_count()
print(n, min((torch.cuda.get_device_capability(i)[0] for i in range(n)), default=0))' 2>/dev/null || echo 0 0
}
if [[ -z "${NPROC_PER_NODE:-}" || -z "${PRECISION:-}" ]]; then read -r GPU_COUNT GPU_MAJOR < <(gpu_probe); fi
NPROC_PER_NODE=${NPROC_PER_NODE:-$(( GPU_COUNT > 0 ? GPU_COUNT : 1 ))}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${PRECISION:-}" ]]; then
  if (( GPU_COUNT == 0 )); then PRECISION=fp32; elif (( GPU_MAJOR >= 8 )); then PRECISION=bf16; else PRECISION=fp16; fi
fi

# The data flags: DATASET_DIR, else local files, else a hub dataset (a name or a local folder in the hub's layout).
if [[ -n "${DATASET_DIR:-}" ]]; then
  DATA_ARGS=(--dataset_dir "$DATASET_DIR")
elif [[ -n "${TRAIN_FILE:-}${VALIDATION_FILE:-}${TEST_FILE:-}" ]]; then
  DATA_ARGS=(${TRAIN_FILE:+--train_file "$TRAIN_FILE"} ${VALIDATION_FILE:+--validation_file "$VALIDATION_FILE"}
             ${TEST_FILE:+--test_file "$TEST_FILE"})
else
  DATA_ARGS=(${DATASET_NAME:+--dataset_name "$DATASET_NAME"} ${DATASET_CONFIG:+--dataset_config_name "$DATASET_CONFIG"})
fi

case "$PRECISION" in
  fp16) PRECISION_ARGS=(--fp16) ;;
  bf16) PRECISION_ARGS=(--bf16) ;;
  fp32) PRECISION_ARGS=() ;;
  *) echo "$(basename "$0"): error: PRECISION=$PRECISION: use fp32, fp16 or bf16" >&2; exit 2 ;;
esac

# run SCRIPT ARGS...: plain python for one process, torchrun for several, the deepspeed launcher when a
# *_deepspeed.sh twin set LAUNCHER=deepspeed.
run() {
  local script=$1; shift
  if [[ "${LAUNCHER:-}" == deepspeed ]]; then
    run_deepspeed "$script" "$@"
  elif (( NPROC_PER_NODE * NNODES > 1 )); then
    set -x
    "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$REPO/$script" "$@"
  else
    set -x
    "$PYTHON" "$REPO/$script" "$@"
  fi
}

# run_deepspeed SCRIPT ARGS...: the deepspeed launcher, with --deepspeed "$DS_CONFIG". On one node it starts
# NPROC_PER_NODE processes (or those INCLUDE/EXCLUDE pick, e.g. localhost:0,1); with a HOSTFILE it starts one per
# slot on every host listed (over ssh; the first host is the master), narrowed by INCLUDE/EXCLUDE.
run_deepspeed() {
  local script=$1; shift
  local config=$DS_CONFIG resources=()
  if [[ ! -f "$config" && -f "$REPO/$config" ]]; then config=$REPO/$config; fi
  if [[ ! -f "$config" ]]; then echo "$(basename "$0"): error: DS_CONFIG=$DS_CONFIG: no such file" >&2; exit 2; fi
  if [[ -n "${INCLUDE:-}${EXCLUDE:-}" ]]; then resources=(${INCLUDE:+--include "$INCLUDE"} ${EXCLUDE:+--exclude "$EXCLUDE"})
  elif [[ -z "${HOSTFILE:-}" ]]; then resources=(--num_gpus "$NPROC_PER_NODE")
  fi
  set -x
  "$PYTHON" -m deepspeed.launcher.runner ${HOSTFILE:+--hostfile "$HOSTFILE"} "${resources[@]}" \
    --master_port "$MASTER_PORT" "$REPO/$script" --deepspeed "$config" "$@"
}
