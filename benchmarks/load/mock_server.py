"""A tiny OpenAI-shaped streaming server on raw asyncio, cheap enough to measure the load client against.

It answers ``POST /v1/chat/completions`` and ``/v1/completions`` (streaming or not) with ``max_tokens`` words
" the", like an engine with ``ignore_eos``: after ``ttft`` the first chunk, then one chunk of
``tokens_per_chunk`` tokens per engine step; one timer steps every active stream together, as a batching
engine does. Usage (prompt tokens = words of the prompt) comes in a last chunk when asked for.

Fault injection by model name: ``fail-500`` answers 500 with an OpenAI error body; ``drop`` sends one chunk
and then drops the connection.

    python -m benchmarks.load.mock_server --port 8001 --step-ms 2 --tokens-per-chunk 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, cast

import orjson

TOKEN_TEXT = " the"  # one token in common BPE vocabularies (SmolLM2's among them)


@dataclass(frozen=True, slots=True)
class MockServerConfig:
    ttft_s: float = 0.0  # delay before the first token
    step_s: float = 0.002  # one engine step: every active stream gets its next chunk
    tokens_per_chunk: int = 1
    default_max_tokens: int = 16


def _sse(obj: dict[str, Any]) -> bytes:
    event = b"data: " + orjson.dumps(obj) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


_DONE_CHUNK = b"%x\r\n%s\r\n" % (len(b"data: [DONE]\n\n"), b"data: [DONE]\n\n") + b"0\r\n\r\n"


class _Stream:
    """One streaming response in progress."""

    __slots__ = ("transport", "chat", "model", "rid", "remaining", "sent", "prompt_tokens", "usage", "drop")

    def __init__(self, transport: asyncio.Transport, body: dict[str, Any], rid: int, chat: bool) -> None:
        self.transport = transport
        self.chat = chat
        self.model = body.get("model", "mock")
        self.rid = rid
        self.remaining = max(1, int(body.get("max_tokens") or body.get("max_completion_tokens") or 16))
        self.sent = 0
        self.prompt_tokens = _prompt_words(body)
        self.usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.drop = self.model == "drop"

    def _chunk(self, text: str | None, finish: str | None) -> bytes:
        if self.chat:
            delta: dict[str, Any] = (
                {"content": text} if text is not None else {"role": "assistant", "content": ""}
            )
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish}
            kind = "text_completion"
        return _sse({"id": f"cmpl-{self.rid}", "object": kind, "model": self.model, "choices": [choice]})

    def step(self, tokens: int) -> bool:
        """Send the next chunk; True when the stream is finished."""
        if self.transport.is_closing():
            return True
        n = min(tokens, self.remaining)
        self.remaining -= n
        self.sent += n
        finish = "length" if self.remaining == 0 else None
        out = self._chunk(TOKEN_TEXT * n, finish)
        if self.drop:
            self.transport.write(out)
            self.transport.abort()
            return True
        if finish:
            if self.usage:
                usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.sent}
                usage["total_tokens"] = usage["prompt_tokens"] + self.sent
                out += _sse({"id": f"cmpl-{self.rid}", "model": self.model, "choices": [], "usage": usage})
            out += _DONE_CHUNK
        self.transport.write(out)
        return finish is not None


def _prompt_words(body: dict[str, Any]) -> int:
    if "messages" in body:
        return sum(len(str(m.get("content", "")).split()) for m in body["messages"])
    return len(str(body.get("prompt", "")).split())


class MockOpenAIServer:
    """Start with ``await server.start()``; ``server.port`` then holds the bound port."""

    def __init__(self, config: MockServerConfig | None = None) -> None:
        self.config = config or MockServerConfig()
        self.port = 0
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._active: list[_Stream] = []
        self._stepper: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.connections: set[asyncio.Transport] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._stepper = asyncio.create_task(self._step_forever())

    async def close(self) -> None:
        if self._stepper is not None:
            self._stepper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stepper
        if self._server is not None:
            self._server.close()
            for transport in list(self.connections):
                transport.abort()  # wait_closed() waits for open connections since Python 3.12
            await self._server.wait_closed()

    async def _step_forever(self) -> None:
        step, n = self.config.step_s, self.config.tokens_per_chunk
        while True:
            if not self._active:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(step)
            self._active = [s for s in self._active if not s.step(n)]

    def _activate(self, stream: _Stream) -> None:
        if stream.step(self.config.tokens_per_chunk):
            return
        self._active.append(stream)
        self._wake.set()

    def handle(self, transport: asyncio.Transport, method: bytes, path: bytes, raw: bytes) -> None:
        self.requests += 1
        if method == b"GET" and path in (b"/health", b"/v1/models"):
            _respond(transport, 200, {"object": "list", "data": [{"id": "mock", "object": "model"}]})
            return
        chat = path == b"/v1/chat/completions"
        if method != b"POST" or path not in (b"/v1/chat/completions", b"/v1/completions"):
            _respond(transport, 404, {"error": {"message": "not found", "type": "not_found", "code": 404}})
            return
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            _respond(
                transport, 400, {"error": {"message": "bad json", "type": "invalid_request", "code": 400}}
            )
            return
        if body.get("model") == "fail-500":
            _respond(
                transport, 500, {"error": {"message": "injected failure", "type": "internal", "code": 500}}
            )
            return
        stream = _Stream(transport, body, self.requests, chat)
        if not body.get("stream"):
            text = TOKEN_TEXT * stream.remaining
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            usage = {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.remaining}
            _respond(transport, 200, {"id": f"cmpl-{self.requests}", "choices": [choice], "usage": usage})
            return
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        transport.write(head + stream._chunk(None, None) if chat else head)
        delay = self.config.ttft_s
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._activate, stream)
        else:
            self._activate(stream)


def _respond(transport: asyncio.Transport, status: int, obj: dict[str, Any]) -> None:
    body = orjson.dumps(obj)
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 500: b"Internal Server Error"}[status]
    transport.write(
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
        % (status, reason, len(body), body)
    )


class _Connection(asyncio.Protocol):
    """Reads requests (head + Content-Length body) one after another on a keep-alive connection."""

    def __init__(self, server: MockOpenAIServer) -> None:
        self._server = server
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass it
        self._server.connections.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._server.connections.discard(self._transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self._buf[:end].split(b"\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self._buf) < end + 4 + length:
                return
            body = self._buf[end + 4 : end + 4 + length]
            self._buf = self._buf[end + 4 + length :]
            method, path, _ = lines[0].split(b" ", 2)
            assert self._transport is not None
            self._server.handle(self._transport, method, path, body)


async def _serve(args: argparse.Namespace) -> None:
    cfg = MockServerConfig(
        ttft_s=args.ttft_ms / 1000, step_s=args.step_ms / 1000, tokens_per_chunk=args.tokens_per_chunk
    )
    server = MockOpenAIServer(cfg)
    await server.start(args.host, args.port)
    print(f"mock OpenAI server on http://{args.host}:{server.port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load.mock_server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--step-ms", type=float, default=2.0)
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args()
    factory = None
    if not args.no_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(_serve(args))


if __name__ == "__main__":
    main()
