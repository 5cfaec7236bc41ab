"""The load generator against real local servers: a uvicorn ASGI app and the raw-asyncio mock server.

The ASGI app is an independent HTTP implementation (uvicorn's, with chunked SSE) that streams OpenAI-shaped
chunks with known timing and token counts, so the generator's counts and TTFT can be checked exactly.
"""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvicorn

from benchmarks.load import BenchmarkConfig, Timeouts, run_benchmark
from benchmarks.load.client import LoadClient
from benchmarks.load.mock_server import MockOpenAIServer, MockServerConfig
from benchmarks.load.prompts import load_tokenizer
from benchmarks.load.report import PROFILE_JSON, REQUESTS_CSV, SUMMARY_CSV, format_table
from benchmarks.load.runner import _prepare

TTFT_S = 0.08  # the app waits this long before the first text chunk (after an immediate role chunk)
GAP_S = 0.01  # between text chunks
TOKENS_PER_CHUNK = 2  # each chunk is " the the": two tokens for SmolLM2's tokenizer
PROMPT_TOKENS = 123  # what the app reports in usage, to check the client reads it


class App:
    """An OpenAI-shaped ASGI app. Models: "boom" → 500; "flaky" → every 3rd request 500; "slow" → hangs."""

    def __init__(self) -> None:
        self.requests = 0
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.requests += 1
        body = orjson.loads(raw)
        self.bodies.append(body)
        model = body["model"]
        if model == "boom" or (model == "flaky" and self.requests % 3 == 0):
            await self._json(send, 500, {"error": {"message": f"{model} failure", "code": 500}})
            return
        if model == "slow":
            await asyncio.sleep(5)
        n = body["max_tokens"]
        chat = scope["path"] == "/v1/chat/completions"
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n}
        if not body.get("stream"):
            await asyncio.sleep(TTFT_S)
            text = " the" * n
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"text": text}
            )
            await self._json(send, 200, {"choices": [choice], "usage": usage})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )

        async def event(obj: Any) -> None:
            data = b"data: " + (obj if isinstance(obj, bytes) else orjson.dumps(obj)) + b"\n\n"
            await send({"type": "http.response.body", "body": data, "more_body": True})

        if chat:
            await event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        await asyncio.sleep(TTFT_S)
        for i in range(n // TOKENS_PER_CHUNK):
            if i:
                await asyncio.sleep(GAP_S)
            text = " the" * TOKENS_PER_CHUNK
            last = i == n // TOKENS_PER_CHUNK - 1
            choice = {"index": 0, "finish_reason": "length" if last else None}
            choice.update({"delta": {"content": text}} if chat else {"text": text})
            await event({"choices": [choice]})
        await event({"choices": [], "usage": usage})
        await event(b"[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _json(send: Any, status: int, obj: Any) -> None:
        data = orjson.dumps(obj)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


@pytest.fixture
async def app_url() -> AsyncIterator[tuple[str, App]]:
    app = App()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="critical",
            lifespan="off",
            loop="asyncio",
            timeout_graceful_shutdown=1,
        )
    )
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:  # noqa: ASYNC110 (uvicorn offers no event for it)
            await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        async with asyncio.timeout(10):
            await task


def config(url: str, tokenizer_json: Path, **kw: Any) -> BenchmarkConfig:
    base: dict[str, Any] = dict(
        url=url,
        model="test",
        tokenizer=str(tokenizer_json),
        streaming=True,
        concurrency=4,
        request_count=12,
        input_tokens_mean=100,
        output_tokens_mean=10,
        extra_inputs={"ignore_eos": True},
        progress=False,
        timeouts=Timeouts(connect=5, request=10),
    )
    base.update(kw)
    return BenchmarkConfig(**base)


