"""The torch reference engine on the real SmolLM2-135M: exact greedy parity with transformers, batching,
the prefill → decode KV handoff, cancellation, sampling and stop conditions, the recompute fallback.

One aggregated, one prefill and one decode engine (fp32, 2 threads) are shared by the whole module; the
transformers reference runs once per prompt.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio
from reference_testing import (
    THREADS,
    chat,
    collect,
    museum_question,
    needs_smollm2,
    request,
    started_engines,
    tokens,
)

from dynamo_lite.engines.base import EngineError, EngineSettings
from dynamo_lite.protocol import FinishReason, GenerateRequest, KvDescriptor, Phase, SamplingOptions

pytestmark = [needs_smollm2, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

QUESTIONS = {
    "france": ("What is the capital of France?", 24),
    "haiku": ("Write a haiku about the sea.", 24),
    "museum": (museum_question(), 12),  # ~1.9k tokens: prefilled in four chunks of 512
}
FRANCE_ANSWER = "The capital of France is Paris."


def settings(mode: str, **extra: object) -> EngineSettings:
    return EngineSettings(
        role=mode, dtype="float32", threads=THREADS, max_batch_size=4, max_num_tokens=512, max_seq_len=2560,
        extra=dict(extra), extra_source="test",
    )  # fmt: skip


@pytest.fixture(scope="module")
def prompts() -> dict[str, list[int]]:
    from tokenizers import Tokenizer

    from dynamo_lite.model_files import resolve_model

    tok = Tokenizer.from_file(str(resolve_model().tokenizer_json))
    return {name: tok.encode(chat(q), add_special_tokens=False).ids for name, (q, _) in QUESTIONS.items()}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines():
    async with started_engines(settings) as built:
        yield built


@pytest.fixture(scope="module")
def hf_tokens(engines, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    """transformers' greedy ``generate`` on the same converted weights (the engines' fixture made them)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = engines["agg"].model_files.folder
    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    out = {}
    with torch.inference_mode():
        for name, ids in prompts.items():
            max_new = QUESTIONS[name][1]
            generated = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)
            out[name] = generated[0, len(ids) :].tolist()
    return out


