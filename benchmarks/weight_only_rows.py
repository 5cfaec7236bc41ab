"""Where the weight-only kernels stop paying: all of SmolLM2's linears for one step of R rows, per kernel.

    python -m benchmarks.weight_only_rows                  # 2 threads, model dtype float32 and bfloat16
    python -m benchmarks.weight_only_rows --dtypes float32 --rows 1 4 8 16 32

For each model dtype it times, per row count, the model dtype's own linear over the dequantized weight (what
steps above ``linear.MAX_ROWS`` run) against the int4 and int8 weight-only kernels (their rows in bf16, as
``linear.make_linear`` feeds them), and prints the crossover: the largest row count up to which each kernel is
faster. ``linear.MAX_ROWS`` holds what this printed on the machines we measured; the CPU's flags come first,
since which kernels are native decides every figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from dynamo_lite.openmp import configure_openmp  # noqa: E402

configure_openmp()  # what the worker sets; must precede torch

# SmolLM2-135M: 30 layers of q/k/v/o, gate/up/down (out, in).
LAYERS = 30
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def time_step(fns: list, x_by_in: dict, repeats: int) -> float:
    """Median ms of one pass over every layer's linears."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(LAYERS):
            for fn, k in fns:
                fn(x_by_in[k])
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 6, 8, 12, 16, 24, 32])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)

    import torch

    from dynamo_lite.engines.reference import linear
    from dynamo_lite.engines.reference.cpu_capability import detect_cpu

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU: {detect_cpu().describe()}; {args.threads} threads; torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    weights = [(torch.randn(n, k) * 0.05, k) for n, k in SHAPES]
    for name in args.dtypes:
        dtype = getattr(torch, name)
        kernels = {"dense": lambda w, dtype=dtype: linear.make_linear(w.to(dtype))}
        with torch.inference_mode():
            # One linear per (shape, kernel); the weight-only ones are called below their row limit only, so
            # their own kernel is timed (make_linear's fallback would time the dense path again).
            table: dict[str, list[float]] = {}
            if linear.int4_supported():
                kernels["int4"] = lambda w, dtype=dtype: _kernel_only("int4", w.to(dtype))
            if linear.int8_supported():
                kernels["int8"] = lambda w, dtype=dtype: _kernel_only("int8", w.to(dtype))
            built = {kind: [(make(w), k) for w, k in weights] for kind, make in kernels.items()}
            for rows in args.rows:
                xs = {k: torch.randn(rows, k).to(dtype) for _, k in weights}
                for kind, fns in built.items():
                    time_step(fns, xs, 2)  # warm up (oneDNN primitives, packing caches)
                    table.setdefault(kind, []).append(time_step(fns, xs, args.repeats))
        print(f"\nmodel dtype {name}: ms for all of SmolLM2's linears, one step of R rows")
        print(f"{'rows':>8}" + "".join(f"{kind:>10}" for kind in table))
        for i, rows in enumerate(args.rows):
            print(f"{rows:>8}" + "".join(f"{table[kind][i]:>10.2f}" for kind in table))
        for kind in table:
            if kind == "dense":
                continue
            faster = [r for i, r in enumerate(args.rows) if table[kind][i] < table["dense"][i]]
            print(f"{kind}: faster than dense up to {max(faster) if faster else 0} rows "
                  f"(linear.MAX_ROWS now {linear.MAX_ROWS.get((kind, dtype))})")  # fmt: skip
    return 0


def _kernel_only(quantization: str, weight):  # noqa: ANN001, ANN202
    """The weight-only kernel of ``linear`` for ``weight``, with no row limit (what steps at or below
    ``MAX_ROWS`` run), taking and returning the model's dtype as ``make_linear``'s does."""
    from dynamo_lite.engines.reference import linear

    saved = dict(linear.MAX_ROWS)
    linear.MAX_ROWS[(quantization, weight.dtype)] = 1 << 30
    try:
        return linear.make_linear(weight, None, quantization)
    finally:
        linear.MAX_ROWS.clear()
        linear.MAX_ROWS.update(saved)


if __name__ == "__main__":
    sys.exit(main())