async def test_streaming_chat_counts_tokens_and_ttft(app_url: tuple[str, App], tokenizer_json: Path) -> None:
    url, app = app_url
    async with asyncio.timeout(60):
        result = await run_benchmark(config(url, tokenizer_json, warmup_request_count=4))
    s = result.summary
    assert app.requests == 16  # 4 warmup + 12 measured
    assert (s.requests, s.completed, s.errors) == (12, 12, 0)
    assert s.total_output_tokens == 12 * 10
    assert s.total_chunks == 12 * 5
    assert s.connections_opened <= 4  # keep-alive: one connection per concurrent stream
    for r in result.records:
        assert r.status == 200 and r.done_marker and r.finish_reason == "length"
        assert r.prompt_tokens == PROMPT_TOKENS and r.completion_tokens == 10
        assert r.chunk_tokens == [TOKENS_PER_CHUNK] * 5
        # TTFT counts from the first text, not the role chunk sent at once.
        assert TTFT_S <= r.ttft < TTFT_S + 0.5
        assert r.first_response is not None and r.first_response - r.start < r.ttft
        assert r.itl == pytest.approx((r.latency - r.ttft) / 9)
        # The server paces text chunks GAP_S apart; a loaded box may hand two to one socket read (a gap of 0,
        # the next one twice as long), so the gaps are checked as a whole.
        assert len(r.chunk_gaps) == 4 and sum(r.chunk_gaps) >= 4 * GAP_S * 0.9
    assert s.metrics["tokens_per_chunk"].mean == TOKENS_PER_CHUNK
    assert s.metrics["time_to_first_token_ms"].min >= TTFT_S * 1000
    assert s.client_cpu is not None and s.client_cpu_us_per_request and s.client_cpu_us_per_chunk
    # What was sent: prompt length, max_tokens, extra inputs and the usage request.
    body = app.bodies[-1]
    assert body["max_tokens"] == 10 and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert "Time to first token" in format_table(result)


async def test_http_errors_counted_with_body(app_url: tuple[str, App], tokenizer_json: Path) -> None:
    url, _ = app_url
    async with asyncio.timeout(60):
        result = await run_benchmark(
            config(url, tokenizer_json, model="flaky", concurrency=1, request_count=9)
        )
    s = result.summary
    assert (s.completed, s.errors) == (6, 3)
    assert s.errors_by_kind == {"http_500": 3}
    assert "flaky failure" in s.error_samples["http_500"]
    assert [r.status for r in result.records] == [200, 200, 500] * 3
    assert s.connections_opened == 1  # a 500 with a body leaves the connection reusable
    assert s.total_output_tokens == 60


async def test_all_requests_fail(app_url: tuple[str, App], tokenizer_json: Path) -> None:
    url, _ = app_url
    async with asyncio.timeout(60):
        result = await run_benchmark(config(url, tokenizer_json, model="boom", request_count=5))
    assert result.summary.errors_by_kind == {"http_500": 5}
    assert result.summary.request_throughput == 0


async def test_request_timeout(app_url: tuple[str, App], tokenizer_json: Path) -> None:
    url, _ = app_url
    cfg = config(
        url, tokenizer_json, model="slow", request_count=2, timeouts=Timeouts(connect=5, request=0.3)
    )
    async with asyncio.timeout(30):
        result = await run_benchmark(cfg)
    assert result.summary.errors_by_kind == {"timeout": 2}
    assert all(0.3 <= r.latency < 2 for r in result.records)


@pytest.mark.parametrize("endpoint_type", ["chat", "completions"])
async def test_non_streaming(app_url: tuple[str, App], tokenizer_json: Path, endpoint_type: str) -> None:
    url, _ = app_url
    cfg = config(url, tokenizer_json, streaming=False, endpoint_type=endpoint_type, request_count=4)
    async with asyncio.timeout(60):
        result = await run_benchmark(cfg)
    s = result.summary
    assert (s.completed, s.total_output_tokens) == (4, 40)
    assert "time_to_first_token_ms" not in s.metrics
    assert s.metrics["request_latency_ms"].min >= TTFT_S * 1000


