"""The choices of a response: one, or n as n independent backend requests.

Choice ``i`` of ``n > 1`` is the request with id ``<id>-<i>`` and, when the request is seeded, seed ``seed + i``:
with a seed the n choices are reproducible (and differ from each other when sampling). Each choice has its own
output state (detokenizer, stop strings, finish reason), logprobs and, streamed, its stream format; streamed, their
chunks go out interleaved as they come, each with its ``index``; whole, one body with n choices (``writer.py``).
Usage counts the prompt once and every choice's completion tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import msgspec

from dynamo_lite.frontend.logprobs import ChatLogprobs, CompletionLogprobs
from dynamo_lite.frontend.output import OutputState
from dynamo_lite.frontend.prepared import PreparedRequest, StreamFormat
from dynamo_lite.protocol import GenerateChunk, GenerateRequest


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
    consumer stops reading once every choice finished; ``stop`` closes one early (a stop string). Never
    exhausted: the consumer ends by itself."""

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


class Choice:
    """One choice's state: its output (deltas, stop strings, finish), logprobs, its stream format (streamed
    responses); ``token_at``: when its last tokens arrived (``time.perf_counter``; 0: none yet)."""

    __slots__ = ("out", "logprobs", "fmt", "token_at")

    def __init__(self, p: PreparedRequest, index: int) -> None:
        self.out = OutputState(
            p.pre.new_parser(p.functions), p.stops, p.request.sampling.max_tokens, p.include_stop
        )
        self.logprobs: ChatLogprobs | CompletionLogprobs | None = p.new_logprobs()
        self.fmt: StreamFormat | None = p.stream_format(index) if p.stream else None
        self.token_at = 0.0


class Choices:
    """The n choices of a response; sums what usage, metrics and the access log read."""

    __slots__ = ("items",)

    def __init__(self, p: PreparedRequest) -> None:
        self.items = [Choice(p, i) for i in range(p.n)]

    @property
    def completion_tokens(self) -> int:
        return sum(c.out.completion_tokens for c in self.items)

    @property
    def cached_tokens(self) -> int:
        return max(c.out.cached_tokens for c in self.items)

    @property
    def reasoning_tokens(self) -> int:
        return sum(c.out.reasoning_tokens for c in self.items)

    @property
    def finish_reason(self) -> str | None:
        """The choices' finish reasons, for the access log ("stop", or e.g. "length,stop" when they differ)."""
        reasons = sorted({c.out.finish_reason for c in self.items if c.out.finish_reason})
        return ",".join(reasons) or None

    @property
    def finished(self) -> bool:
        return all(c.out.finish_reason for c in self.items)

    @property
    def backend_finished(self) -> bool:
        """One choice whose backend stream sent its end: drain that stream rather than close it. n streams
        (``MergedStreams``) drain themselves: always closed."""
        return len(self.items) == 1 and self.items[0].out.backend_finished
