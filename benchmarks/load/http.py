"""A lean HTTP/1.1 client for load generation: an asyncio Protocol per keep-alive connection.

Why not httpx or aiohttp: on a small box the load client shares the CPU with the server it measures, and a
heavyweight client became the bottleneck (httpx took 88% of a core streaming 64 concurrent requests). Here a
response is parsed inside ``data_received`` with bytes operations only; each read is timestamped once, when it
arrives, and handed on to a ``BodySink`` (the SSE layer), so the cost per chunk is a few dictionary-free
function calls.

One request at a time per connection (no pipelining): a closed-loop worker owns one connection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as ssl_module
from dataclasses import dataclass
from time import perf_counter
from typing import Protocol, cast
from urllib.parse import urlsplit

from .config import Limits, Timeouts


class HttpProtocolError(Exception):
    """The server sent something that is not HTTP/1.1 as we understand it."""


class ConnectionDropped(ConnectionError):
    """The connection closed before the response was complete."""

    def __init__(self, detail: str, got_bytes: bool) -> None:
        super().__init__(detail)
        self.got_bytes = got_bytes  # False on a stale keep-alive connection: safe to retry elsewhere


class BodySink(Protocol):
    """Receives a 2xx response body as it arrives; ``t`` is the perf_counter() of the read."""

    def on_body(self, data: bytes, t: float) -> None: ...


@dataclass(slots=True)
class HttpResult:
    status: int
    first_byte: float  # perf_counter() of the first response byte
    end: float  # perf_counter() of the read that completed the body
    error_body: bytes = b""  # a non-2xx body (truncated to Limits.max_error_body_bytes)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where to connect: scheme, host and port of a URL."""

    host: str
    port: int
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http(s)://host[:port] URL, got {url!r}")
        tls = parts.scheme == "https"
        return cls(parts.hostname, parts.port or (443 if tls else 80), tls)

    @property
    def host_header(self) -> str:
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def build_request(origin: Origin, path: str, body: bytes, headers: dict[str, str], stream: bool) -> bytes:
    """The full bytes of a POST with a JSON body, built once before the run."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {origin.host_header}",
        "Content-Type: application/json",
        f"Accept: {'text/event-stream' if stream else 'application/json'}",
        f"Content-Length: {len(body)}",
    ]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# Chunked-decoder states.
_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)
_MAX_SIZE_LINE = 4096


class ChunkedDecoder:
    """Decodes a ``Transfer-Encoding: chunked`` body fed in arbitrary pieces."""

    __slots__ = ("_buf", "_remaining", "_state")

    def __init__(self) -> None:
        self._buf = b""
        self._remaining = 0
        self._state = _SIZE

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> bytes:
        """Return the payload bytes in ``data`` (possibly empty); ``done`` turns true at the last chunk."""
        out: list[bytes] = []
        pos = 0
        if self._state == _SIZE and not self._buf:
            # Fast path: reads that hold whole chunks (a server writes one SSE event per chunk).
            n = len(data)
            eol = data.find(b"\r\n")
            if 0 < eol < 9 and data.endswith(b"\r\n"):
                try:
                    size = int(data[:eol], 16)
                except ValueError:
                    size = -1
                if size > 0 and eol + 4 + size == n:
                    return data[eol + 2 : n - 2]  # exactly one chunk: the most common read
            while True:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    break
                try:
                    size = int(data[pos:eol], 16)
                except ValueError:
                    break  # chunk extensions, or garbage: the general path decides
                end = eol + 2 + size
                if size == 0 or end + 2 > n or data[end : end + 2] != b"\r\n":
                    break
                out.append(data[eol + 2 : end])
                pos = end + 2
            if pos == n:
                return out[0] if len(out) == 1 else b"".join(out)
        rest = self._feed(data[pos:] if pos else data)
        if not out:
            return rest
        out.append(rest)
        return b"".join(out)

    def _feed(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        self._buf = b""
        n = len(buf)
        pos = 0
        out: list[bytes] = []
        state = self._state
        while pos < n:
            if state == _DATA:
                take = min(self._remaining, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    state = _DATA_END
            elif state == _SIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > _MAX_SIZE_LINE:
                        raise HttpProtocolError("chunk size line too long")
                    self._buf = buf[pos:]
                    break
                try:
                    size = int(buf[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    raise HttpProtocolError(f"bad chunk size line {buf[pos:eol][:40]!r}") from None
                pos = eol + 2
                if size:
                    self._remaining = size
                    state = _DATA
                else:
                    state = _TRAILER
            elif state == _DATA_END:
                if n - pos < 2:
                    self._buf = buf[pos:]
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise HttpProtocolError("chunk data not followed by CRLF")
                pos += 2
                state = _SIZE
            elif state == _TRAILER:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > _MAX_SIZE_LINE:
                        raise HttpProtocolError("trailer line too long")
                    self._buf = buf[pos:]
                    break
                empty = eol == pos  # the blank line that ends the trailer section, and the body
                pos = eol + 2
                if empty:
                    state = _DONE
                    break
            else:  # _DONE: bytes after the body (no pipelining, so nothing should come)
                break
        self._state = state
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)


def _parse_head(head: bytes) -> tuple[int, bool, bool, int | None]:
    """Status line + headers → (status, keep_alive, chunked, content_length)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise HttpProtocolError(f"bad status line {lines[0][:80]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise HttpProtocolError(f"bad status line {lines[0][:80]!r}") from None
    keep_alive = parts[0] == b"HTTP/1.1"
    chunked = False
    length: int | None = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise HttpProtocolError(f"bad content-length {value[:40]!r}") from None
        elif name == b"connection":
            token = value.strip().lower()
            if token == b"close":
                keep_alive = False
            elif token == b"keep-alive":
                keep_alive = True
    return status, keep_alive, chunked, length


# Response states of a connection.
_IDLE, _HEAD, _CHUNKED, _LENGTH, _UNTIL_CLOSE = range(5)


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection: ``request()`` writes prebuilt bytes; its future resolves at the body end."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._fut: asyncio.Future[HttpResult] | None = None
        self._sink: BodySink | None = None
        self._state = _IDLE
        self._head = b""
        self._status = 0
        self._ok = False
        self._keep_alive = True
        self._chunked = ChunkedDecoder()
        self._remaining = 0
        self._first_byte = 0.0
        self._got_bytes = False
        self._error_body = bytearray()
        self.closed = False
        self.requests_sent = 0

    @classmethod
    async def open(cls, origin: Origin, timeouts: Timeouts, limits: Limits) -> HttpConnection:
        loop = asyncio.get_running_loop()
        ssl = ssl_module.create_default_context() if origin.tls else None
        async with asyncio.timeout(timeouts.connect):
            _, conn = await loop.create_connection(lambda: cls(limits), origin.host, origin.port, ssl=ssl)
        return conn

    # -- asyncio.Protocol -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass it
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Without it small request writes can wait on delayed ACKs (~40 ms stalls).
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass

    def data_received(self, data: bytes) -> None:
        t = perf_counter()
        try:
            if self._state == _CHUNKED and self._ok:  # the hot path: one SSE read after another
                chunked = self._chunked
                payload = chunked.feed(data)
                if payload:
                    self._sink.on_body(payload, t)  # type: ignore[union-attr]
                if chunked._state == _DONE:
                    self._finish(t)
            elif self._state == _HEAD:
                self._on_head_bytes(data, t)
            elif self._state == _IDLE:
                raise HttpProtocolError(f"unexpected bytes on an idle connection: {data[:60]!r}")
            else:
                self._on_body_bytes(data, t)
        except Exception as exc:  # a parser or sink error must fail the request, never hang it
            self._fail(exc)

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost settles any request in flight

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        fut = self._fut
        if fut is None or fut.done():
            return
        if self._state == _UNTIL_CLOSE:
            self._finish(perf_counter())
        else:
            detail = f"connection closed by peer{f': {exc}' if exc else ''}"
            self._fut = None
            fut.set_exception(ConnectionDropped(detail, got_bytes=self._got_bytes))

    # -- requests ---------------------------------------------------------------------------------------
    @property
    def reusable(self) -> bool:
        return not self.closed and self._keep_alive and self._state == _IDLE

    def request(self, data: bytes, sink: BodySink) -> asyncio.Future[HttpResult]:
        """Send one request (complete bytes); 2xx body bytes go to ``sink`` as they arrive."""
        if not self.reusable or self._transport is None:
            raise ConnectionDropped("connection is not reusable", got_bytes=False)
        self._fut = fut = self._loop.create_future()
        self._sink = sink
        self._state = _HEAD
        self._head = b""
        self._got_bytes = False
        self.requests_sent += 1
        self._transport.write(data)
        return fut

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection now (after a timeout or an error: its state is unknown)."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    # -- response parsing -------------------------------------------------------------------------------
    def _on_head_bytes(self, data: bytes, t: float) -> None:
        if not self._got_bytes:
            self._got_bytes = True
            self._first_byte = t
        buf = self._head + data if self._head else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self._limits.max_head_bytes:
                    raise HttpProtocolError("response head too large")
                self._head = buf
                return
            status, keep_alive, chunked, length = _parse_head(buf[:end])
            buf = buf[end + 4 :]
            if not 100 <= status < 200:
                break  # an interim response (100 Continue) is followed by the real one
        self._head = b""
        self._status = status
        self._ok = 200 <= status < 300
        self._keep_alive = keep_alive
        self._error_body = bytearray()
        if status in (204, 304) or length == 0:
            self._finish(t)
            return
        if chunked:
            self._chunked = ChunkedDecoder()
            self._state = _CHUNKED
        elif length is not None:
            self._remaining = length
            self._state = _LENGTH
        else:
            self._keep_alive = False
            self._state = _UNTIL_CLOSE
        if buf:
            self._on_body_bytes(buf, t)

    def _on_body_bytes(self, data: bytes, t: float) -> None:
        if self._state == _CHUNKED:
            payload = self._chunked.feed(data)
            if payload:
                self._deliver(payload, t)
            if self._chunked.done:
                self._finish(t)
        elif self._state == _LENGTH:
            if len(data) > self._remaining:
                data = data[: self._remaining]
            self._remaining -= len(data)
            self._deliver(data, t)
            if self._remaining == 0:
                self._finish(t)
        else:
            self._deliver(data, t)

    def _deliver(self, payload: bytes, t: float) -> None:
        if self._ok:
            self._sink.on_body(payload, t)  # type: ignore[union-attr]
        else:
            room = self._limits.max_error_body_bytes - len(self._error_body)
            if room > 0:
                self._error_body += payload[:room]

    def _finish(self, t: float) -> None:
        fut = self._fut
        self._fut = None
        self._sink = None
        self._state = _IDLE
        if not self._keep_alive:
            self.close()
        if fut is not None and not fut.done():
            fut.set_result(HttpResult(self._status, self._first_byte, t, bytes(self._error_body)))

    def _fail(self, exc: Exception) -> None:
        fut = self._fut
        self._fut = None
        self.abort()
        if fut is not None and not fut.done():
            fut.set_exception(exc)


class ConnectionPool:
    """Keep-alive connections to one origin; at most ``limits.max_connections`` in use at once."""

    def __init__(self, origin: Origin, timeouts: Timeouts, limits: Limits) -> None:
        self.origin = origin
        self._timeouts = timeouts
        self._limits = limits
        self._idle: list[HttpConnection] = []
        self._open: set[HttpConnection] = set()
        self._slots = asyncio.Semaphore(limits.max_connections)
        self.opened = 0  # connections opened over the pool's life

    async def acquire(self) -> HttpConnection:
        """An idle connection, else a new one (waits for a slot when all are in use)."""
        await self._slots.acquire()
        while self._idle:
            conn = self._idle.pop()  # LIFO: the warmest connection
            if conn.reusable:
                return conn
            self._open.discard(conn)
        try:
            conn = await HttpConnection.open(self.origin, self._timeouts, self._limits)
        except BaseException:
            self._slots.release()
            raise
        self._open.add(conn)
        self.opened += 1
        return conn

    def release(self, conn: HttpConnection) -> None:
        if conn.reusable:
            self._idle.append(conn)
        else:
            if not conn.closed:
                conn.abort()
            self._open.discard(conn)
        self._slots.release()

    def close(self) -> None:
        for conn in self._open:
            conn.close()
        self._open.clear()
        self._idle.clear()
