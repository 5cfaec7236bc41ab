#!/usr/bin/env bash
# gpt-oss-120b, disaggregated, on one 8-GPU node: a frontend, a prefill worker on GPUs 0-3 and a decode worker on
# GPUs 4-7, both on TensorRT-LLM (engine_configs/gpt_oss/*.yaml). etcd and NATS must be running already.
# Walkthrough: docs/gpt_oss_disagg.md.
#
#   launch/gpt_oss_disagg.sh             start everything; Ctrl-C (or SIGTERM) stops everything
#   launch/gpt_oss_disagg.sh --dry-run   print the exact commands, start nothing (or DRY_RUN=1)
#
# Every setting is an environment variable (defaults in brackets):
#   MODEL_PATH [openai/gpt-oss-120b]   HF folder, or a repo id already downloaded into the HF cache
#   SERVED_MODEL_NAME [openai/gpt-oss-120b]   DISAGGREGATION_STRATEGY [prefill_first]
#   NAMESPACE [dynamo]   ROUTER_MODE [round-robin]   HTTP_HOST [127.0.0.1]   HTTP_PORT [8000]
#   ETCD_ENDPOINTS [http://127.0.0.1:2379]   NATS_URL [nats://127.0.0.1:4222]
#   PREFILL_GPUS [0,1,2,3]   DECODE_GPUS [4,5,6,7]
#   GPU_ARCH [from nvidia-smi: hopper for compute capability 9.x, else blackwell]
#   PREFILL_ENGINE_ARGS [engine_configs/gpt_oss[/hopper]/prefill.yaml]   DECODE_ENGINE_ARGS [same, decode.yaml]
#   PREFILL_MAX_BATCH_SIZE [32]   DECODE_MAX_BATCH_SIZE [128]   MAX_SEQ_LEN [unset: the model's context length]
#   FRONTEND_EXTRA_FLAGS, PREFILL_EXTRA_FLAGS, DECODE_EXTRA_FLAGS   more flags, split on spaces
#   PYTHON [python3]   LOG_DIR [unset: output to this terminal]   STOP_TIMEOUT_S [30]
# Keys set in the YAML files win over the worker flags (tensor/expert parallel size, max_num_tokens, ...).
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

DRY_RUN="${DRY_RUN:-0}"
while (($#)); do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "gpt_oss_disagg.sh: unknown option: $1" >&2
            usage >&2
            exit 2
            ;;
    esac
    shift
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" # the engine config paths are relative to the repository root

PYTHON="${PYTHON:-python3}"
MODEL_PATH="${MODEL_PATH:-openai/gpt-oss-120b}"
SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-openai/gpt-oss-120b}"
DISAGGREGATION_STRATEGY="${DISAGGREGATION_STRATEGY:-prefill_first}"
NAMESPACE="${NAMESPACE:-dynamo}"
ROUTER_MODE="${ROUTER_MODE:-round-robin}"
HTTP_HOST="${HTTP_HOST:-127.0.0.1}"
HTTP_PORT="${HTTP_PORT:-8000}"
ETCD_ENDPOINTS="${ETCD_ENDPOINTS:-http://127.0.0.1:2379}"
NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"
PREFILL_GPUS="${PREFILL_GPUS:-0,1,2,3}"
DECODE_GPUS="${DECODE_GPUS:-4,5,6,7}"
# The MoE backend the GPUs support: Hopper (compute capability 9.x) runs gpt-oss's MXFP4 MoE on TRITON
# (engine_configs/gpt_oss/hopper/), Blackwell on CUTLASS (engine_configs/gpt_oss/). GPU_ARCH=hopper|blackwell
# skips the query (nvidia-smi), e.g. for --dry-run on a machine without GPUs.
if [[ -z "${GPU_ARCH:-}" ]]; then
    GPU_ARCH=blackwell
    cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 || true)"
    [[ "$cap" == 9.* ]] && GPU_ARCH=hopper
fi
CONFIG_DIR=engine_configs/gpt_oss
[[ "$GPU_ARCH" == hopper ]] && CONFIG_DIR=engine_configs/gpt_oss/hopper
PREFILL_ENGINE_ARGS="${PREFILL_ENGINE_ARGS:-$CONFIG_DIR/prefill.yaml}"
DECODE_ENGINE_ARGS="${DECODE_ENGINE_ARGS:-$CONFIG_DIR/decode.yaml}"
PREFILL_MAX_BATCH_SIZE="${PREFILL_MAX_BATCH_SIZE:-32}"
DECODE_MAX_BATCH_SIZE="${DECODE_MAX_BATCH_SIZE:-128}"
MAX_SEQ_LEN="${MAX_SEQ_LEN:-}" # unset: the model's context length (131072 for gpt-oss), from its config.json
LOG_DIR="${LOG_DIR:-}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-30}"
read -r -a FRONTEND_EXTRA <<<"${FRONTEND_EXTRA_FLAGS:-}"
read -r -a PREFILL_EXTRA <<<"${PREFILL_EXTRA_FLAGS:-}"
read -r -a DECODE_EXTRA <<<"${DECODE_EXTRA_FLAGS:-}"

# The environment of the seed deployment: weights from local disk only, PDL on, sequential weight loading.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRTLLM_ENABLE_PDL="${TRTLLM_ENABLE_PDL:-1}"
export TRT_LLM_DISABLE_LOAD_WEIGHTS_IN_PARALLEL="${TRT_LLM_DISABLE_LOAD_WEIGHTS_IN_PARALLEL:-True}"

