"""``n > 1``: n choices of one request, as n independent backend requests.

Choice ``i`` is the request with id ``<id>-<i>`` and, when the request is seeded, seed ``seed + i``: with a seed
the n choices are reproducible (and differ from each other when sampling). Each choice has its own output state
(detokenizer, stop strings, finish reason) and logprobs; streamed, their chunks go out interleaved as they come,
each with its ``index``; whole, one body with n choices. Usage counts the prompt once and every choice's
completion tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import msgspec
import orjson

from dynamo_lite.frontend.logprobs import ChatLogprobs, CompletionLogprobs, splice
from dynamo_lite.frontend.output import OutputState, Transcript
from dynamo_lite.frontend.sse import JSON_HEADERS, SSE_HEADERS, Exchange
from dynamo_lite.protocol import GenerateChunk, GenerateRequest

if TYPE_CHECKING:
    from dynamo_lite.frontend.serving import PreparedRequest

MAX_CHOICES = 16  # n above this is refused: each choice is a full request on the workers


def choice_requests(request: GenerateRequest, n: int) -> list[GenerateRequest]:
    """The n backend requests of a request with ``n`` choices."""
    seed = request.sampling.seed
    return [
        msgspec.structs.replace(
            request,
            request_id=f"{request.request_id}-{i}",
            sampling=msgspec.structs.replace(
                request.sampling, seed=None if seed is None else (seed + i) & 0xFFFF_FFFF_FFFF_FFFF
            ),
        )
        for i in range(n)
    ]


class MergedStreams:
    """n backend streams read concurrently, as ``(choice, chunk)``; ``(choice, None)`` when one ends. The
    consumer stops reading once every choice finished; ``stop`` closes one early (a stop string)."""

    def __init__(self, streams: list[AsyncIterator[GenerateChunk]]) -> None:
        self._queue: asyncio.Queue[tuple[int, GenerateChunk | None, BaseException | None]] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)]

    async def _pump(self, i: int, stream: AsyncIterator[GenerateChunk]) -> None:
        try:
            async with aclosing(stream):  # type: ignore[type-var]
                async for chunk in stream:
                    self._queue.put_nowait((i, chunk, None))
            self._queue.put_nowait((i, None, None))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the whole response fails with it, as a single choice would
            self._queue.put_nowait((i, None, e))

    def __aiter__(self) -> MergedStreams:
        return self

    async def __anext__(self) -> tuple[int, GenerateChunk | None]:
        i, chunk, error = await self._queue.get()
        if error is not None:
            raise error
        return i, chunk

    def stop(self, i: int) -> None:
        self._tasks[i].cancel()

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Choices:
    """The output states of n choices; sums what usage and metrics read (as one ``OutputState`` would)."""

    def __init__(self, p: PreparedRequest, n: int) -> None:
        self.outs = [
            OutputState(p.pre.new_parser(p.functions), p.stops, p.request.sampling.max_tokens, p.include_stop)
            for _ in range(n)
        ]
        self.logprobs = [p.new_logprobs() for _ in range(n)]
        self.backend_finished = False  # MergedStreams drains each stream itself: close, never drain

    @property
    def completion_tokens(self) -> int:
        return sum(o.completion_tokens for o in self.outs)

    @property
    def cached_tokens(self) -> int:
        return max(o.cached_tokens for o in self.outs)

    @property
    def reasoning_tokens(self) -> int:
        return sum(o.reasoning_tokens for o in self.outs)

    @property
    def finish_reason(self) -> str | None:
        """The choices' finish reasons, for the access log ("stop", or e.g. "length,stop" when they differ)."""
        reasons = sorted({o.finish_reason for o in self.outs if o.finish_reason})
        return ",".join(reasons) or None

    @property
    def finished(self) -> bool:
        return all(o.finish_reason for o in self.outs)

    def process(self, i: int, chunk: GenerateChunk | None) -> Any:
        out, logprobs = self.outs[i], self.logprobs[i]
        counted = out.completion_tokens
        delta = out.process(chunk) if chunk is not None else out.end()
        if logprobs is not None and chunk is not None:
            logprobs.add(chunk, out.completion_tokens - counted)
        return delta


async def write_stream(
    p: PreparedRequest,
    ex: Exchange,
    rid: tuple[bytes, bytes],
    merged: MergedStreams,
    first: tuple[int, GenerateChunk | None] | None,
    choices: Choices,
) -> None:
    fmts = [p.stream_format(index=i) for i in range(len(choices.outs))]
    await ex.start(200, [*SSE_HEADERS, rid])
    item = first
    while item is not None:
        i, chunk = item
        out = choices.outs[i]
        if not out.finish_reason:
            delta = choices.process(i, chunk)
            finish = out.finish_reason
            if delta or finish:
                data = fmts[i].delta(delta, finish)
                logprobs = choices.logprobs[i]
                taken = logprobs.take() if data and logprobs is not None else None
                if taken is not None:
                    data = splice(data, taken)
                if data:
                    await ex.body(data)
            if finish and chunk is not None and chunk.finish_reason is None:
                merged.stop(i)  # ended here (stop string, max_tokens): the backend need not go on
        if choices.finished:
            break
        item = await anext(merged, None)
    await ex.end(fmts[0].tail(p.usage(choices), "stop"))  # type: ignore[arg-type]


async def write_whole(
    p: PreparedRequest,
    ex: Exchange,
    rid: tuple[bytes, bytes],
    merged: MergedStreams,
    first: tuple[int, GenerateChunk | None] | None,
    choices: Choices,
) -> None:
    transcripts = [Transcript() for _ in choices.outs]
    item = first
    while item is not None:
        i, chunk = item
        out = choices.outs[i]
        if not out.finish_reason:
            transcripts[i].add(choices.process(i, chunk))
            if out.finish_reason and chunk is not None and chunk.finish_reason is None:
                merged.stop(i)
        if choices.finished:
            break
        item = await anext(merged, None)
    usage = p.usage(choices)  # type: ignore[arg-type]
    body: dict | None = None
    for i, (out, transcript) in enumerate(zip(choices.outs, transcripts, strict=True)):
        logprobs: ChatLogprobs | CompletionLogprobs | None = choices.logprobs[i]
        one = orjson.loads(
            p.body(transcript, out.finish_reason or "stop", usage, logprobs.whole() if logprobs else None)
        )
        one["choices"][0]["index"] = i
        if body is None:
            body = one
        else:
            body["choices"].append(one["choices"][0])
    await ex.respond(200, [*JSON_HEADERS, rid], orjson.dumps(body))
