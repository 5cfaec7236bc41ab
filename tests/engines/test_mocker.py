"""The mocker engine: deterministic in-vocab tokens, max_tokens, the prefill/decode handoff, cancellation."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from dynamo_lite.engines.base import EngineError, EngineSettings
from dynamo_lite.engines.mocker import MockerEngine
from dynamo_lite.model_files import ModelFiles, resolve_model
from dynamo_lite.protocol import (
    FinishReason,
    GenerateChunk,
    GenerateRequest,
    GuidedKind,
    GuidedSpec,
    KvDescriptor,
    Phase,
    SamplingOptions,
)

PROMPT = list(range(1000, 1040))


@pytest.fixture(scope="module")
def model_files() -> ModelFiles:
    return resolve_model(None)


@pytest.fixture
async def engine(model_files: ModelFiles):
    eng = MockerEngine(EngineSettings(speedup_ratio=0, served_model_name="mock"), model_files)
    await eng.start()
    try:
        yield eng
    finally:
        await eng.stop()


def request(
    max_tokens: int = 8, phase: Phase = Phase.AGGREGATED, prompt: list[int] = PROMPT, **kw: object
) -> GenerateRequest:
    return GenerateRequest("r1", "mock", list(prompt), SamplingOptions(max_tokens=max_tokens), phase, **kw)


async def collect(engine: MockerEngine, req: GenerateRequest) -> list[GenerateChunk]:
    async with aclosing(engine.generate(req)) as chunks:
        return [c async for c in chunks]


def tokens(chunks: list[GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def test_tokens_are_deterministic_in_vocab_and_never_eos(
    engine: MockerEngine, model_files: ModelFiles
) -> None:
    first = tokens(await collect(engine, request(max_tokens=50)))
    again = tokens(await collect(engine, request(max_tokens=50)))
    other = tokens(await collect(engine, request(max_tokens=50, prompt=[7, 8, 9])))
    assert first == again
    assert first != other
    vocab = model_files.config["vocab_size"]
    for tok in first + other:
        assert 0 <= tok < vocab
        assert tok not in model_files.eos_token_ids


@pytest.mark.parametrize("max_tokens", [1, 2, 17])
async def test_max_tokens_is_respected(engine: MockerEngine, max_tokens: int) -> None:
    chunks = await collect(engine, request(max_tokens=max_tokens))
    assert len(tokens(chunks)) == max_tokens
    assert chunks[-1].finish_reason == FinishReason.LENGTH
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert engine.stats().active_seqs == 0


async def test_prefill_returns_one_token_and_a_kv_descriptor(engine: MockerEngine) -> None:
    chunks = await collect(engine, request(max_tokens=10, phase=Phase.PREFILL))
    assert len(tokens(chunks)) == 1
    last = chunks[-1]
    assert last.finish_reason is None  # handed over to a decode worker, not finished
    kv = last.kv
    assert isinstance(kv, KvDescriptor)
    assert kv.engine == "mocker" and kv.num_tokens == len(PROMPT) and kv.transfer_id
    # SmolLM2-135M: 30 layers x (K,V) x 3 kv heads x 64 head_dim x 2 bytes (bf16) per token
    assert (kv.num_layers, kv.num_kv_heads, kv.head_dim) == (30, 3, 64)
    assert kv.nbytes == 30 * 2 * 3 * 64 * 2 * len(PROMPT)


async def test_prefill_of_a_one_token_request_finishes_without_kv(engine: MockerEngine) -> None:
    chunks = await collect(engine, request(max_tokens=1, phase=Phase.PREFILL))
    assert len(tokens(chunks)) == 1
    assert chunks[-1].finish_reason == FinishReason.LENGTH and chunks[-1].kv is None


async def test_decode_continues_from_the_prefill(engine: MockerEngine) -> None:
    prefill = await collect(engine, request(max_tokens=6, phase=Phase.PREFILL))
    first, kv = tokens(prefill), prefill[-1].kv
    decode = await collect(engine, request(max_tokens=6, phase=Phase.DECODE, kv=kv, generated_ids=first))
    assert len(first) + len(tokens(decode)) == 6
    assert all(c.cached_tokens == len(PROMPT) for c in decode)
    stats = engine.stats()
    assert stats.kv_transfers == 1 and stats.kv_transfer_bytes == kv.nbytes
    # The same sequence as an aggregated run: the decode worker picks up exactly where the prefill stopped.
    assert first + tokens(decode) == tokens(await collect(engine, request(max_tokens=6)))


async def test_closing_the_stream_frees_the_sequence(model_files: ModelFiles) -> None:
    eng = MockerEngine(EngineSettings(speedup_ratio=1.0), model_files)  # ~8 ms per step: a long request
    await eng.start()
    try:
        gen = eng.generate(request(max_tokens=2000))
        got = await asyncio.wait_for(gen.__anext__(), 2.0)
        assert got.token_ids
        assert eng.stats().active_seqs == 1
        await gen.aclose()
        for _ in range(100):
            if eng.stats().active_seqs == 0:
                break
            await asyncio.sleep(0.01)
        assert eng.stats().active_seqs == 0
        assert eng.stats().queued == 0
    finally:
        await eng.stop()


async def test_stop_ends_open_streams_with_an_error(model_files: ModelFiles) -> None:
    eng = MockerEngine(EngineSettings(speedup_ratio=1.0), model_files)
    await eng.start()
    gen = eng.generate(request(max_tokens=2000))
    await asyncio.wait_for(gen.__anext__(), 2.0)
    await eng.stop()
    with pytest.raises(EngineError) as err:
        async with aclosing(gen):
            await asyncio.wait_for(gen.__anext__(), 2.0)  # an error, not a hang
    assert err.value.status == 503


@pytest.mark.parametrize(
    ("max_tokens", "prompt_len", "code"), [(0, 4, "invalid_request"), (10, 4090, "context_length")]
)
async def test_invalid_requests_are_refused(
    engine: MockerEngine, max_tokens: int, prompt_len: int, code: str
) -> None:
    with pytest.raises(EngineError) as err:
        await collect(engine, request(max_tokens=max_tokens, prompt=[300] * prompt_len))
    assert err.value.status == 400 and err.value.code == code


async def test_batches_concurrent_requests(engine: MockerEngine) -> None:
    results = await asyncio.gather(*(collect(engine, request(max_tokens=20)) for _ in range(8)))
    assert all(len(tokens(r)) == 20 for r in results)
    assert engine.stats().total_tokens == 8 * 20
    assert engine.stats().active_seqs == 0


async def test_random_tokens_avoid_the_requests_stop_ids(engine: MockerEngine) -> None:
    free = tokens(await collect(engine, request(max_tokens=40)))
    stops = free[5:15]  # ids the unconstrained run would have produced
    req = GenerateRequest("r2", "mock", PROMPT, SamplingOptions(max_tokens=40, stop_token_ids=stops))
    chunks = await collect(engine, req)
    assert len(tokens(chunks)) == 40 and not set(tokens(chunks)) & set(stops)
    assert chunks[-1].finish_reason == FinishReason.LENGTH


async def test_script_plays_across_prefill_and_decode_and_stops_at_a_stop_id(
    model_files: ModelFiles, tmp_path
) -> None:  # noqa: ANN001
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_files.tokenizer_json))
    script = tmp_path / "script.yaml"
    script.write_text(
        "- match: capital of France\n  answer: 'Paris is the capital.<|im_end|> and this never plays'\n"
        "- match: never\n  answer: unused\n"
    )
    eng = MockerEngine(EngineSettings(speedup_ratio=0, extra={"script": str(script)}), model_files)
    await eng.start()
    try:
        prompt = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n").ids
        want = tok.encode("Paris is the capital.<|im_end|>").ids
        stop = [2]  # <|im_end|>
        sampling = SamplingOptions(max_tokens=50, stop_token_ids=stop)
        agg = await collect(eng, GenerateRequest("a", "mock", prompt, sampling))
        assert tokens(agg) == want and agg[-1].finish_reason == FinishReason.STOP
        # Prefill plays the first token and hands over; decode continues from there.
        first = await collect(eng, GenerateRequest("p", "mock", prompt, sampling, Phase.PREFILL))
        assert tokens(first) == want[:1] and first[-1].kv is not None
        rest = await collect(
            eng,
            GenerateRequest(
                "d", "mock", prompt, sampling, Phase.DECODE, kv=first[-1].kv, generated_ids=want[:1]
            ),
        )
        assert tokens(rest) == want[1:] and rest[-1].finish_reason == FinishReason.STOP
        # max_tokens still bounds a script.
        short = await collect(eng, GenerateRequest("s", "mock", prompt, SamplingOptions(max_tokens=3)))
        assert tokens(short) == want[:3] and short[-1].finish_reason == FinishReason.LENGTH
    finally:
        await eng.stop()


async def test_guided_requests_are_refused_with_400(engine: MockerEngine) -> None:
    """The mocker makes up tokens: it cannot honour a grammar, and says so rather than ignore it."""
    sampling = SamplingOptions(max_tokens=4, guided=GuidedSpec(GuidedKind.JSON_OBJECT))
    with pytest.raises(EngineError) as e:
        await collect(engine, GenerateRequest("g", "mock", PROMPT, sampling))
    assert e.value.status == 400 and "structured output" in str(e.value)


async def test_logprobs_when_asked_are_well_formed(engine: MockerEngine) -> None:
    asked = GenerateRequest("r1", "mock", list(PROMPT), SamplingOptions(max_tokens=6, logprobs=3))
    chunks = await collect(engine, asked)
    lp = [c.logprobs for c in chunks if c.token_ids]
    assert all(x is not None for x in lp)
    chosen = [v for x in lp for v in x.logprobs]
    tops = [ids for x in lp for ids in x.top_ids]
    assert len(chosen) == len(tops) == 6 and all(v < 0 for v in chosen)
    assert [ids[0] for ids in tops] == tokens(chunks) and all(len(ids) == 3 for ids in tops)
    assert all(c.logprobs is None for c in await collect(engine, request(max_tokens=3)))
