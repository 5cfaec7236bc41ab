"""The TensorRT-LLM engine against the stand-in ``tensorrt_llm``: phases, deltas, failures, cancellation."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import ModuleType

import pytest
from trtllm_testing import EOS_ID, make_engine

from dynamo_lite.engines.base import EngineError, StreamPacing
from dynamo_lite.engines.engine_args import EngineArgsError
from dynamo_lite.engines.trtllm import TrtllmEngine
from dynamo_lite.protocol import (
    GenerateChunk,
    GenerateRequest,
    GuidedKind,
    GuidedSpec,
    KvDescriptor,
    Phase,
    SamplingOptions,
)

PROMPT = [11, 12, 13, 14, 15, 16, 17]


def request(phase: Phase = Phase.AGGREGATED, max_tokens: int = 12, **kw: object) -> GenerateRequest:
    sampling = kw.pop("sampling", None) or SamplingOptions(max_tokens=max_tokens, ignore_eos=True)
    return GenerateRequest(
        request_id="req-1",
        model="m",
        token_ids=list(kw.pop("token_ids", PROMPT)),
        sampling=sampling,
        phase=phase,
        **kw,
    )


async def collect(engine: TrtllmEngine, req: GenerateRequest) -> list[GenerateChunk]:
    return [chunk async for chunk in engine.generate(req)]


def tokens(chunks: list[GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def started(
    model_dir: Path, mode: str = "agg", extra: dict | None = None, **kw: object
) -> TrtllmEngine:
    engine = make_engine(model_dir, mode, extra, **kw)
    await engine.start()
    return engine


async def test_engine_passes_merged_args_to_llm(standin: ModuleType, model_dir: Path) -> None:
    extra = {"kv_cache_config": {"dtype": "fp8"}, "cache_transceiver_config": {"backend": "ucx"}}
    engine = await started(model_dir, "prefill", extra, max_batch_size=32, free_gpu_memory_fraction=0.7)
    llm = engine._llm
    assert llm.model == str(model_dir)
    assert llm.args["backend"] == "pytorch"
    assert llm.args["max_batch_size"] == 32
    assert llm.args["disable_overlap_scheduler"] is True
    # Nested sections arrive as TensorRT-LLM config objects, flags and YAML merged.
    assert isinstance(llm.args["kv_cache_config"], standin.llmapi.KvCacheConfig)
    assert (llm.args["kv_cache_config"].free_gpu_memory_fraction, llm.args["kv_cache_config"].dtype) == (
        0.7,
        "fp8",
    )
    assert llm.args["cache_transceiver_config"].backend == "UCX"
    assert engine.name == "trtllm"
    assert engine.model_files.tokenizer_json == model_dir / "tokenizer.json"
    await engine.stop()
    assert llm.is_shutdown


async def test_bad_config_section_fails_at_build_naming_it(standin: ModuleType, model_dir: Path) -> None:
    with pytest.raises(EngineArgsError, match="kv_cache_config: TensorRT-LLM rejected it: .*bogus"):
        make_engine(model_dir, "agg", {"kv_cache_config": {"bogus": 1}})


async def test_aggregated_streams_deltas(standin: ModuleType, model_dir: Path) -> None:
    engine = await started(model_dir, "agg", {"stream_interval": 4})
    chunks = await collect(engine, request(max_tokens=10))
    assert [len(c.token_ids) for c in chunks] == [4, 4, 2]
    assert [c.finish_reason for c in chunks] == [None, None, "length"]
    assert all(c.kv is None and c.cached_tokens == 0 for c in chunks)
    sent = engine._llm.requests[0]
    assert sent.streaming is True
    assert sent.disaggregated_params_in is None
    assert (sent.sampling_params.max_tokens, sent.sampling_params.detokenize) == (10, False)
    assert engine.stats().total_tokens == 10
    assert engine.stats().active_seqs == 0
    await engine.stop()


async def test_the_workers_pacing_coalesces_outputs_max_messages_per_s_included(
    standin: ModuleType, model_dir: Path
) -> None:
    """--max-messages-per-s holds for TensorRT-LLM too: with many streams the worker raises the pacing interval,
    and outputs that come within it travel as one chunk (the first and the last never wait)."""
    engine = await started(model_dir, "agg")
    every_output = await collect(engine, request(max_tokens=10))
    assert [len(c.token_ids) for c in every_output] == [1] * 10
    engine.pacing = StreamPacing(0.0)
    engine.pacing.adapt(active_streams=1000, max_messages_per_s=100.0)  # what the worker does under load
    assert engine.pacing.interval_s == 10.0
    chunks = await collect(engine, request(max_tokens=10))
    assert [len(c.token_ids) for c in chunks] == [1, 9] and chunks[-1].finish_reason == "length"
    assert tokens(chunks) == tokens(every_output)
    await engine.stop()


async def test_prefill_returns_first_token_and_kv_descriptor(standin: ModuleType, model_dir: Path) -> None:
    engine = await started(model_dir, "prefill")
    chunks = await collect(engine, request(Phase.PREFILL, max_tokens=50))
    assert len(chunks) == 1
    chunk = chunks[0]
    sent = engine._llm.requests[0]
    assert sent.disaggregated_params_in.request_type == "context_only"
    assert sent.sampling_params.max_tokens == 1
    assert sent.streaming is False
    assert len(chunk.token_ids) == 1
    assert chunk.finish_reason is None
    assert chunk.kv is not None
    assert (chunk.kv.engine, chunk.kv.transfer_id, chunk.kv.num_tokens, chunk.kv.nbytes) == (
        "trtllm",
        str(sent.request_id),
        len(PROMPT),
        0,
    )
    assert sent.request_id in standin.llmapi.PENDING_KV
    await engine.stop()


async def test_prefill_of_a_one_token_request_keeps_no_kv(standin: ModuleType, model_dir: Path) -> None:
    engine = await started(model_dir, "prefill")
    chunks = await collect(engine, request(Phase.PREFILL, max_tokens=1))
    assert [(len(c.token_ids), c.finish_reason, c.kv) for c in chunks] == [(1, "length", None)]
    sent = engine._llm.requests[0]
    assert sent.disaggregated_params_in is None
    assert sent.request_id not in standin.llmapi.PENDING_KV
    await engine.stop()


async def test_prefill_that_ends_on_eos_has_no_kv(
    standin: ModuleType, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRTLLM_STANDIN_EOS_AFTER", "1")
    engine = await started(model_dir, "prefill")
    chunks = await collect(engine, request(Phase.PREFILL, sampling=SamplingOptions(max_tokens=20)))
    assert [(c.token_ids, c.finish_reason, c.kv) for c in chunks] == [([], "stop", None)]
    await engine.stop()


async def test_decode_continues_after_the_first_token(standin: ModuleType, model_dir: Path) -> None:
    prefill = await started(model_dir, "prefill")
    decode = await started(model_dir, "decode", {"stream_interval": 3})
    first = (await collect(prefill, request(Phase.PREFILL, max_tokens=12)))[0]
    chunks = await collect(
        decode, request(Phase.DECODE, max_tokens=12, kv=first.kv, generated_ids=first.token_ids)
    )
    sent = decode._llm.requests[0]
    assert sent.disaggregated_params_in.request_type == "generation_only"
    assert sent.disaggregated_params_in.first_gen_tokens == first.token_ids
    assert sent.prompt_token_ids == PROMPT
    assert sent.sampling_params.max_tokens == 12  # TensorRT-LLM's output includes the first token
    assert len(tokens(chunks)) == 11
    assert chunks[-1].finish_reason == "length"
    assert all(c.cached_tokens == len(PROMPT) for c in chunks)
    assert sent.disaggregated_params_in.ctx_request_id not in standin.llmapi.PENDING_KV
    stats = decode.stats()
    assert (stats.kv_transfers, stats.kv_recomputes, stats.total_tokens) == (1, 0, 11)
    await prefill.stop()
    await decode.stop()


async def test_disaggregated_tokens_equal_aggregated(standin: ModuleType, model_dir: Path) -> None:
    agg = await started(model_dir, "agg")
    prefill = await started(model_dir, "prefill")
    decode = await started(model_dir, "decode", {"stream_interval": 5})
    expected = tokens(await collect(agg, request(max_tokens=30)))
    first = (await collect(prefill, request(Phase.PREFILL, max_tokens=30)))[0]
    rest = await collect(
        decode, request(Phase.DECODE, max_tokens=30, kv=first.kv, generated_ids=first.token_ids)
    )
    assert first.token_ids + tokens(rest) == expected
    assert len(expected) == 30
    for engine in (agg, prefill, decode):
        await engine.stop()


async def test_decode_without_generated_ids_streams_the_first_token_too(
    standin: ModuleType, model_dir: Path
) -> None:
    prefill = await started(model_dir, "prefill")
    decode = await started(model_dir, "decode")
    first = (await collect(prefill, request(Phase.PREFILL, max_tokens=6)))[0]
    chunks = await collect(decode, request(Phase.DECODE, max_tokens=6, kv=first.kv))
    assert tokens(chunks)[0] == first.token_ids[0]
    assert len(tokens(chunks)) == 6
    await prefill.stop()
    await decode.stop()


async def test_decode_stops_on_eos(
    standin: ModuleType, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRTLLM_STANDIN_EOS_AFTER", "5")
    prefill = await started(model_dir, "prefill")
    decode = await started(model_dir, "decode")
    sampling = SamplingOptions(max_tokens=50)
    first = (await collect(prefill, request(Phase.PREFILL, sampling=sampling)))[0]
    chunks = await collect(
        decode, request(Phase.DECODE, sampling=sampling, kv=first.kv, generated_ids=first.token_ids)
    )
    assert len(tokens(chunks)) == 3  # tokens 2..4; the 5th is EOS, which TensorRT-LLM leaves out
    assert EOS_ID not in tokens(chunks)
    assert chunks[-1].finish_reason == "stop"
    await prefill.stop()
    await decode.stop()


def tampered(kv: KvDescriptor) -> KvDescriptor:
    import json

    obj = json.loads(kv.opaque)
    obj["ctx_request_id"] += 1
    return KvDescriptor(
        transfer_id=kv.transfer_id,
        engine="trtllm",
        num_tokens=kv.num_tokens,
        nbytes=0,
        opaque=json.dumps(obj).encode(),
    )


@pytest.mark.parametrize(
    "breakage",
    ["tampered", "garbage", "missing", "foreign"],
)
async def test_unusable_kv_is_recomputed(standin: ModuleType, model_dir: Path, breakage: str) -> None:
    agg = await started(model_dir, "agg")
    prefill = await started(model_dir, "prefill")
    decode = await started(model_dir, "decode")
    expected = tokens(await collect(agg, request(max_tokens=10)))
    first = (await collect(prefill, request(Phase.PREFILL, max_tokens=10)))[0]
    kv = {
        "tampered": tampered(first.kv),
        "garbage": KvDescriptor(transfer_id="x", engine="trtllm", num_tokens=7, nbytes=0, opaque=b"{nope"),
        "missing": None,
        "foreign": KvDescriptor(transfer_id="x", engine="torch", num_tokens=7, nbytes=100),
    }[breakage]
    chunks = await collect(decode, request(Phase.DECODE, max_tokens=10, kv=kv, generated_ids=first.token_ids))
    assert first.token_ids + tokens(chunks) == expected
    assert all(c.cached_tokens == 0 for c in chunks)
    assert decode.stats().kv_recomputes == 1
    last = decode._llm.requests[-1]
    assert last.disaggregated_params_in is None
    assert last.prompt_token_ids == PROMPT + first.token_ids
    for engine in (agg, prefill, decode):
        await engine.stop()


async def test_unusable_kv_with_fail_policy_is_503(standin: ModuleType, model_dir: Path) -> None:
    prefill = await started(model_dir, "prefill")
    decode = await started(model_dir, "decode", kv_failure_policy="fail")
    first = (await collect(prefill, request(Phase.PREFILL)))[0]
    with pytest.raises(EngineError) as info:
        await collect(decode, request(Phase.DECODE, kv=tampered(first.kv), generated_ids=first.token_ids))
    assert (info.value.status, info.value.code) == (503, "kv_transfer_failed")
    assert "opaque_state does not match" in str(info.value)
    with pytest.raises(EngineError, match="no KV descriptor"):
        await collect(decode, request(Phase.DECODE, generated_ids=first.token_ids))
    await prefill.stop()
    await decode.stop()


async def test_decode_with_nothing_left_to_generate(standin: ModuleType, model_dir: Path) -> None:
    prefill = await started(model_dir, "prefill")
    decode = await started(model_dir, "decode")
    first = (await collect(prefill, request(Phase.PREFILL, max_tokens=2)))[0]
    req = request(Phase.DECODE, max_tokens=1, kv=first.kv, generated_ids=first.token_ids)
    assert [(c.token_ids, c.finish_reason) for c in await collect(decode, req)] == [([], "length")]
    assert decode._llm.requests == []
    await prefill.stop()
    await decode.stop()


async def test_closing_the_iterator_aborts_the_request(standin: ModuleType, model_dir: Path) -> None:
    engine = await started(model_dir, "agg")
    stream = engine.generate(request(max_tokens=100))
    first = await anext(stream)
    assert first.token_ids
    await stream.aclose()
    sent = engine._llm.requests[0]
    assert engine._llm.aborted == [sent.request_id]
    assert engine.stats().active_seqs == 0
    await engine.stop()


async def test_cancelling_the_consumer_aborts_the_request(
    standin: ModuleType, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRTLLM_STANDIN_STEP_DELAY_S", "0.01")
    engine = await started(model_dir, "agg")
    streaming = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(request(max_tokens=1000)):
            streaming.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(streaming.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine._llm.aborted == [engine._llm.requests[0].request_id]
    await engine.stop()


async def test_finished_request_is_not_aborted(standin: ModuleType, model_dir: Path) -> None:
    engine = await started(model_dir, "agg")
    await collect(engine, request(max_tokens=3))
    prefill = await started(model_dir, "prefill")
    await collect(prefill, request(Phase.PREFILL))  # its KV waits for the decode worker: no abort
    assert engine._llm.aborted == [] and prefill._llm.aborted == []
    await engine.stop()
    await prefill.stop()


async def test_decode_closed_before_its_kv_arrived_aborts_after_the_first_output(
    standin: ModuleType, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefill = await started(model_dir, "prefill")
    first = (await collect(prefill, request(Phase.PREFILL, max_tokens=100)))[0]
    monkeypatch.setenv("TRTLLM_STANDIN_STEP_DELAY_S", "0.2")  # the first output takes 0.2 s: the "transfer"
    decode = await started(model_dir, "decode")
    task = asyncio.create_task(
        anext(
            decode.generate(request(Phase.DECODE, max_tokens=100, kv=first.kv, generated_ids=first.token_ids))
        )
    )
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    sent = decode._llm.requests[0]
    assert decode._llm.aborted == []  # not while the KV is in flight
    await asyncio.wait_for(asyncio.gather(*decode._background), 5)  # the deferred abort
    assert decode._llm.aborted == [sent.request_id]
    assert sent.outputs[0].token_ids  # it had produced its first output by then
    await prefill.stop()
    await decode.stop()


async def test_refusals(standin: ModuleType, model_dir: Path) -> None:
    engine = make_engine(model_dir, "agg", max_seq_len=8)
    with pytest.raises(EngineError, match="not started") as info:
        await collect(engine, request())
    assert info.value.status == 503
    await engine.start()
    with pytest.raises(EngineError, match="prompt is empty") as info:
        await collect(engine, request(token_ids=[]))
    assert info.value.status == 400
    with pytest.raises(EngineError, match="exceeds max_seq_len 8") as info:
        await collect(engine, request(token_ids=list(range(3, 13))))
    assert info.value.status == 400
    with pytest.raises(EngineError, match="invalid sampling options") as info:
        await collect(engine, request(sampling=SamplingOptions(temperature=0.5, top_p=-0.5)))
    assert info.value.status == 400
    with pytest.raises(EngineError, match="carries no generated tokens"):
        await collect(engine, request(Phase.PREFILL, generated_ids=[5]))
    assert engine.stats().active_seqs == 0
    await engine.stop()


async def test_request_failure_is_an_engine_error(standin: ModuleType, model_dir: Path) -> None:
    # A context-only request on an engine without a cache transceiver fails inside TensorRT-LLM.
    engine = await started(model_dir, "agg")
    with pytest.raises(
        EngineError, match="RequestError: context_only requests need cache_transceiver_config"
    ):
        await collect(engine, request(Phase.PREFILL))
    await engine.stop()


async def test_concurrent_requests_do_not_mix(standin: ModuleType, model_dir: Path) -> None:
    engine = await started(model_dir, "agg", {"stream_interval": 2})
    prompts = [[3 + i, 40 + i, 7] for i in range(16)]
    singles = [tokens(await collect(engine, request(token_ids=p, max_tokens=9))) for p in prompts]
    together = await asyncio.gather(*(collect(engine, request(token_ids=p, max_tokens=9)) for p in prompts))
    assert [tokens(c) for c in together] == singles
    assert engine.stats().active_seqs == 0
    await engine.stop()


async def test_guided_requests_become_guided_decoding_params(standin: ModuleType, model_dir: Path) -> None:
    """Structured output reaches TensorRT-LLM as ``SamplingParams.guided_decoding`` on both phases, when the
    LLM has a grammar backend; without one the request is refused rather than silently unconstrained."""
    spec = GuidedSpec(GuidedKind.JSON_SCHEMA, '{"type":"object"}')
    sampling = SamplingOptions(max_tokens=4, ignore_eos=True, guided=spec)
    engine = await started(model_dir, "prefill", {"guided_decoding_backend": "xgrammar"})
    try:
        assert engine._llm.args["guided_decoding_backend"] == "xgrammar"
        await collect(engine, request(Phase.PREFILL, sampling=sampling))
        guided = engine._llm.requests[-1].sampling_params.guided_decoding
        assert isinstance(guided, standin.llmapi.GuidedDecodingParams)
        assert (guided.json, guided.regex, guided.json_object) == ('{"type":"object"}', None, False)
    finally:
        await engine.stop()
    engine = await started(model_dir, "agg")
    try:
        with pytest.raises(EngineError, match="guided_decoding_backend") as e:
            await collect(engine, request(sampling=sampling))
        assert e.value.status == 400
    finally:
        await engine.stop()
