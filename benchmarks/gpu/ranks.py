"""The torch engine's ranks on several GPUs: a gpt-oss decode step at TP2 (or the seed's TP4/EP4) against each GPU's
HBM floor.

    python -m benchmarks.gpu.ranks [--shape tiny|20b|120b] [--tp 2] [--ep 2] [--attention-dp] [--json out.json]
    python -m benchmarks.gpu.ranks --shape tiny --device cpu --dtype float32   # smoke test on CPU (gloo)

A random MXFP4 checkpoint of the shape is written to ``--folder`` (kept for the next run; ranks read only their
own shard of a checkpoint, so ``load_format: dummy`` is not an option), then a ranked engine loads it, ranks on
``cuda:0 .. cuda:N-1`` over NCCL. With the engine idle, the script drives its runner directly: each of ``batch``
slots is prefilled with ``--context`` random tokens, then the whole batch decodes ``--iters`` steps (eager: ranks
run no CUDA graphs), each timed to a device sync. Rank 0 times the step for all ranks (they step together).

The floor per GPU: the bytes one rank must read per step — its share of the attention weights (all of them under
attention DP), the replicated output head, norms and routers, its experts the rows are routed to (expected
distinct experts under uniform routing, ``E_r * (1 - (1 - k / E) ** rows)`` per layer, ``rows`` the whole batch:
each rank runs its experts over every row) and its KV (its KV heads of every row; attention DP: its own rows)
— over the device-to-device copy bandwidth measured on GPU 0 in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu.common import log


def copy_bandwidth(device: torch.device, gib: float) -> float:
    """Bytes read + written per second by a device-to-device copy of ``gib`` GiB (median of 5)."""
    n = int(gib * 2**30)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(6):
        started = time.perf_counter()
        b.copy_(a)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return 2 * n / statistics.median(times[1:])


def nbytes(t: Any) -> int:
    if t is None:
        return 0
    return t.nbytes if hasattr(t, "nbytes") else t.numel() * t.element_size()


def rank_bytes(engine: Any) -> dict[str, float]:
    """Rank 0's bytes by kind (every rank holds the same amounts)."""
    from dynamo_lite.engines.reference.ranks import sharded_nbytes

    weights = engine._model.weights
    experts = sharded_nbytes(weights, attention=False)
    everything = sum(nbytes(getattr(lw, f, None)) for lw in weights.layers for f in lw.__slots__)
    return {
        "attention_and_norms": everything - experts,
        "experts": experts,
        "head": nbytes(weights.lm_head) + nbytes(weights.norm),
        "embedding_row": nbytes(weights.embed[0]),
    }


