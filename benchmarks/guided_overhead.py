"""What structured output costs the reference engine per token: the grammar's part of one decode step.

For each generated token a guided sequence pays ``GrammarState.mask`` (xgrammar fills the allowed-token bitmask
and applies it to the logits row) and ``GrammarState.accept``. This samples outputs (random logits) under the
issue-17 acceptance schema and a regex on SmolLM2's vocabulary and times those two calls per token (sampling
itself, which every request pays, is left out), plus the one-off costs: building the tokenizer view, and
compiling a grammar (cached per spec afterwards).

Run: ``python benchmarks/guided_overhead.py [--samples 20] [--threads 1] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from dynamo_lite.engines.reference.grammar import GrammarCompiler
from dynamo_lite.model_files import resolve_model
from dynamo_lite.protocol import GuidedKind, GuidedSpec

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "country": {"enum": ["FR", "DE", "US", "JP"]},
            },
            "required": ["city", "country"],
        },
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "address", "tags"],
}
SPECS = {
    "json_schema": GuidedSpec(GuidedKind.JSON_SCHEMA, json.dumps(SCHEMA)),
    "regex": GuidedSpec(GuidedKind.REGEX, r"[0-9]{3}-[a-z]{2,12}( [A-Z][a-z]{1,8}){0,4}"),
}


def run(samples: int, threads: int) -> dict:
    torch.set_num_threads(threads)  # as the engine thread does (``threads``)
    files = resolve_model()
    stop = files.eos_token_ids
    started = time.perf_counter()
    compiler = GrammarCompiler(files.tokenizer_json, files.vocab_size, stop)
    compiler.compile(GuidedSpec(GuidedKind.REGEX, "a"))  # builds the tokenizer view (imports included)
    out: dict = {"tokenizer_view_s": round(time.perf_counter() - started, 3), "specs": {}}
    for name, spec in SPECS.items():
        t0 = time.perf_counter()
        compiler.compile(spec)
        compile_ms = (time.perf_counter() - t0) * 1e3
        per_token: list[float] = []
        for seed in range(samples):
            gen = torch.Generator().manual_seed(seed)
            state = compiler.state(spec, stop, [])
            while not state.terminated:
                logits = torch.randn(files.vocab_size, generator=gen)
                t0 = time.perf_counter()
                state.mask(logits)
                masked = time.perf_counter() - t0
                token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))  # not timed
                t0 = time.perf_counter()
                state.accept(token)
                per_token.append(masked + time.perf_counter() - t0)
        out["specs"][name] = {
            "compile_ms": round(compile_ms, 1),
            "tokens": len(per_token),
            "us_per_token_median": round(statistics.median(per_token) * 1e6, 1),
            "us_per_token_p90": round(statistics.quantiles(per_token, n=10)[-1] * 1e6, 1),
        }
    out["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
    out["machine"] += str(torch.get_num_threads())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the engine's `threads`)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.samples, args.threads)
    if args.json:
        print(json.dumps(result))
        return
    print(f"tokenizer view: {result['tokenizer_view_s']} s ({result['machine']})")
    for name, r in result["specs"].items():
        print(
            f"{name:12s} compile {r['compile_ms']:7.1f} ms  {r['tokens']:5d} tokens  "
            f"{r['us_per_token_median']:7.1f} us/token median  {r['us_per_token_p90']:7.1f} p90 "
            "(mask + accept)"
        )


if __name__ == "__main__":
    main()
