"""Log-probabilities through the TensorRT-LLM adapter: what the stand-in reports in TensorRT-LLM's shapes
(``dict[token_id, Logprob(logprob, rank)]`` per position) arrives as ``TokenLogprobs`` on the right chunks."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

from test_trtllm_engine import PROMPT, collect, request, started, tokens

from dynamo_lite.engines.trtllm.logprobs import generated_logprobs, prompt_logprobs, to_token_logprobs
from dynamo_lite.protocol import GenerateChunk, Phase, SamplingOptions, TokenLogprobs


def asked(max_tokens: int, logprobs: int | None = 2, prompt: int | None = None) -> SamplingOptions:
    return SamplingOptions(max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs, prompt_logprobs=prompt)


def joined(chunks: list[GenerateChunk]) -> TokenLogprobs:
    out = TokenLogprobs()
    for chunk in chunks:
        if chunk.token_ids:
            assert chunk.logprobs is not None
            assert len(chunk.logprobs.logprobs) == len(chunk.token_ids)
            out.extend(chunk.logprobs)
    return out


def reported(
    entries: list[dict], targets: list[int], k: int
) -> tuple[list[float], list[list[int]], list[list[float]]]:
    """What the stand-in reported, read plainly: the target's value (nan when absent) and ranks 1..k."""
    chosen = [e[t].logprob if t in e else math.nan for e, t in zip(entries, targets, strict=True)]
    tops = [sorted((lp.rank, tid, lp.logprob) for tid, lp in e.items() if lp.rank <= k) for e in entries]
    return chosen, [[t for _, t, _ in top] for top in tops], [[v for _, _, v in top] for top in tops]


def same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b, strict=True)
    )


async def test_streamed_deltas_carry_their_tokens_logprobs(standin: ModuleType, model_dir: Path) -> None:
    engine = await started(model_dir, "agg", {"stream_interval": 3})
    chunks = await collect(engine, request(sampling=asked(10, logprobs=2)))
    assert [len(c.token_ids) for c in chunks] == [3, 3, 3, 1]
    sent = engine._llm.requests[0]
    assert sent.sampling_params.logprobs == 2
    got = joined(chunks)
    chosen, top_ids, top_values = reported(sent.outputs[0].logprobs, tokens(chunks), 2)
    assert got.logprobs == chosen and got.top_ids == top_ids and got.top_logprobs == top_values
    assert all(len(ids) == 2 for ids in got.top_ids)
    assert all(c.prompt_logprobs is None for c in chunks)
    await engine.stop()


async def test_no_logprobs_unless_asked_and_zero_is_the_chosen_token_only(
    standin: ModuleType, model_dir: Path
) -> None:
    engine = await started(model_dir, "agg")
    plain = await collect(engine, request(max_tokens=4))
    assert all(c.logprobs is None for c in plain)
    assert engine._llm.requests[0].sampling_params.logprobs is None
    chunks = await collect(engine, request(sampling=asked(4, logprobs=0)))
    sent = engine._llm.requests[1]
    assert sent.sampling_params.logprobs == 1  # 0 would be "off" on releases before TorchSampler
    got = joined(chunks)
    assert got.logprobs == reported(sent.outputs[0].logprobs, tokens(chunks), 0)[0]
    assert got.top_ids == [[]] * 4 and got.top_logprobs == [[]] * 4
    await engine.stop()


async def test_prompt_logprobs_come_once_with_the_first_chunk(standin: ModuleType, model_dir: Path) -> None:
    """TensorRT-LLM scores the prompt from its context logits' top k: a prompt token among them has its value,
    one outside them has none (nan, null in the response)."""
    engine = await started(model_dir, "agg")
    # A prompt whose last three tokens are the stand-in model's own continuation: rank 1 where they stand.
    continuation = tokens(await collect(engine, request(max_tokens=3)))
    prompt = PROMPT + continuation
    chunks = await collect(engine, request(token_ids=prompt, sampling=asked(3, logprobs=None, prompt=2)))
    sent = engine._llm.requests[1]
    assert sent.sampling_params.prompt_logprobs == 2
    scored = chunks[0].prompt_logprobs
    assert scored is not None and all(c.prompt_logprobs is None for c in chunks[1:])
    entries = sent.outputs[0].prompt_logprobs
    assert len(entries) == len(prompt)  # one per context position; the last is the first generated token's
    chosen, top_ids, top_values = reported(entries[:-1], prompt[1:], 2)
    assert same(scored.logprobs, chosen) and scored.top_ids == top_ids and scored.top_logprobs == top_values
    known = [not math.isnan(v) for v in scored.logprobs]
    assert known[-3:] == [True, True, True]  # the continuation: rank 1
    assert not all(known)  # the made-up prefix: outside the top 2
    assert all(c.logprobs is None for c in chunks)
    await engine.stop()


