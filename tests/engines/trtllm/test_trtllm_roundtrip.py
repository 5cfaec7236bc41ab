"""Prefill engine → GenerateChunk.kv over the wire → decode engine, with the gpt-oss engine configs.

Two engine instances (two stand-in ``LLM``s, as two workers would have), the real YAML files of the seed
deployment, and every message encoded and decoded as it would cross NATS.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import ModuleType

from trtllm_testing import make_engine

from dynamo_lite.engines.engine_args import load_engine_args_yaml
from dynamo_lite.engines.trtllm import TrtllmEngine
from dynamo_lite.protocol import GenerateChunk, GenerateRequest, Phase, SamplingOptions, decode, encode

ROOT = Path(__file__).resolve().parents[3]
PREFILL_YAML = ROOT / "engine_configs" / "gpt_oss" / "prefill.yaml"
DECODE_YAML = ROOT / "engine_configs" / "gpt_oss" / "decode.yaml"


def wire(msg: GenerateRequest | GenerateChunk) -> GenerateRequest | GenerateChunk:
    return decode(encode(msg), type(msg))


async def engines(model_dir: Path) -> tuple[TrtllmEngine, TrtllmEngine]:
    prefill = make_engine(model_dir, "prefill", load_engine_args_yaml(PREFILL_YAML), max_batch_size=32)
    decode_ = make_engine(model_dir, "decode", load_engine_args_yaml(DECODE_YAML), max_batch_size=128)
    await prefill.start()
    await decode_.start()
    return prefill, decode_


async def serve_one(
    prefill: TrtllmEngine, decode_: TrtllmEngine, prompt: list[int], sampling: SamplingOptions
) -> dict[str, object]:
    """What the frontend does with one request: prefill, then decode with the first token and the KV."""
    req = wire(
        GenerateRequest(
            request_id="r", model="gpt-oss", token_ids=prompt, sampling=sampling, phase=Phase.PREFILL
        )
    )
    prefill_chunks = [wire(c) async for c in prefill.generate(req)]
    assert len(prefill_chunks) == 1
    first = prefill_chunks[0]
    decode_req = wire(
        GenerateRequest(
            request_id="r",
            model="gpt-oss",
            token_ids=prompt,
            sampling=sampling,
            phase=Phase.DECODE,
            kv=first.kv,
            generated_ids=first.token_ids,
        )
    )
    decode_chunks = [wire(c) async for c in decode_.generate(decode_req)]
    completion = first.token_ids + [t for c in decode_chunks for t in c.token_ids]
    return {
        "prompt_tokens": len(prompt),
        "completion_tokens": len(completion),
        "cached_tokens": decode_chunks[-1].cached_tokens,
        "finish_reason": decode_chunks[-1].finish_reason,
        "kv": first.kv,
        "decode_chunks": len(decode_chunks),
        "completion": completion,
    }


async def test_round_trip_usage(standin: ModuleType, model_dir: Path) -> None:
    prefill, decode_ = await engines(model_dir)
    prompt = list(range(100, 100 + 1000))  # the seed benchmark's ISL
    usage = await serve_one(
        prefill, decode_, prompt, SamplingOptions(max_tokens=200, min_tokens=200, ignore_eos=True)
    )
    assert usage["prompt_tokens"] == 1000
    assert usage["completion_tokens"] == 200
    assert usage["cached_tokens"] == 1000  # the decode worker computed none of the prompt
    assert usage["finish_reason"] == "length"
    kv = usage["kv"]
    assert (kv.engine, kv.num_tokens, kv.nbytes) == ("trtllm", 1000, 0)
    assert usage["decode_chunks"] == 20  # stream_interval 10 from decode.yaml: 199 tokens in 20 chunks
    # The engines ran with the seed's settings, flags and YAML merged.
    p_args, d_args = prefill._llm.args, decode_._llm.args
    assert (p_args["tensor_parallel_size"], p_args["moe_expert_parallel_size"]) == (4, 4)
    assert p_args["enable_attention_dp"] is False and d_args["enable_attention_dp"] is True
    assert p_args["disable_overlap_scheduler"] is True and d_args["disable_overlap_scheduler"] is False
    assert (p_args["max_batch_size"], d_args["max_batch_size"]) == (32, 128)
    assert (
        p_args["cuda_graph_config"].max_batch_size == 32 and d_args["cuda_graph_config"].max_batch_size == 128
    )
    assert p_args["cache_transceiver_config"].backend == d_args["cache_transceiver_config"].backend == "UCX"
    assert prefill.stats().kv_transfers == 0 and decode_.stats().kv_transfers == 1
    assert not standin.llmapi.PENDING_KV
    await prefill.stop()
    await decode_.stop()


async def test_concurrent_round_trips_match_their_own_prompts(standin: ModuleType, model_dir: Path) -> None:
    prefill, decode_ = await engines(model_dir)
    agg = make_engine(model_dir, "agg")
    await agg.start()
    prompts = [[5 + i, 17, 300 + 3 * i, 9] * 8 for i in range(24)]
    sampling = SamplingOptions(max_tokens=25, ignore_eos=True)
    results = await asyncio.gather(*(serve_one(prefill, decode_, p, sampling) for p in prompts))
    for prompt, result in zip(prompts, results, strict=True):
        req = GenerateRequest(request_id="a", model="m", token_ids=prompt, sampling=sampling)
        expected = [t async for c in agg.generate(req) for t in c.token_ids]
        assert result["completion"] == expected
        assert result["completion_tokens"] == 25
    assert decode_.stats().kv_transfers == 24
    assert decode_.stats().kv_recomputes == 0
    assert prefill.stats().active_seqs == decode_.stats().active_seqs == 0
    assert not standin.llmapi.PENDING_KV
    for engine in (prefill, decode_, agg):
        await engine.stop()
