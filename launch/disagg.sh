#!/usr/bin/env bash
# One machine, disaggregated: frontend + 1 prefill + 1 decode worker over etcd + NATS
# (start the services with launch/services.sh).
# Env: ENGINE (torch), MODEL_PATH, SERVED_MODEL_NAME, HTTP_PORT (8000), NAMESPACE (dynamo),
#      DISAGGREGATION_STRATEGY (prefill_first), THREADS_PER_WORKER (1), ETCD_ENDPOINTS, NATS_SERVER,
#      PREFILL_METRICS_PORT (9101), DECODE_METRICS_PORT (9102) (deploy/prometheus/prometheus.yml scrapes these),
#      EXTRA_WORKER_ARGS, EXTRA_FRONTEND_ARGS, DRY_RUN=1
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_common.sh
ENGINE=${ENGINE:-torch}
NAMESPACE=${NAMESPACE:-dynamo}
HTTP_PORT=${HTTP_PORT:-8000}
STRATEGY=${DISAGGREGATION_STRATEGY:-prefill_first}
THREADS=${THREADS_PER_WORKER:-1}
export ETCD_ENDPOINTS=${ETCD_ENDPOINTS:-127.0.0.1:2379} NATS_SERVER=${NATS_SERVER:-nats://127.0.0.1:4222}
MODEL_ARGS=()
[ -n "${MODEL_PATH:-}" ] && MODEL_ARGS+=(--model-path "$MODEL_PATH")
[ -n "${SERVED_MODEL_NAME:-}" ] && MODEL_ARGS+=(--served-model-name "$SERVED_MODEL_NAME")
run_bg frontend python -m dynamo_lite.frontend --http-host 127.0.0.1 --http-port "$HTTP_PORT" \
  --router-mode round-robin --namespace "$NAMESPACE" ${EXTRA_FRONTEND_ARGS:-}
declare -A METRICS_PORT=([prefill]=${PREFILL_METRICS_PORT:-9101} [decode]=${DECODE_METRICS_PORT:-9102})
for mode in prefill decode; do
  run_bg "$mode" python -m dynamo_lite.worker --mode "$mode" --engine "$ENGINE" --namespace "$NAMESPACE" \
    --disaggregation-strategy "$STRATEGY" --threads "$THREADS" --metrics-port "${METRICS_PORT[$mode]}" \
    "${MODEL_ARGS[@]}" ${EXTRA_WORKER_ARGS:-}
done
wait_children
