#!/usr/bin/env bash
# gpt-oss prefill on one GPU (benchmarks/gpu/prefill_attention.py), each part bounded in time; JSON and logs under
# $OUT (default /tmp/gpu-out). Run from the repo root with PYTHONPATH=$PWD:
#   bash benchmarks/gpu/run_prefill.sh [check] [kernel] [model-20b] [model-120b]     (no argument: all four)
# check: the GPU tests of the kernel and of the shared weights (seconds).
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PARTS=${*:-check kernel model-20b model-120b}
{
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/prefill_env.txt"
for part in $PARTS; do
    case $part in
    check) timeout ${CHECK_TIMEOUT:-180} python3 -m pytest -q -p no:cacheprovider \
        tests/engines/reference/test_prefill_attention.py tests/engines/reference/test_shared_weights.py \
        -k "used_only or cuda or cover" >"$OUT/prefill_check.log" 2>&1 ;;
    kernel) timeout ${KERNEL_TIMEOUT:-240} python3 -m benchmarks.gpu.prefill_attention kernel \
        --json "$OUT/prefill_kernel.json" >"$OUT/prefill_kernel.log" 2>&1 ;;
    model-20b) timeout ${MODEL_TIMEOUT:-280} python3 -m benchmarks.gpu.prefill_attention model --shape 20b \
        --quantization mxfp4 --iters 3 --json "$OUT/prefill_model_20b.json" >"$OUT/prefill_model_20b.log" 2>&1 ;;
    model-120b) timeout ${MODEL_TIMEOUT:-280} python3 -m benchmarks.gpu.prefill_attention model --shape 120b \
        --quantization mxfp4 --iters 3 --json "$OUT/prefill_model_120b.json" >"$OUT/prefill_model_120b.log" 2>&1 ;;
    esac
    echo "$part: exit $?"
    grep -v '^ \|^[{}]' "$OUT"/prefill_*"${part#model-}".log 2>/dev/null | tail -12  # the log lines, not the JSON
done
