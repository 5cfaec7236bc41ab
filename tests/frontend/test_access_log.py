"""One access line per request on ``dynamo_lite.access``, answered or refused."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from tokenizers import Tokenizer

from tests.frontend.conftest import MODEL, FakeBackend

HI = [{"role": "user", "content": "hi"}]


async def access_records(caplog: pytest.LogCaptureFixture, count: int) -> list[logging.LogRecord]:
    """The access lines, once ``count`` are there: a request's line follows its response's last byte."""
    async with asyncio.timeout(5):
        while True:
            records = [r for r in caplog.records if r.name == "dynamo_lite.access"]
            if len(records) >= count:
                return records
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True])
async def test_one_line_per_answered_request(
    http: httpx.AsyncClient,
    backend: FakeBackend,
    tokenizer: Tokenizer,
    caplog: pytest.LogCaptureFixture,
    stream: bool,
) -> None:
    ids = backend.say(tokenizer, "one two three")
    caplog.set_level(logging.INFO, logger="dynamo_lite.access")
    r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "stream": stream})
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    [record] = await access_records(caplog, 1)
    assert record.levelno == logging.INFO
    assert (record.request_id, record.endpoint, record.model, record.status) == (rid, "chat", MODEL, 200)
    assert record.prompt_tokens == len(backend.requests[-1].token_ids)
    assert record.completion_tokens == len(ids) + 1  # the eos too
    assert record.finish_reason == "stop"
    assert 0 <= record.ttft_ms <= record.duration_ms
    line = record.getMessage()
    assert f"request_id={rid}" in line and "status=200" in line and "finish_reason=stop" in line


async def test_refused_requests_are_logged_with_their_status(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dynamo_lite.access")
    bad = await http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": HI, "zzz": 1},
        headers={"x-request-id": "r-9"},
    )
    missing = await http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert (bad.status_code, missing.status_code) == (400, 404)
    first, second = await access_records(caplog, 2)
    assert (first.request_id, first.status, first.endpoint) == ("r-9", 400, "chat")
    assert (second.status, second.endpoint) == (404, "completions")
    assert "ttft_ms" not in first.getMessage()