async def wait_for(predicate, within: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# ---- (a) parity with transformers, (b) batching ----------------------------------------------------------


async def test_greedy_matches_transformers_token_for_token(engines, prompts, hf_tokens) -> None:
    from tokenizers import Tokenizer

    agg = engines["agg"]
    for name, ids in prompts.items():
        chunks = await collect(agg, request(ids, name, max_tokens=QUESTIONS[name][1]))
        assert tokens(chunks) == hf_tokens[name], name
        expected_reason = FinishReason.STOP if hf_tokens[name][-1] == 2 else FinishReason.LENGTH
        assert chunks[-1].finish_reason == expected_reason
    tok = Tokenizer.from_file(str(agg.model_files.tokenizer_json))
    assert tok.decode(hf_tokens["france"], skip_special_tokens=True) == FRANCE_ANSWER


async def test_concurrent_batch_gives_the_same_tokens_as_alone(engines, prompts, hf_tokens) -> None:
    agg = engines["agg"]
    reqs = [request(ids, name, max_tokens=QUESTIONS[name][1]) for name, ids in prompts.items()]
    # The long prompt is prefilled in chunks while the short ones already decode: mixed steps.
    results = await asyncio.gather(*(collect(agg, r) for r in reqs))
    for name, chunks in zip(prompts, results, strict=True):
        assert tokens(chunks) == hf_tokens[name], name
    assert agg.stats().active_seqs == 0


# ---- (c) prefill in one engine, decode in another --------------------------------------------------------


async def disaggregated(engines, ids: list[int], max_tokens: int, name: str = "d", **sampling) -> tuple:
    prefill_req = request(ids, name, max_tokens=max_tokens, **sampling)
    prefill_req.phase = Phase.PREFILL
    [first] = await collect(engines["prefill"], prefill_req)
    decode_req = request(ids, name, max_tokens=max_tokens, **sampling)
    decode_req.phase, decode_req.kv, decode_req.generated_ids = Phase.DECODE, first.kv, list(first.token_ids)
    return first, await collect(engines["decode"], decode_req)


async def test_prefill_then_decode_reproduces_aggregated_tokens(engines, prompts, hf_tokens) -> None:
    before = engines["decode"].stats()
    for name, ids in prompts.items():
        first, rest = await disaggregated(engines, ids, QUESTIONS[name][1], name)
        assert len(first.token_ids) == 1 and first.finish_reason is None
        assert first.kv is not None and first.kv.num_tokens == len(ids) and first.kv.engine == "torch"
        assert first.token_ids + tokens(rest) == hf_tokens[name], name
        assert rest[-1].cached_tokens == len(ids)
    after = engines["decode"].stats()
    assert after.kv_transfers - before.kv_transfers == len(prompts)
    assert after.kv_recomputes == before.kv_recomputes
    await wait_for(lambda: engines["prefill"].stats().kv_bytes_held == 0)  # every hold was pulled and freed


async def test_prefill_that_completes_holds_no_kv(engines, prompts) -> None:
    req = request(prompts["france"], "one", max_tokens=1)
    req.phase = Phase.PREFILL
    [chunk] = await collect(engines["prefill"], req)
    assert chunk.finish_reason == FinishReason.LENGTH and chunk.kv is None and len(chunk.token_ids) == 1
    assert engines["prefill"].stats().kv_bytes_held == 0


async def test_abandoned_prefill_result_is_released(engines, prompts) -> None:
    req = request(prompts["haiku"], "gone", max_tokens=8)
    req.phase = Phase.PREFILL
    gen = engines["prefill"].generate(req)
    chunk = await gen.__anext__()
    assert chunk.kv is not None
    assert engines["prefill"].stats().kv_bytes_held == chunk.kv.nbytes
    # The consumer took the descriptor: it owns the hold now, which lives until pulled or its lease ends.
    await gen.aclose()
    assert engines["prefill"].stats().kv_bytes_held == chunk.kv.nbytes
    assert engines["prefill"].exporter.release(chunk.kv.transfer_id)


# ---- (f) the KV cannot be pulled -------------------------------------------------------------------------


def dead_descriptor(ids: list[int]) -> KvDescriptor:
    return KvDescriptor(
        transfer_id="0" * 32, engine="torch", num_tokens=len(ids), nbytes=len(ids) * 46080, secret="x",
        host="127.0.0.1", port=9, num_layers=30, num_kv_heads=3, head_dim=64, dtype="float32",
    )  # fmt: skip


async def test_unreachable_kv_is_recomputed(engines, prompts, hf_tokens) -> None:
    ids, expected = prompts["france"], hf_tokens["france"]
    req = request(ids, "lost", max_tokens=QUESTIONS["france"][1])
    req.phase, req.kv, req.generated_ids = Phase.DECODE, dead_descriptor(ids), expected[:1]
    before = engines["decode"].stats().kv_recomputes
    chunks = await collect(engines["decode"], req)
    assert expected[:1] + tokens(chunks) == expected
    assert chunks[-1].cached_tokens == 0
    assert engines["decode"].stats().kv_recomputes == before + 1


async def test_unreachable_kv_fails_with_503_when_policy_is_fail(prompts) -> None:
    from dynamo_lite.engines.reference import build_engine

    engine = build_engine(settings("decode", kv_failure_policy="fail", warmup=False, max_batch_size=1))
    await engine.start()
    try:
        ids = prompts["france"]
        req = request(ids, "lost", max_tokens=4)
        req.phase, req.kv, req.generated_ids = Phase.DECODE, dead_descriptor(ids), [504]
        with pytest.raises(EngineError) as info:
            await collect(engine, req)
        assert info.value.status == 503
    finally:
        await engine.stop()


async def test_decode_without_descriptor_computes_the_prompt_itself(engines, prompts, hf_tokens) -> None:
    expected = hf_tokens["haiku"]
    req = request(prompts["haiku"], "local", max_tokens=QUESTIONS["haiku"][1])
    req.phase, req.generated_ids = Phase.DECODE, expected[:3]  # as after a migration: three tokens done
    assert expected[:3] + tokens(await collect(engines["decode"], req)) == expected


# ---- (d) cancellation ------------------------------------------------------------------------------------


async def test_closing_the_consumer_frees_the_slot(engines, prompts) -> None:
    agg = engines["agg"]
    gen = agg.generate(request(prompts["france"], "cancel-me", max_tokens=500, ignore_eos=True))
    await gen.__anext__()
    assert agg.stats().active_seqs == 1
    await gen.aclose()
    await wait_for(lambda: agg.stats().active_seqs == 0, within=5)


async def test_cancelling_the_consuming_task_frees_the_slot(engines, prompts) -> None:
    agg = engines["agg"]
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in agg.generate(
            request(prompts["haiku"], "cancel-task", max_tokens=500, ignore_eos=True)
        ):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: agg.stats().active_seqs == 0, within=5)
    # The engine is still healthy afterwards.
    assert len(tokens(await collect(agg, request(prompts["france"], "after", max_tokens=2)))) == 2


