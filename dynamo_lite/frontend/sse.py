"""A response whose body is produced while the client is watched: whichever ends first — the producer or the
client's connection — cancels the other (Starlette's ``StreamingResponse`` shape). A client that goes away
cancels the producer, and the producer's ``finally`` closes the backend stream, which cancels the work
downstream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell reverse proxies not to buffer the stream
]
JSON_HEADERS = [(b"content-type", b"application/json")]


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