SERVICES=(--namespace "$NAMESPACE" --etcd-endpoints "$ETCD_ENDPOINTS" --nats-url "$NATS_URL")

CLEAR_CMD=("$PYTHON" -m dynamo_lite.clear_namespace --namespace "$NAMESPACE" --etcd-endpoints "$ETCD_ENDPOINTS")
FRONTEND_CMD=("$PYTHON" -m dynamo_lite.frontend "${SERVICES[@]}" --router-mode "$ROUTER_MODE"
    --http-host "$HTTP_HOST" --http-port "$HTTP_PORT" ${FRONTEND_EXTRA[@]+"${FRONTEND_EXTRA[@]}"})
worker_cmd() { # MODE GPUS ENGINE_ARGS MAX_BATCH_SIZE EXTRA_FLAGS...
    local mode="$1" gpus="$2" engine_args="$3" max_batch_size="$4"
    shift 4
    WORKER_CMD=(env "CUDA_VISIBLE_DEVICES=$gpus" "$PYTHON" -m dynamo_lite.worker "${SERVICES[@]}"
        --mode "$mode" --engine trtllm
        --model-path "$MODEL_PATH" --served-model-name "$SERVED_MODEL_NAME"
        --extra-engine-args "$engine_args" --disaggregation-strategy "$DISAGGREGATION_STRATEGY"
        --max-batch-size "$max_batch_size" ${MAX_SEQ_LEN:+--max-seq-len "$MAX_SEQ_LEN"} "$@")
}
worker_cmd prefill "$PREFILL_GPUS" "$PREFILL_ENGINE_ARGS" "$PREFILL_MAX_BATCH_SIZE" ${PREFILL_EXTRA[@]+"${PREFILL_EXTRA[@]}"}
PREFILL_CMD=("${WORKER_CMD[@]}")
# decode_first: the decode worker places prefills itself, as the frontend's --router-mode says
PLACEMENT=()
[[ "$DISAGGREGATION_STRATEGY" == decode_first ]] && PLACEMENT=(--router-mode "$ROUTER_MODE")
worker_cmd decode "$DECODE_GPUS" "$DECODE_ENGINE_ARGS" "$DECODE_MAX_BATCH_SIZE" ${PLACEMENT[@]+"${PLACEMENT[@]}"} \
    ${DECODE_EXTRA[@]+"${DECODE_EXTRA[@]}"}
DECODE_CMD=("${WORKER_CMD[@]}")

quote() { # one shell word, quoted only when it needs it
    if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}
show() { # SUFFIX CMD... : the command as one copy-pasteable line ("env VAR=x cmd" shown as "VAR=x cmd")
    local suffix="$1" line="" word
    shift
    local words=("$@")
    [[ "${words[0]}" == env ]] && words=("${words[@]:1}")
    for word in "${words[@]}"; do line+="${line:+ }$(quote "$word")"; done
    printf '+ %s%s\n' "$line" "$suffix"
}

if [[ "$DRY_RUN" == 1 ]]; then
    echo "# dry run: these commands would run from $ROOT (nothing is started)"
    show "" "${CLEAR_CMD[@]}"
    show " &" "${FRONTEND_CMD[@]}"
    show " &" "${PREFILL_CMD[@]}"
    show " &" "${DECODE_CMD[@]}"
    exit 0
fi

PIDS=()
NAMES=()
stop_children() {
    trap - EXIT INT TERM
    local i pid waited=0
    for pid in "${PIDS[@]}"; do
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    done
    for i in "${!PIDS[@]}"; do
        pid="${PIDS[$i]}"
        while kill -0 "$pid" 2>/dev/null && ((waited < STOP_TIMEOUT_S * 10)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "gpt_oss_disagg.sh: ${NAMES[$i]} (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT_S}s; killing it" >&2
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    wait 2>/dev/null || true
}
trap stop_children EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() { # NAME CMD... : run in the background in its own process group (TensorRT-LLM starts MPI ranks)
    local name="$1"
    shift
    show " &" "$@"
    local launcher=()
    command -v setsid >/dev/null && launcher=(setsid)
    if [[ -n "$LOG_DIR" ]]; then
        mkdir -p "$LOG_DIR"
        ${launcher[@]+"${launcher[@]}"} "$@" >"$LOG_DIR/$name.log" 2>&1 &
    else
        ${launcher[@]+"${launcher[@]}"} "$@" &
    fi
    PIDS+=("$!")
    NAMES+=("$name")
}

show "" "${CLEAR_CMD[@]}"
"${CLEAR_CMD[@]}"
start frontend "${FRONTEND_CMD[@]}"
start prefill "${PREFILL_CMD[@]}"
start decode "${DECODE_CMD[@]}"
echo "gpt_oss_disagg.sh: started frontend, prefill and decode (pids ${PIDS[*]}); Ctrl-C stops them"

# Run until any child exits, then stop the others and report its status.
status=0
wait -n || status=$?
for i in "${!PIDS[@]}"; do
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
        echo "gpt_oss_disagg.sh: ${NAMES[$i]} (pid ${PIDS[$i]}) exited with status $status; stopping the rest" >&2
        break
    fi
done
exit "$status"
