#!/usr/bin/env bash
# The GPU benchmarks of the torch engine in one go (one device call on a 2-GPU machine), each bounded in time;
# logs and JSON results under $OUT (default /tmp/gpu-out), then a short summary. Run from the repo root:
#   bash benchmarks/gpu/run_all.sh
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # packages the GPU image lacks (msgspec, xxhash), carried as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
    nvidia-smi topo -m
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
timeout 110 python3 -m benchmarks.gpu.kv_handoff_cuda --json "$OUT/handoff.json" 2>&1 | tee "$OUT/handoff.log"
timeout 100 python3 -m benchmarks.gpu.token_check --json "$OUT/token.json" 2>&1 | tee "$OUT/token.log"
timeout 250 python3 -m benchmarks.gpu.mixed_load --json "$OUT/mixed.json" 2>&1 | tee "$OUT/mixed.log"
python3 -m benchmarks.gpu.summary "$OUT"