async def test_completions_streaming_and_artifacts(
    app_url: tuple[str, App], tokenizer_json: Path, tmp_path: Path
) -> None:
    url, app = app_url
    cfg = config(
        url, tokenizer_json, endpoint_type="completions", artifact_dir=str(tmp_path), goodput={"ttft": 5000}
    )
    async with asyncio.timeout(60):
        result = await run_benchmark(cfg)
    assert "prompt" in app.bodies[-1]
    assert result.summary.total_output_tokens == 120
    assert result.summary.goodput == pytest.approx(result.summary.request_throughput)
    data = json.loads((tmp_path / PROFILE_JSON).read_text())
    assert len(data["records"]) == 12
    assert data["records"][0]["chunk_tokens"] == [2] * 5
    assert data["summary"]["completed"] == 12
    with (tmp_path / REQUESTS_CSV).open() as f:
        assert len(list(csv.DictReader(f))) == 12
    assert "request_throughput_per_s" in (tmp_path / SUMMARY_CSV).read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert any("matplotlib" in n for n in result.notes)
    else:
        assert (tmp_path / "latency_cdf.png").stat().st_size > 1000


@pytest.fixture
async def mock_server() -> AsyncIterator[MockOpenAIServer]:
    server = MockOpenAIServer(MockServerConfig(step_s=0.001, tokens_per_chunk=1))
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def test_connection_drop_and_recovery(mock_server: MockOpenAIServer, tokenizer_json: Path) -> None:
    url = f"http://127.0.0.1:{mock_server.port}"
    async with asyncio.timeout(30):
        dropped = await run_benchmark(
            config(url, tokenizer_json, model="drop", request_count=3, concurrency=1)
        )
        fine = await run_benchmark(config(url, tokenizer_json, model="ok", request_count=3, concurrency=1))
    assert dropped.summary.errors_by_kind == {"connection_dropped": 3}
    assert all(len(r.chunk_times) == 1 for r in dropped.records)  # the chunk before the drop was seen
    assert fine.summary.completed == 3 and fine.summary.total_output_tokens == 30


async def test_request_rate_open_loop(mock_server: MockOpenAIServer, tokenizer_json: Path) -> None:
    url = f"http://127.0.0.1:{mock_server.port}"
    cfg = config(url, tokenizer_json, request_rate=100.0, request_count=40)
    async with asyncio.timeout(30):
        result = await run_benchmark(cfg)
    s = result.summary
    assert s.completed == 40 and s.total_output_tokens == 400
    assert "client_queue_delay_ms" in s.metrics
    # 40 Poisson arrivals at 100/s take about 0.4 s.
    assert 0.15 < s.duration_s < 2.0


async def test_measurement_seconds_bounds_the_run(
    mock_server: MockOpenAIServer, tokenizer_json: Path
) -> None:
    url = f"http://127.0.0.1:{mock_server.port}"
    cfg = config(url, tokenizer_json, request_count=None, measurement_seconds=0.5, num_dataset_entries=10)
    async with asyncio.timeout(30):
        result = await run_benchmark(cfg)
    assert result.summary.completed > 4
    assert result.summary.duration_s < 1.5
    assert any("cycled" in n for n in result.notes)


async def test_stale_keep_alive_connection_is_retried(
    mock_server: MockOpenAIServer, tokenizer_json: Path
) -> None:
    cfg = config(f"http://127.0.0.1:{mock_server.port}", tokenizer_json)
    requests = _prepare(cfg, load_tokenizer(tokenizer_json), 2, 0)
    client = LoadClient(cfg)
    try:
        async with asyncio.timeout(30):
            first = await client.send(requests[0], 0)
            assert first.ok and client.pool.opened == 1
            # The server drops the idle connection; the client hears of it only after it has written again.
            for transport in list(mock_server.connections):
                transport.abort()
            second = await client.send(requests[1], 1)
    finally:
        client.close()
    assert second.ok, second.error
    assert second.completion_tokens == 10
    assert client.pool.opened == 2