# ---- (e) sampling and stop conditions --------------------------------------------------------------------


async def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engines, prompts) -> None:
    agg = engines["agg"]
    seeded = request(prompts["haiku"], "s1", max_tokens=12, temperature=0.9, top_p=0.95, seed=1234)
    alone = tokens(await collect(agg, seeded))
    again = tokens(await collect(agg, seeded))
    other_seed = request(prompts["haiku"], "s2", max_tokens=12, temperature=0.9, top_p=0.95, seed=99)
    in_batch, other, _ = await asyncio.gather(
        collect(agg, seeded), collect(agg, other_seed), collect(agg, request(prompts["france"], "g"))
    )
    assert alone == again == tokens(in_batch)
    assert tokens(other) != alone


async def test_top_k_one_is_greedy(engines, prompts, hf_tokens) -> None:
    req = request(prompts["france"], "k1", max_tokens=24, temperature=1.5, top_k=1, seed=7)
    assert tokens(await collect(engines["agg"], req)) == hf_tokens["france"]


async def test_max_tokens_min_tokens_ignore_eos_and_stop_ids(engines, prompts, hf_tokens) -> None:
    agg, ids, answer = engines["agg"], prompts["france"], hf_tokens["france"]
    assert answer[-1] == 2 and len(answer) == 8  # the answer ends with eos after 8 tokens

    short = await collect(agg, request(ids, "max", max_tokens=3))
    assert tokens(short) == answer[:3] and short[-1].finish_reason == FinishReason.LENGTH

    no_eos = await collect(agg, request(ids, "ign", max_tokens=12, ignore_eos=True))
    assert len(tokens(no_eos)) == 12 and tokens(no_eos)[:8] == answer
    assert no_eos[-1].finish_reason == FinishReason.LENGTH

    at_least = await collect(agg, request(ids, "min", max_tokens=20, min_tokens=10))
    got = tokens(at_least)
    assert got[:7] == answer[:7] and 2 not in got[:10] and len(got) >= 10

    stop = await collect(agg, request(ids, "stop", max_tokens=20, stop_token_ids=[answer[3]]))
    assert tokens(stop) == answer[:4] and stop[-1].finish_reason == FinishReason.STOP


async def test_prefill_whose_first_token_stops_holds_no_kv(engines, prompts) -> None:
    req = request(prompts["france"], "stop-first", max_tokens=8, stop_token_ids=[504])  # 504 = "The"
    req.phase = Phase.PREFILL
    [chunk] = await collect(engines["prefill"], req)
    assert chunk.token_ids == [504] and chunk.finish_reason == FinishReason.STOP and chunk.kv is None


# ---- requests the engine refuses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        GenerateRequest("e", "m", [], SamplingOptions()),
        GenerateRequest("e", "m", [1, 49152], SamplingOptions()),
        GenerateRequest("e", "m", [1] * 2560, SamplingOptions()),
        GenerateRequest("e", "m", [1, 2], SamplingOptions(temperature=-1)),
        GenerateRequest("e", "m", [1, 2], SamplingOptions(top_p=0)),
        GenerateRequest("e", "m", [1, 2], SamplingOptions(), phase=Phase.PREFILL),  # agg has no exporter
    ],
)
async def test_invalid_requests_are_refused_with_400(engines, bad: GenerateRequest) -> None:
    with pytest.raises(EngineError) as info:
        await collect(engines["agg"], bad)
    assert info.value.status == 400
    assert engines["agg"].stats().active_seqs == 0
