#!/usr/bin/env bash
# One machine, aggregated: frontend + 1 agg worker over etcd + NATS (start them with launch/services.sh).
# Env: ENGINE (torch), MODEL_PATH (built-in SmolLM2), SERVED_MODEL_NAME, HTTP_PORT (8000), NAMESPACE (dynamo),
#      ETCD_ENDPOINTS (127.0.0.1:2379), NATS_SERVER (nats://127.0.0.1:4222), EXTRA_WORKER_ARGS, DRY_RUN=1
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_common.sh
ENGINE=${ENGINE:-torch}
NAMESPACE=${NAMESPACE:-dynamo}
HTTP_PORT=${HTTP_PORT:-8000}
export ETCD_ENDPOINTS=${ETCD_ENDPOINTS:-127.0.0.1:2379} NATS_SERVER=${NATS_SERVER:-nats://127.0.0.1:4222}
MODEL_ARGS=()
[ -n "${MODEL_PATH:-}" ] && MODEL_ARGS+=(--model-path "$MODEL_PATH")
[ -n "${SERVED_MODEL_NAME:-}" ] && MODEL_ARGS+=(--served-model-name "$SERVED_MODEL_NAME")
run_bg frontend python -m dynamo_lite.frontend --http-host 127.0.0.1 --http-port "$HTTP_PORT" \
  --router-mode round-robin --namespace "$NAMESPACE"
run_bg worker python -m dynamo_lite.worker --mode agg --engine "$ENGINE" --namespace "$NAMESPACE" \
  "${MODEL_ARGS[@]}" ${EXTRA_WORKER_ARGS:-}
wait_children
