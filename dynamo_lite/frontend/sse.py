"""A response whose body is produced while the client is watched: whichever ends first — the producer or the
client's connection — cancels the other (Starlette's ``StreamingResponse`` shape). A client that goes away
cancels the producer, and the producer's ``finally`` closes the backend stream, which cancels the work
downstream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell reverse proxies not to buffer the stream
]
JSON_HEADERS = [(b"content-type", b"application/json")]
T = TypeVar("T")


class Exchange:
    """One request/response exchange as the producer sees it."""

    __slots__ = ("send", "started", "disconnected", "complete")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False  # status and headers are sent: failures now go into the body
        self.disconnected = False  # the client went away before the response was complete
        self.complete = False  # the last body message is being sent: a disconnect now is the normal end

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes = b"") -> None:
        self.complete = True
        await self.send({"type": "http.response.body", "body": data, "more_body": False})

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], data: bytes) -> None:
        """A whole response in one go (with content-length)."""
        await self.start(status, [*headers, (b"content-length", str(len(data)).encode())])
        await self.end(data)


class BufferedBody:
    """Body bytes of a stream, held until its producer would wait: one socket write for every event that is
    ready at once (a frontend that falls behind its streams finds several of a stream's tokens queued), each
    still its own SSE event. Nothing waits for more: whatever is ready goes out before the producer sleeps.
    """

    __slots__ = ("_exchange", "_parts")

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange
        self._parts: list[bytes] = []

    def add(self, data: bytes) -> None:
        self._parts.append(data)

    def take(self) -> bytes:
        parts, self._parts = self._parts, []
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def flush(self) -> None:
        if self._parts:
            await self._exchange.body(self.take())

    def next_of(self, stream: AsyncIterator[T]) -> Awaitable[T | None]:
        """``anext(stream, None)``, writing what is held first if (and only if) that has to wait."""
        return _NextFlushing(anext(stream, None), self)


class _NextFlushing:
    """Awaits ``step``; when ``step`` would suspend, ``body.flush()`` runs first (then ``step`` continues where
    it stopped). A step that completes at once never flushes: the bytes wait for a later suspension or the end.
    Exceptions thrown in (cancellation) reach ``step``, as they would in a plain ``await step``."""

    __slots__ = ("_step", "_body")

    def __init__(self, step: Awaitable[T], body: BufferedBody) -> None:
        self._step = step
        self._body = body

    def __await__(self) -> Generator[Any, Any, T]:
        it = self._step.__await__()
        try:
            pending = it.send(None)
        except StopIteration as done:
            return done.value
        if self._body._parts:
            try:
                yield from self._body.flush().__await__()
            except BaseException as e:  # cancelled while writing: the step gets it too, then the caller
                with contextlib.suppress(BaseException):
                    it.throw(e)
                raise
        while True:
            try:
                sent = yield pending
            except BaseException as e:  # noqa: BLE001 — delivered to the step, as ``await`` would
                try:
                    pending = it.throw(e)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    pending = it.send(sent)
                except StopIteration as done:
                    return done.value


Producer = Callable[[Exchange], Awaitable[None]]


class WatchedResponse(Response):
    """Runs ``producer(exchange)`` and a disconnect listener together.

    The producer sends the response itself (status, headers, body), so it can answer an HTTP error as long as
    it hasn't started. It must not raise: errors become error responses or error events inside it.
    """

    def __init__(self, producer: Producer) -> None:  # no Response.__init__: nothing to render
        self._producer = producer
        self.background = None
        self.status_code = 200  # what it normally answers; the producer decides
        self.raw_headers: list[tuple[bytes, bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = Exchange(send)
        async with asyncio.TaskGroup() as group:
            produce = group.create_task(self._producer(exchange))
            listen = group.create_task(_listen_for_disconnect(receive, exchange, produce))
            produce.add_done_callback(lambda _: listen.cancel())


async def _listen_for_disconnect(receive: Receive, exchange: Exchange, produce: asyncio.Task) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not exchange.complete:
                exchange.disconnected = True
                produce.cancel()
            return
