"""``TokenStream``: what an engine pushes reaches the consumer, whenever the engine says it admitted the request."""

from __future__ import annotations

import asyncio

from dynamo_lite.engines.base import TokenStream
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
