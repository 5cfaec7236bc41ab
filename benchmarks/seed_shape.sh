#!/usr/bin/env bash
# The seed's benchmark shape against the default launch (issue 20): launch/services.sh, then
# ENGINE=mocker launch/disagg.sh with its defaults, then benchmarks.load with the seed's genai-perf flags
# (streaming chat, ISL 1000, OSL 2000, max_tokens/min_tokens/ignore_eos). Prints the load summary and the
# frontend's peak RSS; stops everything it started, by PID.
#   CONCURRENCY=2048 REQUESTS=4096 SPEEDUP=0 benchmarks/seed_shape.sh
# Env: CONCURRENCY (2048), REQUESTS (4096), WARMUP (0), SPEEDUP (0: the mocker at zero time; 1: its default
#      speed), ISL (1000), OSL (2000), FRONTEND_ARGS (extra frontend flags), EXTRA_WORKER_ARGS (more worker
#      flags), RATE (open loop instead: Poisson arrivals per second), PORT_BASE (28000: HTTP on it, etcd +1/+2,
#      NATS +3, worker metrics +4/+5), OUT_DIR (artifacts/seed_shape), LOADGEN (benchmarks.load, or aiperf:
#      benchmarks/aiperf_check.sh with the seed's flags; AIPERF names its binary, DATASET its entries).
set -euo pipefail
cd "$(dirname "$0")/.."
CONCURRENCY=${CONCURRENCY:-2048}
REQUESTS=${REQUESTS:-4096}
WARMUP=${WARMUP:-0}
SPEEDUP=${SPEEDUP:-0}
ISL=${ISL:-1000}
OSL=${OSL:-2000}
PORT_BASE=${PORT_BASE:-28000}
OUT_DIR=${OUT_DIR:-artifacts/seed_shape}
HTTP_PORT=$PORT_BASE
mkdir -p "$OUT_DIR"
STATE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/seed-shape.XXXXXX")
export STATE_DIR ETCD_PORT=$((PORT_BASE + 1)) ETCD_PEER_PORT=$((PORT_BASE + 2)) NATS_PORT=$((PORT_BASE + 3))
LAUNCH_PID=""
cleanup() {
  if [ -n "$LAUNCH_PID" ]; then
    kill -TERM "$LAUNCH_PID" 2>/dev/null || true  # disagg.sh stops its children by PID
    wait "$LAUNCH_PID" 2>/dev/null || true
  fi
  launch/services.sh stop >/dev/null || true
  rm -rf "$STATE_DIR"
}
trap cleanup EXIT INT TERM
launch/services.sh start >/dev/null
ETCD_ENDPOINTS=127.0.0.1:$ETCD_PORT NATS_SERVER=nats://127.0.0.1:$NATS_PORT HTTP_PORT=$HTTP_PORT \
  PREFILL_METRICS_PORT=$((PORT_BASE + 4)) DECODE_METRICS_PORT=$((PORT_BASE + 5)) ENGINE=mocker \
  EXTRA_WORKER_ARGS="--speedup-ratio $SPEEDUP ${EXTRA_WORKER_ARGS:-}" EXTRA_FRONTEND_ARGS="${FRONTEND_ARGS:-}" \
  launch/disagg.sh >"$OUT_DIR/launch.log" 2>&1 &
LAUNCH_PID=$!
URL=http://127.0.0.1:$HTTP_PORT
for _ in $(seq 1 120); do
  curl -sf "$URL/v1/models" | grep -q '"id"' && break
  sleep 0.5
done
curl -sf "$URL/v1/models" | grep -q '"id"' || { echo "the stack did not come up" >&2; cat "$OUT_DIR/launch.log" >&2; exit 1; }
FRONTEND_PID=$(ps -o pid=,args= --ppid "$LAUNCH_PID" | awk '/dynamo_lite.frontend/ {print $1}')
LOAD=(--concurrency "$CONCURRENCY")
[ -n "${RATE:-}" ] && LOAD=(--request-rate "$RATE" --max-connections "$CONCURRENCY")
echo "frontend pid $FRONTEND_PID; load: ${LOAD[*]} --request-count $REQUESTS, mocker --speedup-ratio $SPEEDUP"
# The queued-requests gauge, sampled once a second: its peak goes in the summary.
( while sleep 1; do curl -sf -m 5 "$URL/metrics" | awk '/^dynamo_frontend_queued_requests/ {print $2}'; done ) \
  >"$OUT_DIR/queued.txt" 2>/dev/null &
SAMPLER_PID=$!
set +e
if [ "${LOADGEN:-}" = aiperf ]; then
  URL=$URL CONCURRENCY=$CONCURRENCY REQUESTS=$REQUESTS WARMUP=$WARMUP ISL=$ISL OSL=$OSL \
    DATASET=${DATASET:-$REQUESTS} ARTIFACTS=$OUT_DIR/aiperf benchmarks/aiperf_check.sh 2>&1 \
    | grep -vE '^\s*$' | tail -40 | tee "$OUT_DIR/summary.txt"
else
  python -m benchmarks.load --url "$URL" --streaming --endpoint-type chat "${LOAD[@]}" \
    --request-count "$REQUESTS" --warmup-request-count "$WARMUP" \
    --synthetic-input-tokens-mean "$ISL" --synthetic-input-tokens-stddev 0 \
    --output-tokens-mean "$OSL" --output-tokens-stddev 0 \
    --extra-inputs "max_tokens:$OSL" --extra-inputs "min_tokens:$OSL" --extra-inputs ignore_eos:true \
    --random-seed 100 --request-timeout 1800 --server-pid "$FRONTEND_PID" --no-progress \
    --artifact-dir "$OUT_DIR" | tee "$OUT_DIR/summary.txt"
fi
status=${PIPESTATUS[0]}
set -e
kill "$SAMPLER_PID" 2>/dev/null || true
wait "$SAMPLER_PID" 2>/dev/null || true
echo "queued requests, peak of 1 s samples: $(sort -g "$OUT_DIR/queued.txt" | tail -1)" | tee -a "$OUT_DIR/summary.txt"
(curl -sf "$URL/metrics" || true) | python -c '
import sys
buckets = [(float(l.split("le=\"")[1].split("\"")[0]), float(l.split()[-1])) for l in sys.stdin
           if l.startswith("dynamo_lite_frontend_request_plane_ack_seconds_bucket")]
total = buckets[-1][1] if buckets else 0
def q(f):
    return next((le for le, n in buckets if n >= f * total), float("nan"))
late = total - next((n for le, n in buckets if le == 1.25), total)
print(f"request-plane acknowledgements: {total:.0f}, p50 <= {q(0.5)} s, p99 <= {q(0.99)} s, over 1.25 s: {late:.0f}")
' | tee -a "$OUT_DIR/summary.txt"
echo "frontend peak RSS: $(awk '/VmHWM/ {printf "%.0f MB", $2 / 1024}' "/proc/$FRONTEND_PID/status")" \
  | tee -a "$OUT_DIR/summary.txt"
curl -sf "$URL/metrics" | grep -E '^dynamo_lite_frontend_errors' >>"$OUT_DIR/summary.txt" || true
exit "$status"
