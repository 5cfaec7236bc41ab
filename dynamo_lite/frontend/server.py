"""Serving the app with uvicorn (httptools parser, no access log, TCP_NODELAY on every accepted socket, a
response's headers written with its first body bytes where the app asks for it: ``sse.HEADERS_WITH_BODY``).

Run it under uvloop (``asyncio.run(main(), loop_factory=uvloop.new_event_loop)`` or ``uvloop.run(main())``):
uvicorn's ``loop`` setting only applies when uvicorn creates the loop itself, which it doesn't here.
Signals are the caller's business: cancel ``serve_http`` (or call ``HttpServer.stop``) to shut down
gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dynamo_lite.frontend.settings import FrontendSettings
from dynamo_lite.frontend.sse import HEADERS_WITH_BODY


class NoDelayHttpToolsProtocol(HttpToolsProtocol):
    """httptools protocol that disables Nagle on its connection: an SSE chunk leaves at once instead of
    waiting for the client's delayed ACK (~40 ms stalls on keep-alive connections). Its requests get the
    ``HEADERS_WITH_BODY`` extension."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # uvicorn's hook between making a request's cycle and starting its app (a uvicorn without it runs
        # without the extension: apps then send their headers the ordinary way).
        cycle.send = _HeadersWithBody(cycle)
        cycle.scope.setdefault("extensions", {})[HEADERS_WITH_BODY] = {}
        super()._start_asgi_task(cycle, app)


class _HeadersWithBody:
    """A request cycle's ``send`` that holds a ``http.response.start`` marked ``HEADERS_WITH_BODY`` until the
    next message and has uvicorn write both in one ``transport.write``: status line, headers and the first
    event leave in one segment (uvicorn writes each message at once, so a TTFT paid two writes and two
    wake-ups of the client)."""

    __slots__ = ("_cycle", "_send", "_held")

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle
        self._send = cycle.send
        self._held: dict | None = None

    async def __call__(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            # A start replaces one still held (uvicorn's 500 after an app failed past its start).
            self._held = message if message.get(HEADERS_WITH_BODY) else None
            if self._held is None:
                await self._send(message)
            return
        held, self._held = self._held, None
        if held is None:
            await self._send(message)
            return
        cycle = self._cycle
        transport = cycle.transport
        joined = cycle.transport = _JoinedWrites(transport)
        try:
            await self._send(held)
            await self._send(message)
        finally:
            cycle.transport = transport
            joined.flush()


class _JoinedWrites:
    """A transport whose writes are gathered until ``flush`` (or ``close``): one write to the real one."""

    __slots__ = ("_transport", "_parts")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._parts.append(data)

    def flush(self) -> None:
        if self._parts:
            parts, self._parts = self._parts, []
            self._transport.write(b"".join(parts))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Server(uvicorn.Server):
    def capture_signals(self):  # the embedding process owns signal handling
        return contextlib.nullcontext()


def uvicorn_config(app, settings: FrontendSettings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        loop="uvloop",
        http=NoDelayHttpToolsProtocol,
        ws="none",
        lifespan="off",
        interface="asgi3",
        access_log=False,  # ours is one line per request with tokens and timings (access_log.py)
        log_config=None,  # uvicorn's own lines go through the process's handlers (text or JSON)
        log_level="warning",
        proxy_headers=False,
        server_header=False,
        backlog=settings.backlog,
        timeout_keep_alive=int(settings.timeouts.keep_alive_s),
        timeout_graceful_shutdown=int(settings.timeouts.shutdown_s),
        ssl_certfile=settings.tls_cert_path or None,
        ssl_keyfile=settings.tls_key_path or None,
    )


class HttpServer:
    """A running HTTP server. ``port`` is the bound port (useful with ``http_port=0``). ``reuse_port``: bind with
    SO_REUSEPORT, so that several processes listen on one port and the kernel spreads connections among them.

    >>> server = HttpServer(app, FrontendSettings(http_port=0))  # doctest: +SKIP
    >>> await server.start(); print(server.port); await server.stop()  # doctest: +SKIP
    """

    def __init__(self, app, settings: FrontendSettings, *, reuse_port: bool = False) -> None:
        self._settings = settings
        self._reuse_port = reuse_port
        self._server = _Server(uvicorn_config(app, settings))
        self._sock: socket.socket | None = None
        self._task: asyncio.Task | None = None

    @property
    def port(self) -> int:
        assert self._sock is not None, "not started"
        return self._sock.getsockname()[1]

    @property
    def url(self) -> str:
        scheme = "https" if self._settings.tls else "http"
        return f"{scheme}://{self._settings.http_host}:{self.port}"

    async def start(self) -> None:
        """Bind and start accepting; returns once the server is listening."""
        family = socket.AF_INET6 if ":" in self._settings.http_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self._reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self._settings.http_host, self._settings.http_port))
        except OSError:
            sock.close()
            raise
        sock.set_inheritable(True)
        self._sock = sock
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http-server")
        try:
            while not self._server.started:
                if self._task.done():
                    self._task.result()  # startup failed: raise its error
                    raise RuntimeError("the HTTP server exited during startup")
                await asyncio.sleep(0.01)
        except BaseException:  # cancelled or failed while starting: don't leave it listening
            with contextlib.suppress(Exception):
                await self.stop()
            raise

    async def wait(self) -> None:
        """Until the server stops."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to ``timeouts.shutdown_s``), then close."""
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await self._task
        finally:
            self._task = None
            if self._sock is not None:
                self._sock.close()


async def serve_http(app, settings: FrontendSettings) -> None:
    """Serve ``app`` on ``settings.http_host:http_port`` until cancelled (then shut down gracefully)."""
    server = HttpServer(app, settings)
    try:
        await server.start()
        await server.wait()
    finally:
        await server.stop()
