"""Token-exact greedy decoding on CUDA (fp32): the torch engine against HF transformers on the same GPU.

The model is SmolLM2-135M's exact architecture (30 layers, 9 heads, 3 KV heads, 576 hidden, vocab 49152)
with weights from transformers' own initialisation under a fixed seed (``LlamaForCausalLM(config)``, with
``initializer_range=0.08`` so greedy output does not settle on one repeated token), saved
as safetensors and loaded by the engine: the real SmolLM2 weights are not on the GPU machine. Prompts of
several lengths run concurrently through the engine (batched decode, CUDA graphs when they captured) and one
at a time through ``generate``.

    python -m benchmarks.gpu.token_check [--new-tokens 48] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu.common import SMOLLM2
from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.reference import build_engine
from dynamo_lite.protocol import GenerateRequest, SamplingOptions

PROMPT_LENGTHS = (5, 37, 300, 1200)


def hf_model(folder: Path) -> torch.nn.Module:
    import transformers

    cfg = {k: v for k, v in SMOLLM2.items() if k not in ("model_type", "architectures")}
    torch.manual_seed(1234)
    # A wider init than the default 0.02: greedy output then wanders instead of repeating one token.
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, initializer_range=0.08))
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")  # the engine never tokenizes
    return model.eval()


async def engine_tokens(
    folder: Path, prompts: list[list[int]], new_tokens: int, dtype: str, device: str
) -> tuple[list, dict]:
    settings = EngineSettings(
        role="agg",
        model_path=str(folder),
        dtype=dtype,
        device=device,
        threads=2 if device == "cpu" else 0,
        max_batch_size=8,
        max_num_tokens=512,
        max_seq_len=2048,
    )
    engine = build_engine(settings)
    await engine.start()
    info = {
        "cuda_graphs": engine._graphs is not None,
        "triton_decode": engine._model.decode_attention is not None,
    }
    try:

        async def one(i: int, ids: list[int]) -> list[int]:
            opts = SamplingOptions(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
            req = GenerateRequest(request_id=f"t{i}", model="m", token_ids=ids, sampling=opts)
            return [t async for c in engine.generate(req) for t in c.token_ids]

        out = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    finally:
        await engine.stop()
    return out, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--lengths", type=int, nargs="+", default=list(PROMPT_LENGTHS))
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    started = time.perf_counter()
    result: dict = {"model": "SmolLM2-135M architecture, transformers init (seed 1234), fp32"}
    with tempfile.TemporaryDirectory(prefix="smollm2-random-") as tmp:
        folder = Path(tmp)
        model = hf_model(folder).to(args.device)
        model.generation_config.eos_token_id = None  # like ignore_eos: both run the full length
        model.generation_config.pad_token_id = 0
        gen = torch.Generator().manual_seed(7)
        prompts = [
            torch.randint(3, SMOLLM2["vocab_size"], (n,), generator=gen).tolist() for n in args.lengths
        ]
        expected = []
        with torch.inference_mode():
            for ids in prompts:
                out = model.generate(
                    torch.tensor([ids], device=args.device), max_new_tokens=args.new_tokens, do_sample=False
                )
                expected.append(out[0, len(ids) :].tolist())
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        got, info = asyncio.run(engine_tokens(folder, prompts, args.new_tokens, "float32", args.device))
    result |= info
    rows = []
    for n, e, g in zip(args.lengths, expected, got, strict=True):
        first_diff = next((i for i, (a, b) in enumerate(zip(e, g, strict=False)) if a != b), None)
        if first_diff is None and len(e) != len(g):
            first_diff = min(len(e), len(g))
        rows.append({"prompt_tokens": n, "exact": first_diff is None, "first_diff": first_diff})
        print(
            f"  prompt {n:5d} tokens: {'token-exact' if first_diff is None else f'differs at token {first_diff}'}"
            f" ({len(g)} generated; engine {g[:6]}..., HF {e[:6]}...)",
            flush=True,
        )
    result["rows"] = rows
    result["all_exact"] = all(r["exact"] for r in rows)
    result["seconds"] = time.perf_counter() - started
    print(
        f"token check ({args.device} fp32, graphs={info['cuda_graphs']}, triton decode={info['triton_decode']}): "
        f"{'ALL TOKEN-EXACT' if result['all_exact'] else 'MISMATCH'} in {result['seconds']:.0f} s",
        flush=True,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if result["all_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
