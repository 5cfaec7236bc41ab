#!/usr/bin/env bash
# gpt-oss on one GPU, each part bounded in time; results under $OUT (default /tmp/gpu-out) as one archive
# (results.tgz: JSON, logs, profiler table) plus summary.txt. Run from the repo root:
#   bash benchmarks/gpu/run_gpt_oss.sh [tokens] [step] [http]      (no argument: all three)
# Environment: HTTP_TOPOLOGIES (default "agg disagg"), HTTP_CONCURRENCY (default "64 256"), WHEELS (a folder of
# wheels the image lacks, default .whl), BIN (a folder with etcd.gz and nats-server.gz when the image has none),
# TOKENS_TIMEOUT / STEP_TIMEOUT / HTTP_TIMEOUT (seconds per part).
set -u
OUT=${OUT:-/tmp/gpu-out}
WORK=/tmp/gpt-oss-work
mkdir -p "$OUT" "$WORK"
WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then  # fastapi, uvicorn, pydantic, msgspec, nats-py, aetcd, orjson, ...
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site
fi
if [ -n "${BIN:-}" ] && [ -d "$BIN" ]; then  # etcd and nats-server for the HTTP part
    mkdir -p /tmp/bin
    for f in "$BIN"/*.gz; do gunzip -c "$f" >"/tmp/bin/$(basename "$f" .gz)"; chmod +x "/tmp/bin/$(basename "$f" .gz)"; done
    export PATH=/tmp/bin:$PATH
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PARTS=${*:-tokens step http}
{
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$WORK/env.txt"
for part in $PARTS; do
    case $part in
    tokens) timeout ${TOKENS_TIMEOUT:-200} python3 -m benchmarks.gpu.gpt_oss tokens --json "$WORK/tokens.json" >"$WORK/tokens.log" 2>&1 ;;
    step) timeout ${STEP_TIMEOUT:-300} python3 -m benchmarks.gpu.gpt_oss step --json "$WORK/step.json" \
        --profile-out "$WORK/profile.txt" >"$WORK/step.log" 2>&1 ;;
    http) timeout ${HTTP_TIMEOUT:-560} python3 -m benchmarks.gpu.gpt_oss_http --topologies ${HTTP_TOPOLOGIES:-agg disagg} \
        --concurrency ${HTTP_CONCURRENCY:-64 256} --out "$WORK/http" --json "$WORK/http.json" >"$WORK/http.log" 2>&1 ;;
    esac
    echo "$part: exit $?"
done
python3 -m benchmarks.gpu.gpt_oss_summary "$WORK" | tee "$OUT/summary.txt"
tar czf "$OUT/results.tgz" -C "$WORK" .