def step_floor(engine: Any, batch: int, ctx: int, bw: float) -> dict[str, float]:
    cfg, plan = engine.model_config, engine.plan
    b = rank_bytes(engine)
    e, k = cfg.num_experts, cfg.experts_per_token
    e_rank = e // plan.expert_size
    distinct = e_rank * (1 - (1 - k / e) ** batch)
    experts = b["experts"] * distinct / e_rank
    kv_heads = engine._model.config.num_kv_heads  # this rank's (the model was built from its shard)
    itemsize = torch.empty(0, dtype=engine.dtype).element_size()
    rows = -(-batch // plan.size) if plan.attention_dp else batch  # the most rows one rank attends for
    windows = cfg.layer_windows
    positions = sum(min(ctx + 1, w) if w else ctx + 1 for w in windows)
    kv = rows * 2 * kv_heads * cfg.head_dim * itemsize * positions
    read = b["attention_and_norms"] + b["head"] + experts + batch * b["embedding_row"] + kv
    return {
        "bytes_GB": read / 1e9,
        "kv_GB": kv / 1e9,
        "experts_GB": experts / 1e9,
        "floor_ms": read / bw * 1e3,
    }


def run_steps(engine: Any, batch: int, ctx: int, iters: int, device: torch.device) -> list[float]:
    runner, rng = engine._runner, random.Random(batch)
    vocab = engine.model_config.vocab_size
    slots = [runner.slots.allocate() for _ in range(batch)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        with torch.inference_mode():
            for slot in slots:
                ids = [rng.randrange(vocab) for _ in range(ctx)]
                runner.forward([], [(slot, 0, ids)], [ctx - 1])
            times = []
            for i in range(iters):
                decode = [(slot, ctx + i, rng.randrange(vocab)) for slot in slots]
                sync()
                started = time.perf_counter()
                runner.forward(decode, [], list(range(batch)))
                sync()
                times.append(time.perf_counter() - started)
        return times
    finally:
        for slot in slots:
            runner.slots.free(slot)


def checkpoint(shape: str, folder: str) -> Path:
    """The random MXFP4 checkpoint of ``shape`` in ``folder``, written unless it is there."""
    from dynamo_lite.gpt_oss.tiny import write_model_folder

    path = Path(folder or f"/tmp/ranks-bench/gpt-oss-{shape}")
    if not (path / "config.json").exists() or not any(path.glob("*.safetensors")):
        started = time.perf_counter()
        write_model_folder(path, shape=shape, mxfp4=True)
        log(f"wrote a random {shape} MXFP4 checkpoint in {time.perf_counter() - started:.0f} s")
    return path


async def bench(args: argparse.Namespace, folder: Path) -> dict:
    from dynamo_lite.engines.base import EngineSettings
    from dynamo_lite.engines.reference import build_engine

    device = torch.device(args.device)
    max_seq = args.context + args.iters + 8
    settings = EngineSettings(
        role="agg",
        model_path=str(folder),
        dtype=args.dtype,
        quantization="mxfp4",
        device=args.device,
        max_batch_size=max(args.batches),
        max_num_tokens=max(args.context, 256),
        max_seq_len=max_seq,
        tensor_parallel_size=args.tp,
        expert_parallel_size=args.ep,
        threads=args.threads,
        extra={"enable_attention_dp": args.attention_dp, "warmup": False, "enable_prefix_caching": False},
    )
    result: dict[str, Any] = {
        "shape": args.shape,
        "tp": args.tp,
        "ep": args.ep,
        "attention_dp": args.attention_dp,
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
        "torch": torch.__version__,
    }
    bw = copy_bandwidth(device, 4 if device.type == "cuda" else 0.25)
    result["copy_bandwidth_GBps"] = bw / 1e9
    engine = build_engine(settings)
    started = time.perf_counter()
    await engine.start()
    result["start_s"] = time.perf_counter() - started
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        state = engine._runner.state
        result["sharded_weight_GB_per_rank"] = [b / 1e9 for b in state.weight_bytes]
        result["rank_bytes_GB"] = {k: v / 1e9 for k, v in rank_bytes(engine).items()}
        log(f"{engine.plan.describe()}: started in {result['start_s']:.0f} s, sharded weights per rank "
            f"{[round(b, 2) for b in result['sharded_weight_GB_per_rank']]} GB")  # fmt: skip
        rows = []
        for batch in args.batches:
            times = run_steps(engine, batch, args.context, args.iters, device)[2:]  # the first two warm up
            floor = step_floor(engine, batch, args.context, bw)
            med = statistics.median(times)
            row = {"batch": batch, "context": args.context, "step_ms": med * 1e3, **floor,
                   "over_floor": med * 1e3 / floor["floor_ms"]}  # fmt: skip
            log(f"batch {batch}: step {med * 1e3:.2f} ms, floor per GPU {floor['floor_ms']:.2f} ms "
                f"({row['over_floor']:.1f}x)")  # fmt: skip
            rows.append(row)
        result["steps"] = rows
    finally:
        await engine.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", "20b", "120b"], default="120b")
    p.add_argument("--folder", default="", help="where the random checkpoint is (written if absent)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--attention-dp", action="store_true")
    p.add_argument("--device", default="cuda:0", help="rank 0's device; rank r runs on the r-th next GPU")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    result = asyncio.run(bench(args, checkpoint(args.shape, args.folder)))
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
