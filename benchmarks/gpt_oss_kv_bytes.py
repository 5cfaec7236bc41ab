"""Bytes a gpt-oss prompt's KV moves from prefill to decode, against the size if every layer kept every position.

gpt-oss alternates sliding-window layers (128 positions) with full-attention layers; the engine's cache keeps a
sliding layer as a ring of its window and exports only that (``KvLayout``'s windowed part). Measured two ways:

1. The tiny gpt-oss model through two real engines (``--tokens`` prompt, default 8192): a prefill engine exports,
   a decode engine pulls over the real transfer path (shared memory) and continues; the decode engine's
   ``kv_transfer_bytes`` counter is the measurement, next to the tiny model's all-layers-full size.
2. The gpt-oss-20b and -120b shapes (bf16): a hold of that layout exported and pulled (no model: random bytes),
   the exporter's ``bytes`` counter against ``all_full_nbytes``.

    python -m benchmarks.gpt_oss_kv_bytes [--tokens 8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # layers, kv heads, head dim, window, windowed layers (every even layer, as gpt-oss's layer_types)
    "gpt-oss-20b": (24, 8, 64, 128),
    "gpt-oss-120b": (36, 8, 64, 128),
}


async def through_engines(tokens: int) -> dict:
    from dynamo_lite.engines.base import EngineSettings
    from dynamo_lite.engines.reference import build_engine
    from dynamo_lite.gpt_oss.tiny import write_model_folder
    from dynamo_lite.kv.layout import KvLayout
    from dynamo_lite.protocol import GenerateRequest, Phase, SamplingOptions

    folder = write_model_folder(Path(tempfile.mkdtemp(prefix="tiny-gpt-oss-")))

    def settings(mode: str) -> EngineSettings:
        return EngineSettings(role=mode, model_path=str(folder), dtype="float32", threads=2, max_batch_size=2,
                              max_num_tokens=1024, max_seq_len=tokens + 64)  # fmt: skip

    prompt = [(i * 7919) % 199_998 for i in range(tokens)]
    opts = SamplingOptions(max_tokens=4, temperature=0.0, ignore_eos=True)
    prefill, decode = build_engine(settings("prefill")), build_engine(settings("decode"))
    await prefill.start()
    await decode.start()
    try:
        started = time.perf_counter()
        req = GenerateRequest(
            request_id="p", model="tiny", token_ids=prompt, sampling=opts, phase=Phase.PREFILL
        )
        first = [c async for c in prefill.generate(req)][0]
        prefill_s = time.perf_counter() - started
        req = GenerateRequest(request_id="p", model="tiny", token_ids=prompt, sampling=opts, phase=Phase.DECODE,
                              kv=first.kv, generated_ids=first.token_ids)  # fmt: skip
        rest = [t async for c in decode.generate(req) for t in c.token_ids]
        stats = decode.stats()
    finally:
        await prefill.stop()
        await decode.stop()
    layout = KvLayout.from_descriptor(first.kv)
    assert len(rest) == 3 and stats.kv_recomputes == 0
    return {
        "model": "tiny gpt-oss (4 layers, 2 sliding with window 16, fp32)",
        "prompt_tokens": tokens,
        "moved_bytes": stats.kv_transfer_bytes,
        "all_full_bytes": layout.all_full_nbytes,
        "ratio": stats.kv_transfer_bytes / layout.all_full_nbytes,
        "pull_s": stats.kv_transfer_seconds,
        "prefill_s": prefill_s,
    }


async def real_shapes(tokens: int) -> list[dict]:
    import numpy as np

    from dynamo_lite.kv.config import KvTransferConfig
    from dynamo_lite.kv.exporter import KvExporter
    from dynamo_lite.kv.importer import pull_kv
    from dynamo_lite.kv.layout import KvLayout

    out = []
    exporter = KvExporter(KvTransferConfig(max_transfer_bytes=8 << 30))
    await exporter.start()
    try:
        for name, (layers, heads, dim, window) in SHAPES.items():
            layout = KvLayout(layers, heads, dim, "bfloat16", tokens, window, tuple(range(0, layers, 2)))
            hold = exporter.allocate(layout, name)
            np.frombuffer(hold.buffer, np.uint8)[:] = np.random.default_rng(0).integers(
                0, 256, layout.nbytes, np.uint8
            )
            before = exporter.stats.bytes
            started = time.perf_counter()
            async with await pull_kv(exporter.publish(hold), exporter.config) as pulled:
                got = pulled.nbytes
            for _ in range(2000):  # counted once the importer said done and the hold was freed
                if exporter.stats.bytes != before:
                    break
                await asyncio.sleep(0.001)  # noqa: ASYNC110 - the exporter exposes counters, not events
            out.append({
                "model": f"{name} shape (bf16, {layers} layers, half of them sliding with window {window})",
                "prompt_tokens": tokens,
                "moved_bytes": exporter.stats.bytes - before,
                "pulled_bytes": got,
                "all_full_bytes": layout.all_full_nbytes,
                "ratio": (exporter.stats.bytes - before) / layout.all_full_nbytes,
                "pull_s": time.perf_counter() - started,
            })  # fmt: skip
    finally:
        await exporter.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    rows = [asyncio.run(through_engines(args.tokens)), *asyncio.run(real_shapes(args.tokens))]
    print(
        f"KV moved prefill -> decode for a {args.tokens}-token prompt (shared-memory transfer, this machine)"
    )
    for r in rows:
        print(f"  {r['model']}: {r['moved_bytes'] / 2**20:8.1f} MiB moved vs {r['all_full_bytes'] / 2**20:8.1f} MiB "
              f"with every layer full = {r['ratio']:.3f}  (pull {r['pull_s'] * 1e3:.0f} ms)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
