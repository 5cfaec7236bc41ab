"""A response (a plain ASGI app) whose body is produced while the client is watched: whichever ends first — the
producer or the client's connection — cancels the other (Starlette's ``StreamingResponse`` shape). A client that
goes away cancels the producer, and the producer's ``finally`` closes the backend stream, which cancels the work
downstream. ``BufferedBody`` writes a stream's ready events in one go, just before it waits."""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any, TypeVar

from starlette.types import Receive, Scope, Send

SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell reverse proxies not to buffer the stream
]
JSON_HEADERS = [(b"content-type", b"application/json")]
HEADERS_WITH_BODY = "dynamo_lite.headers_with_body"
"""An ASGI extension of our server (``server.py``): a ``http.response.start`` that carries this key set to True
is written together with the next body message, in one socket write (one TCP segment, one wake-up of the
client instead of two). An app that sends one must send a body message right after, without waiting."""
T = TypeVar("T")


class Exchange:
    """One request/response exchange as the producer sees it. ``join_headers``: the server writes the status and
    headers with the first body bytes (``HEADERS_WITH_BODY``); ``headers_held`` says they still wait for them."""

    __slots__ = ("send", "started", "disconnected", "complete", "join_headers", "headers_held")

    def __init__(self, send: Send, *, join_headers: bool = False) -> None:
        self.send = send
        self.started = False  # status and headers are sent: failures now go into the body
        self.disconnected = False  # the client went away before the response was complete
        self.complete = False  # the last body message is being sent: a disconnect now is the normal end
        self.join_headers = join_headers
        self.headers_held = False

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Commit to ``status``: the caller sends a body message next, without waiting in between."""
        self.started = True
        message = {"type": "http.response.start", "status": status, "headers": headers}
        if self.join_headers:
            message[HEADERS_WITH_BODY] = True
            self.headers_held = True
        await self.send(message)

    async def body(self, data: bytes) -> None:
        self.headers_held = False
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes = b"") -> None:
        self.complete = True
        self.headers_held = False
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

    @property
    def pending(self) -> bool:
        """Whether a flush would write: held events, or the status and headers still held by the server."""
        return bool(self._parts) or self._exchange.headers_held

    async def flush(self) -> None:
        if self.pending:
            await self._exchange.body(self.take())

    def next_of(self, stream: AsyncIterator[T]) -> Awaitable[T | None]:
        """``anext(stream, None)``, writing what is held first if (and only if) that has to wait."""
        return _flush_while_waiting(anext(stream, None), self)


@types.coroutine
def _flush_while_waiting(step: Awaitable[T], body: BufferedBody) -> Generator[Any, Any, T]:
    """``await step``, except that when ``step`` has to wait, ``body.flush()`` runs first.

    A step that completes at once never flushes: its bytes wait for a later wait or the end. A generator-based
    coroutine (no task, no extra event-loop round) because it runs once per chunk.
    """
    steps = step.__await__()
    try:
        waits_on = steps.send(None)  # run ``step`` up to its first wait
    except StopIteration as ready:
        return ready.value  # it had an item at once
    if body.pending:
        try:
            yield from body.flush().__await__()  # the write goes out while ``step`` waits
        except BaseException as e:  # cancelled while writing: ``step`` gets it too, then the caller
            with contextlib.suppress(BaseException):
                steps.throw(e)
            raise
    return (yield from _resume(steps, waits_on))


def _resume(steps: Generator[Any, Any, T], waits_on: Any) -> Generator[Any, Any, T]:
    """The rest of ``await`` on ``steps`` once it has yielded ``waits_on`` (what ``yield from`` does, PEP 380): hand
    each wait to the event loop, and the loop's answer — a value, or an exception such as a cancellation — back to
    ``steps``, until it returns."""
    while True:
        try:
            answer = yield waits_on
        except BaseException as e:  # noqa: BLE001 — delivered to ``steps``, as ``await`` would
            try:
                waits_on = steps.throw(e)
            except StopIteration as done:
                return done.value
        else:
            try:
                waits_on = steps.send(answer)
            except StopIteration as done:
                return done.value


Producer = Callable[[Exchange], Awaitable[None]]


class WatchedResponse:
    """An ASGI app that runs ``producer(exchange)`` and a disconnect listener together.

    The producer sends the response itself (status, headers, body), so it can answer an HTTP error as long as
    it hasn't started. It must not raise: errors become error responses or error events inside it.

    The producer runs in the server's task for this request, the listener in a task beside it that cancels that
    task when the client leaves: the request's work starts at once, not a loop turn later in a task of its own.
    """

    __slots__ = ("_producer",)

    def __init__(self, producer: Producer) -> None:
        self._producer = producer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = Exchange(send, join_headers=HEADERS_WITH_BODY in (scope.get("extensions") or {}))
        this = asyncio.current_task()
        assert this is not None
        listen = asyncio.get_running_loop().create_task(_listen_for_disconnect(receive, exchange, this))
        try:
            await self._producer(exchange)
        except asyncio.CancelledError:
            # Our listener's cancellation (the client left) ends this response, not the server's task; any
            # other (a shutdown) goes on.
            if not exchange.disconnected or this.uncancel() > 0:
                raise
        finally:
            listen.cancel()  # after this no disconnect can cancel ``this``: the listener never runs again


async def _listen_for_disconnect(receive: Receive, exchange: Exchange, produce: asyncio.Task) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not exchange.complete:
                exchange.disconnected = True
                produce.cancel()
            return