async def test_the_prefill_result_carries_the_first_tokens_logprobs(
    standin: ModuleType, model_dir: Path
) -> None:
    """Disaggregated: the first token's logprobs (and the prompt's) ride on the prefill result; the decode
    streams the rest's, never scores the prompt again, and together they equal an aggregated request's."""
    agg = await started(model_dir, "agg")
    prefill = await started(model_dir, "prefill")
    decode = await started(model_dir, "decode", {"stream_interval": 4})
    sampling = asked(12, logprobs=3, prompt=1)
    whole = await collect(agg, request(sampling=sampling))
    [first] = await collect(prefill, request(Phase.PREFILL, sampling=sampling))
    context = prefill._llm.requests[0]
    assert context.disaggregated_params_in.request_type == "context_only"
    assert (context.sampling_params.logprobs, context.sampling_params.prompt_logprobs) == (3, 1)
    assert first.kv is not None and first.finish_reason is None and len(first.token_ids) == 1
    assert first.logprobs is not None
    chosen, top_ids, top_values = reported(context.outputs[0].logprobs, first.token_ids, 3)
    assert (first.logprobs.logprobs, first.logprobs.top_ids, first.logprobs.top_logprobs) == (
        chosen,
        top_ids,
        top_values,
    )
    assert first.prompt_logprobs is not None and len(first.prompt_logprobs.logprobs) == len(PROMPT) - 1
    # What the router does across the handoff: the decode request does not ask for the prompt's again.
    decode_sampling = asked(12, logprobs=3)
    rest = await collect(
        decode, request(Phase.DECODE, sampling=decode_sampling, kv=first.kv, generated_ids=first.token_ids)
    )
    generation = decode._llm.requests[0]
    assert generation.sampling_params.prompt_logprobs is None
    assert all(c.prompt_logprobs is None for c in rest)
    both = TokenLogprobs()
    both.extend(first.logprobs)
    both.extend(joined(rest))
    assert first.token_ids + tokens(rest) == tokens(whole)
    assert both == joined(whole)
    assert same(first.prompt_logprobs.logprobs, whole[0].prompt_logprobs.logprobs)
    for engine in (agg, prefill, decode):
        await engine.stop()


async def test_a_recomputed_decode_does_not_score_the_prompt_again(
    standin: ModuleType, model_dir: Path
) -> None:
    decode = await started(model_dir, "decode")
    chunks = await collect(
        decode, request(Phase.DECODE, sampling=asked(5, logprobs=1, prompt=1), generated_ids=[5])
    )
    recomputed = decode._llm.requests[0]
    assert recomputed.disaggregated_params_in is None and recomputed.prompt_token_ids == [*PROMPT, 5]
    assert recomputed.sampling_params.prompt_logprobs is None
    assert all(c.prompt_logprobs is None for c in chunks)
    assert len(joined(chunks).logprobs) == 4
    await decode.stop()


# -- reading TensorRT-LLM's shapes ------------------------------------------------------------------------


def test_alternatives_are_the_ranks_up_to_top_most_likely_first(standin: ModuleType) -> None:
    from tensorrt_llm.executor.result import Logprob

    entry = {7: Logprob(-3.0, 3), 5: Logprob(-0.1, 1), 9: Logprob(-8.0, 40), 6: Logprob(-1.0, 2)}
    got = to_token_logprobs([entry], [9], top=2)
    assert (got.logprobs, got.top_ids, got.top_logprobs) == ([-8.0], [[5, 6]], [[-0.1, -1.0]])
    got = to_token_logprobs([entry, -0.5, None], [5, 11, 12], top=0)
    assert got.logprobs[:2] == [-0.1, -0.5] and math.isnan(got.logprobs[2])
    assert got.top_ids == [[], [], []]


def test_generated_entries_line_up_with_the_token_ids(standin: ModuleType) -> None:
    from tensorrt_llm.executor.result import Logprob
    from tensorrt_llm.llmapi import CompletionOutput

    def entry(value: float) -> dict:
        return {100 + int(-value): Logprob(value, 1)}

    # A generation-only output without the prefill's first-token entry: aligned from the last token.
    out = CompletionOutput(token_ids=[100, 101, 102], logprobs=[entry(-1.0), entry(-2.0)])
    assert generated_logprobs(out, out.token_ids, 1, 1).logprobs == [-1.0, -2.0]
    assert math.isnan(generated_logprobs(out, out.token_ids, 0, 1).logprobs[0])
    # A stop token cut from token_ids: its entry is past the end.
    out = CompletionOutput(token_ids=[101, 102], logprobs=[entry(-1.0), entry(-2.0), entry(-3.0)])
    assert generated_logprobs(out, out.token_ids, 0, 1).logprobs == [-1.0, -2.0]


def test_prompt_entries_score_the_next_prompt_token(standin: ModuleType) -> None:
    from tensorrt_llm.executor.result import Logprob
    from tensorrt_llm.llmapi import CompletionOutput

    rows = [
        {20: Logprob(-0.5, 1)},
        {99: Logprob(-0.2, 1)},
        {30: Logprob(-0.7, 1)},
    ]  # the last: first generated
    got = prompt_logprobs(CompletionOutput(prompt_logprobs=rows), [10, 20, 21], top=1)
    assert got is not None
    assert got.logprobs[0] == -0.5 and math.isnan(got.logprobs[1])
    assert got.top_ids == [[20], [99]]
    assert prompt_logprobs(CompletionOutput(), [10, 20], top=1) is None
