"""``BufferedBody``: a stream's events that are ready together go out in one write, and nothing ready is held
while the producer waits (each event stays its own SSE event)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from dynamo_lite.frontend.sse import BufferedBody, Exchange


class Wire:
    """The ASGI send side: what was written, one entry per write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.body":
            self.writes.append(message["body"])


async def test_ready_items_are_written_together_and_nothing_waits_behind_a_wait() -> None:
    wire = Wire()
    body = BufferedBody(Exchange(wire.send))
    gate = asyncio.Event()

    async def items() -> AsyncIterator[int]:
        yield 1
        yield 2  # ready at once: no write between 1 and 2
        await gate.wait()
        yield 3

    stream = items()
    got = []
    while (item := await body.next_of(stream)) is not None:
        got.append(item)
        body.add(b"data: %d\n\n" % item)
        if item == 2:
            asyncio.get_running_loop().call_soon(lambda: (wire.writes.append(b"<waited>"), gate.set()))
    await body.flush()
    assert got == [1, 2, 3]
    # 1 and 2 held until the stream had to wait for 3: written before the wait, as one write.
    assert wire.writes == [b"data: 1\n\ndata: 2\n\n", b"<waited>", b"data: 3\n\n"]


async def test_cancelling_a_waiting_producer_reaches_the_stream() -> None:
    wire = Wire()
    body = BufferedBody(Exchange(wire.send))
    closed = asyncio.Event()

    async def items() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.Event().wait()  # never
            yield 2
        finally:
            closed.set()

    async def produce() -> None:
        stream = items()
        while (item := await body.next_of(stream)) is not None:
            body.add(b"x%d" % item)

    task = asyncio.create_task(produce())
    await asyncio.sleep(0.01)
    assert wire.writes == [b"x1"]  # written before waiting
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed.is_set()


async def test_a_stream_error_after_ready_items_keeps_their_order() -> None:
    wire = Wire()
    body = BufferedBody(Exchange(wire.send))

    async def items() -> AsyncIterator[int]:
        yield 1
        raise RuntimeError("worker failed")

    stream = items()
    with pytest.raises(RuntimeError):
        while (item := await body.next_of(stream)) is not None:
            body.add(b"x%d" % item)
    assert body.take() == b"x1"  # still held: the caller flushes it ahead of its error event
