"""``TokenStream``: what an engine pushes reaches the consumer, whenever the engine says it admitted the request."""

from __future__ import annotations

import asyncio

from dynamo_lite.engines.base import StreamPacing, TokenStream
from dynamo_lite.protocol import FinishReason, TokenLogprobs


async def test_a_stream_never_admitted_still_delivers() -> None:
    stream = TokenStream(asyncio.get_running_loop())
    stream.push([5, 6])
    stream.finish(FinishReason.STOP)
    chunks = [c async for c in stream]
    assert [(c.token_ids, c.finish_reason, c.logprobs) for c in chunks] == [([5, 6], "stop", None)]


async def test_logprobs_pushed_before_admission_are_kept() -> None:
    stream = TokenStream(asyncio.get_running_loop())
    stream.set_prompt_logprobs(TokenLogprobs([-1.0], [[3]], [[-0.5]]))
    stream.push(5, TokenLogprobs([-0.25], [[5]], [[-0.25]]))
    stream.admitted()  # told late (a prefill computed at once): must not drop what is pending
    stream.finish(FinishReason.LENGTH)
    [chunk] = [c async for c in stream]
    assert chunk.logprobs == TokenLogprobs([-0.25], [[5]], [[-0.25]])
    assert chunk.prompt_logprobs == TokenLogprobs([-1.0], [[3]], [[-0.5]])


async def test_per_token_pacing_sends_each_token_alone_even_when_pushed_together() -> None:
    pacing = StreamPacing(0.005, per_token=True)
    pacing.adapt(active_streams=1000, max_messages_per_s=10.0)  # the load would coalesce; per-token does not
    assert pacing.interval_s == 0.0
    stream = TokenStream(asyncio.get_running_loop(), pacing)
    stream.set_prompt_logprobs(TokenLogprobs([-1.0], [[3]], [[-0.5]]))
    stream.push([5, 6], TokenLogprobs([-0.25, -0.5], [[5], [6]], [[-0.25], [-0.5]]))
    stream.push(7, TokenLogprobs([-0.75], [[7]], [[-0.75]]))
    stream.finish(FinishReason.LENGTH)  # all before the reader wakes: one wake-up holds three tokens
    chunks = [c async for c in stream]
    assert [(c.token_ids, c.finish_reason) for c in chunks] == [([5], None), ([6], None), ([7], "length")]
    assert [c.logprobs.logprobs for c in chunks if c.logprobs] == [[-0.25], [-0.5], [-0.75]]
    assert [c.prompt_logprobs is not None for c in chunks] == [True, False, False]


async def test_default_pacing_coalesces_what_one_wake_up_finds() -> None:
    stream = TokenStream(asyncio.get_running_loop(), StreamPacing())
    stream.push([5, 6])
    stream.push(7)
    stream.finish(FinishReason.STOP)
    assert [c.token_ids for c in [c async for c in stream]] == [[5, 6, 7]]
