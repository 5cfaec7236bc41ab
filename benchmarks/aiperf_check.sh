#!/usr/bin/env bash
# Run NVIDIA's aiperf (pip install aiperf, ideally in its own venv) against dynamo_lite with the seed's flags:
# streaming chat, synthetic ISL/OSL, ignore_eos. Starts an embedded mocker server on a free loopback port
# unless URL is given. Exits non-zero if aiperf reports any error. (Not under HF_HUB_OFFLINE=1: aiperf then
# looks a local tokenizer folder up as a hub snapshot and fails; a local folder path needs no hub either way.)
#   AIPERF=/path/to/venv/bin/aiperf CONCURRENCY=64 REQUESTS=256 ISL=1000 OSL=2000 benchmarks/aiperf_check.sh
# The seed's full flags (docs/gpt_oss_disagg.md), e.g. against launch/disagg.sh: benchmarks/seed_shape.sh with
# LOADGEN=aiperf, or URL=http://127.0.0.1:8000 CONCURRENCY=2048 REQUESTS=6144 WARMUP=1000 DATASET=8000.
set -euo pipefail
cd "$(dirname "$0")/.."
AIPERF=${AIPERF:-aiperf}
CONCURRENCY=${CONCURRENCY:-64}
REQUESTS=${REQUESTS:-256}
WARMUP=${WARMUP:-8}
DATASET=${DATASET:-$REQUESTS}
ISL=${ISL:-1000}
OSL=${OSL:-2000}
ARTIFACTS=${ARTIFACTS:-artifacts/aiperf}
MODEL=${MODEL:-SmolLM2-135M-Instruct}
TOKENIZER=$(python -c 'from dynamo_lite.model_files import resolve_model; print(resolve_model().folder)')
SERVER_PID=""
if [ -z "${URL:-}" ]; then
  PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  URL="http://127.0.0.1:$PORT"
  python -m dynamo_lite serve --engine mocker --speedup-ratio 0 --http-port "$PORT" --max-seq-len 8192 \
    --log-level WARNING >"${TMPDIR:-/tmp}/aiperf-server.log" 2>&1 &
  SERVER_PID=$!
  trap '[ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; wait 2>/dev/null' EXIT
  for _ in $(seq 1 120); do curl -sf "$URL/v1/models" | grep -q "$MODEL" && break; sleep 0.5; done
fi
mkdir -p "$ARTIFACTS"
"$AIPERF" profile --model "$MODEL" --tokenizer "$TOKENIZER" --url "$URL" --endpoint-type chat \
  --endpoint /v1/chat/completions --streaming \
  --synthetic-input-tokens-mean "$ISL" --synthetic-input-tokens-stddev 0 \
  --output-tokens-mean "$OSL" --output-tokens-stddev 0 \
  --extra-inputs "max_tokens:$OSL" --extra-inputs "min_tokens:$OSL" --extra-inputs ignore_eos:true \
  --concurrency "$CONCURRENCY" --request-count "$REQUESTS" --warmup-request-count "$WARMUP" \
  --num-dataset-entries "$DATASET" --random-seed 100 \
  --artifact-dir "$ARTIFACTS" --ui-type none 2>&1 | tee "$ARTIFACTS/aiperf.log"
python - "$ARTIFACTS" <<'PY'
import json, pathlib, sys
files = sorted(pathlib.Path(sys.argv[1]).rglob("profile_export_aiperf.json"))
if not files:
    sys.exit("no aiperf export found")
data = json.loads(files[-1].read_text())
errors = data.get("error_summary") or []
count = sum(e.get("count", 0) for e in errors) if isinstance(errors, list) else errors
req = data.get("request_count", {})
print(f"aiperf: requests {req.get('avg', req) if isinstance(req, dict) else req}, errors {count}")
sys.exit(1 if count else 0)
PY
