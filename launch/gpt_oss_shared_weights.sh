#!/usr/bin/env bash
# gpt-oss disaggregated on ONE GPU with ONE copy of the weights: a weights holder owns the weights in GPU memory,
# a prefill and a decode torch-engine worker map them (CUDA IPC) with --shared-weights, a frontend routes between
# them over etcd + NATS (start those with launch/services.sh). Walkthrough: docs/shared_weights.md.
#
#   launch/gpt_oss_shared_weights.sh             start everything; Ctrl-C (or SIGTERM) stops everything
#   DRY_RUN=1 launch/gpt_oss_shared_weights.sh   print the commands, start nothing
#
# A worker that exits is restarted (it maps the same weights again: no second copy). A worker that exits with
# status 75 lost its weights holder: then nothing is restarted and everything stops (restart the script).
# Env (defaults in brackets): MODEL_PATH [openai/gpt-oss-120b]  GPU [0]  DTYPE [bfloat16]  QUANTIZATION [mxfp4]
#   LOAD_FORMAT [auto; dummy = random weights of the model's shape]  SOCKET [/tmp/dynamo-weights-gpu$GPU.sock]
#   NAMESPACE [dynamo]  HTTP_PORT [8000]  PREFILL_MAX_NUM_TOKENS [16384]  DECODE_MAX_BATCH_SIZE [256]
#   MAX_SEQ_LEN [4096]  PREFILL_FRACTION [0.25] / DECODE_FRACTION [0.6]: each worker's share of the GPU memory
#   free when it starts, for its KV cache (the prefill worker starts first)  EXTRA_WORKER_ARGS
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_common.sh
MODEL_PATH=${MODEL_PATH:-openai/gpt-oss-120b}
GPU=${GPU:-0}
SOCKET=${SOCKET:-/tmp/dynamo-weights-gpu$GPU.sock}
NAMESPACE=${NAMESPACE:-dynamo}
HTTP_PORT=${HTTP_PORT:-8000}
export ETCD_ENDPOINTS=${ETCD_ENDPOINTS:-127.0.0.1:2379} NATS_SERVER=${NATS_SERVER:-nats://127.0.0.1:4222}
YAML=$(mktemp /tmp/dynamo-shared-weights-XXXX.yaml)
echo "load_format: ${LOAD_FORMAT:-auto}" >"$YAML"
WEIGHTS=(--model-path "$MODEL_PATH" --device "cuda:0" --dtype "${DTYPE:-bfloat16}"
  --quantization "${QUANTIZATION:-mxfp4}" --extra-engine-args "$YAML")
export CUDA_VISIBLE_DEVICES=$GPU

supervise() {  # supervise NAME CMD... : run CMD, restart it when it exits, unless it lost the weights holder
  local name=$1 child=""; shift
  trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null; wait "$child" 2>/dev/null; exit 0' TERM INT
  while true; do
    "$@" &
    child=$!
    local rc=0
    wait "$child" || rc=$?
    if [ "$rc" -eq 75 ]; then
      echo "$name: its weights holder is gone; not restarting" >&2
      return 75
    fi
    echo "$name exited ($rc); restarting: it maps the holder's weights again" >&2
    sleep 1
  done
}

run_bg holder python -m dynamo_lite.engines.reference.shared_weights --socket "$SOCKET" "${WEIGHTS[@]}"
run_bg frontend python -m dynamo_lite.frontend --http-host 127.0.0.1 --http-port "$HTTP_PORT" \
  --router-mode round-robin --namespace "$NAMESPACE" --worker-return-timeout "${WORKER_RETURN_TIMEOUT:-120}"
run_bg prefill supervise prefill python -m dynamo_lite.worker --mode prefill --engine torch \
  --namespace "$NAMESPACE" "${WEIGHTS[@]}" --shared-weights "$SOCKET" \
  --max-num-tokens "${PREFILL_MAX_NUM_TOKENS:-16384}" --max-seq-len "${MAX_SEQ_LEN:-4096}" \
  --free-gpu-memory-fraction "${PREFILL_FRACTION:-0.25}" --metrics-port 9101 ${EXTRA_WORKER_ARGS:-}
run_bg decode supervise decode python -m dynamo_lite.worker --mode decode --engine torch \
  --namespace "$NAMESPACE" "${WEIGHTS[@]}" --shared-weights "$SOCKET" \
  --max-batch-size "${DECODE_MAX_BATCH_SIZE:-256}" --max-seq-len "${MAX_SEQ_LEN:-4096}" \
  --free-gpu-memory-fraction "${DECODE_FRACTION:-0.6}" --metrics-port 9102 ${EXTRA_WORKER_ARGS:-}
wait_children
rm -f "$YAML"
