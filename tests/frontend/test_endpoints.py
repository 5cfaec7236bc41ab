"""Client disconnects cancel the work downstream; model listing, health, readiness, metrics; the socket."""

from __future__ import annotations

import asyncio
import socket

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from dynamo_lite.frontend import FrontendSettings, HttpServer, create_app, serve_http
from dynamo_lite.protocol import GenerateChunk
from dynamo_lite.runtime.config import Timeouts

from .conftest import MODEL, FakeBackend

HI = [{"role": "user", "content": "Hi"}]
CHAT = "/v1/chat/completions"


async def test_client_disconnect_mid_stream_cancels_the_backend(
    server: HttpServer, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    backend.say(tokenizer, "a b c", finish=None)
    backend.forever = True
    backend.chunk_delay_s = 0.01
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
        async with http.stream("POST", CHAT, json={"model": MODEL, "messages": HI, "stream": True}) as r:
            events = 0
            async for line in r.aiter_lines():
                events += line.startswith("data: ")
                if events == 3:
                    break
    # leaving the block closes the connection
    async with asyncio.timeout(2):
        await backend.cancel_event.wait()
    assert backend.cancelled == 1 and backend.completed == 0
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
        metrics = (await http.get("/metrics")).text
    assert "dynamo_frontend_disconnected_clients 1.0" in metrics
    assert f'dynamo_frontend_inflight_requests{{model="{MODEL}"}} 0.0' in metrics


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_before_first_token_cancels_the_backend(
    server: HttpServer, backend: FakeBackend, tokenizer: Tokenizer, stream: bool
) -> None:
    backend.say(tokenizer, "late")
    backend.first_delay_s = 30  # a long prefill
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
        request = asyncio.create_task(
            http.post(CHAT, json={"model": MODEL, "messages": HI, "stream": stream})
        )
        async with asyncio.timeout(5):
            await backend.request_event.wait()
        request.cancel()  # the client gives up: its connection closes
        with pytest.raises(asyncio.CancelledError):
            await request
    async with asyncio.timeout(2):
        await backend.cancel_event.wait()
    assert backend.cancelled == 1


async def test_models_list_and_retrieve(client: openai.AsyncOpenAI, http: httpx.AsyncClient, card) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model" and models.data[0].owned_by == "dynamo_lite"
    m = await client.models.retrieve(MODEL)
    assert m.id == MODEL
    r = await http.get("/v1/models/missing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_health_live_ready(http: httpx.AsyncClient, backend: FakeBackend) -> None:
    r = await http.get("/health")
    assert (
        r.status_code == 200
        and r.json()["status"] == "healthy"
        and r.json()["instances"]["agg"] == ["fake-1"]
    )
    assert (await http.get("/live")).status_code == 200
    r = await http.get("/ready")
    assert r.status_code == 200 and r.json()["models"] == [MODEL]
    backend.healthy = False
    assert (await http.get("/health")).status_code == 503
    backend.cards = []
    assert (await http.get("/ready")).status_code == 503
    assert (await http.get("/live")).status_code == 200
    assert (await http.get("/v1/models")).json()["data"] == []


async def test_metrics_count_requests_tokens_and_errors(
    client: openai.AsyncOpenAI, http: httpx.AsyncClient, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    ids = backend.say(tokenizer, "Hello there", per_chunk=1)
    r1 = await client.chat.completions.create(model=MODEL, messages=HI)
    stream = await client.chat.completions.create(model=MODEL, messages=HI, stream=True)
    [c async for c in stream]
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=HI)
    text = (await http.get("/metrics")).text
    p = "dynamo_frontend_"  # Dynamo's names and labels
    ok = 'endpoint="chat_completions",error_type="",model="{}",request_type="{}",status="success"'
    assert f"{p}requests_total{{{ok.format(MODEL, 'unary')}}} 1.0" in text
    assert f"{p}requests_total{{{ok.format(MODEL, 'stream')}}} 1.0" in text
    failed = 'endpoint="chat_completions",error_type="not_found",model="",request_type="unary",status="error"'
    assert f"{p}requests_total{{{failed}}} 1.0" in text
    assert 'dynamo_lite_frontend_errors_total{type="not_found_error"} 1.0' in text
    assert f'{p}output_tokens_total{{model="{MODEL}"}} {2.0 * (len(ids) + 1)}' in text
    assert f'{p}output_sequence_tokens_sum{{model="{MODEL}"}} {2.0 * (len(ids) + 1)}' in text
    assert f'{p}input_sequence_tokens_sum{{model="{MODEL}"}} {2.0 * r1.usage.prompt_tokens}' in text
    assert f'{p}time_to_first_token_seconds_count{{model="{MODEL}"}} 2.0' in text
    assert f'{p}inter_token_latency_seconds_count{{model="{MODEL}"}} {2.0 * len(ids)}' in text
    assert f'{p}request_duration_seconds_count{{model="{MODEL}"}} 2.0' in text


async def test_queued_requests_gauge_reads_the_backends_queue(backend: FakeBackend, card) -> None:
    """``dynamo_frontend_queued_requests{model}``, Dynamo's name, from a backend that queues requests."""
    queued = {MODEL: 3}
    backend.queued_requests = lambda: dict(queued)  # type: ignore[attr-defined]
    app = create_app(backend)
    text = app.state.metrics.render().decode()
    assert f'dynamo_frontend_queued_requests{{model="{MODEL}"}} 3.0' in text
    queued[MODEL] = 0
    assert f'dynamo_frontend_queued_requests{{model="{MODEL}"}} 0.0' in app.state.metrics.render().decode()


async def test_apps_have_their_own_metrics_registry(backend: FakeBackend) -> None:
    a, b = create_app(backend), create_app(backend)
    assert a.state.metrics.registry is not b.state.metrics.registry


async def test_accepted_sockets_have_tcp_nodelay(server: HttpServer, http: httpx.AsyncClient) -> None:
    assert (await http.get("/live")).status_code == 200
    conns = server._server.server_state.connections
    assert conns
    for proto in conns:
        sock = proto.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_serve_http_stops_on_cancel(backend: FakeBackend) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = FrontendSettings(http_port=port, timeouts=Timeouts(shutdown_s=1))
    task = asyncio.create_task(serve_http(create_app(backend, settings), settings))
    async with httpx.AsyncClient(timeout=5) as http:
        for _ in range(200):
            try:
                r = await http.get(f"http://127.0.0.1:{port}/live")
                break
            except httpx.ConnectError:
                await asyncio.sleep(0.02)
        assert r.status_code == 200
        task.cancel()
        async with asyncio.timeout(5):
            with pytest.raises(asyncio.CancelledError):
                await task
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/live")


async def test_first_event_is_written_before_the_backend_is_asked_for_more(
    server: HttpServer, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    """The first token's event goes out at once, not when the backend next waits: in prefill_first the backend
    sends the decode request after the first token without waiting, which the first token must not wait for.
    Here the backend, once resumed after its first chunk, blocks the event loop until a client thread has
    read that chunk's event: that can only happen if it was written before."""
    import http.client
    import json
    import threading
    from urllib.parse import urlsplit

    first_read = threading.Event()
    seen_before_resume: list[bool] = []
    ids = tokenizer.encode("Hello there", add_special_tokens=False).ids
    original = backend.generate

    async def generate(model, request):  # noqa: ANN001, ANN202
        chunks = original(model, request)
        yield await anext(chunks)
        seen_before_resume.append(first_read.wait(timeout=5.0))  # blocks the loop: no write can happen now
        async for chunk in chunks:
            yield chunk

    backend.script = [GenerateChunk(token_ids=ids[:1]), GenerateChunk(token_ids=[2], finish_reason="stop")]
    backend.generate = generate  # type: ignore[method-assign]
    url = urlsplit(server.url)

    def client() -> list[bytes]:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        body = json.dumps({"model": MODEL, "messages": HI, "stream": True})
        conn.request("POST", CHAT, body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        events = []
        while line := r.readline():
            if line.startswith(b"data: "):
                events.append(line)
                if b'"content"' in line:
                    first_read.set()
                if b"[DONE]" in line:
                    break
        conn.close()
        return events

    events = await asyncio.to_thread(client)
    assert seen_before_resume == [True]
    assert events[-1].strip() == b"data: [DONE]"


class _RecordedWrites:
    """A connection's transport that records each write (as one segment with TCP_NODELAY)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.transport.write(data)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.transport, name)


@pytest.mark.parametrize("stream", [True, False])
async def test_headers_leave_with_the_first_event_in_one_write(
    server: HttpServer, backend: FakeBackend, tokenizer: Tokenizer, stream: bool
) -> None:
    """Status line, headers and the first event (or the whole body) leave in one socket write: one segment, one
    wake-up of the client (TTFT), not two."""
    import json
    from urllib.parse import urlsplit

    backend.say(tokenizer, "Hello there")
    url = urlsplit(server.url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        conns = server._server.server_state.connections
        async with asyncio.timeout(5):
            while not conns:  # noqa: ASYNC110 — the server's accept is not ours to signal
                await asyncio.sleep(0.01)
        (proto,) = conns
        recorded = proto.transport = _RecordedWrites(proto.transport)
        body = json.dumps({"model": MODEL, "messages": HI, "stream": stream}).encode()
        head = f"POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
        writer.write(head.encode() + b"\r\n\r\n" + body)
        async with asyncio.timeout(5):
            await reader.readexactly(1)  # the first write arrived
        first = recorded.writes[0]
        assert first.startswith(b"HTTP/1.1 200")
        assert (b"data: {" if stream else b'"choices"') in first
    finally:
        writer.close()
