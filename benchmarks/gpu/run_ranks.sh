#!/usr/bin/env bash
# The torch engine's ranks on several GPUs (issue 28), each part bounded in time; JSON and logs under $OUT (default
# /tmp/gpu-out). Needs 2 GPUs (4 for the seed-tp4 part). Run from the repo root:
#   bash benchmarks/gpu/run_ranks.sh [check] [tiny] [step-20b] [step-120b] [seed-tp4]    (no argument: the first four)
# check: tests/engines/reference/test_ranks_cuda.py (TP2 and attention-DP2 vs one GPU, the KV handed off rank by
#   rank through device memory by CUDA IPC, a follower killed mid-stream), the NCCL stand-in and the CUDA IPC
#   tests (minutes).
# tiny / step-20b / step-120b: benchmarks/gpu/ranks.py, a decode step at batch 1 and 64 (context 1000) at TP2/EP2
#   against each GPU's HBM floor; the 20b/120b checkpoints are random MXFP4 written under $WORK first (~13 / ~65 GB).
# seed-tp4: the seed's prefill layout, TP4/EP4, 120b shape.
set -u
OUT=${OUT:-/tmp/gpu-out}
WORK=${WORK:-/tmp/ranks-work}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast off
PARTS=${*:-check tiny step-20b step-120b}
{
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
    nvidia-smi topo -m
    python3 -c "import torch, torch.distributed as d; print('torch', torch.__version__, 'gpus', torch.cuda.device_count(), 'nccl', d.is_nccl_available() and torch.cuda.nccl.version())"
} 2>&1 | tee "$OUT/ranks_env.txt"
bench() {  # name timeout args...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 -m benchmarks.gpu.ranks --json "$OUT/ranks_$name.json" "$@" >"$OUT/ranks_$name.log" 2>&1
}
for part in $PARTS; do
    case $part in
    check) timeout ${CHECK_TIMEOUT:-420} python3 -m pytest -q -s -p no:cacheprovider \
        tests/engines/reference/test_ranks_cuda.py tests/engines/reference/test_rank_comm.py \
        tests/kv/test_cuda_ipc.py >"$OUT/ranks_check.log" 2>&1 ;;
    tiny) bench tiny ${TINY_TIMEOUT:-240} --shape tiny --folder "$WORK/tiny" --dtype float32 --batches 1 8 \
        --context 100 ;;
    step-20b) bench step_20b ${STEP_TIMEOUT:-540} --shape 20b --folder "$WORK/20b" --tp 2 --ep 2 ;;
    step-120b) bench step_120b ${STEP_TIMEOUT:-540} --shape 120b --folder "$WORK/120b" --tp 2 --ep 2 ;;
    seed-tp4) bench seed_tp4 ${STEP_TIMEOUT:-540} --shape 120b --folder "$WORK/120b" --tp 4 --ep 4 ;;
    *) echo "unknown part $part"; continue ;;
    esac
    echo "$part: exit $?"
    tail -n 8 "$OUT"/ranks_"${part/-/_}".log 2>/dev/null | grep -v '^ \|^[{}]'
done
