"""Every failure answers in OpenAI's shape with the right status; a stream that fails ends with an error event
and ``[DONE]``, never a hang."""

from __future__ import annotations

import asyncio

import httpx
import openai
import orjson
import pytest
from tokenizers import Tokenizer

from dynamo_lite.frontend import HttpServer
from dynamo_lite.protocol import ErrorInfo, GenerateChunk, Overloaded, StreamError
from dynamo_lite.runtime.config import Timeouts

from .conftest import MODEL, FakeBackend, sse_events

HI = [{"role": "user", "content": "Hi"}]
CHAT = "/v1/chat/completions"


def assert_error(
    r: httpx.Response, status: int, *, code: str | None = None, param: str | None = None
) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


async def test_malformed_json_is_400(http: httpx.AsyncClient) -> None:
    r = await http.post(
        CHAT, content=b'{"model": "smollm2", "messages": [', headers={"content-type": "application/json"}
    )
    err = assert_error(r, 400)
    assert "JSON" in err["message"] and err["type"] == "invalid_request_error"
    assert_error(await http.post(CHAT, content=b"[1, 2]"), 400)
    assert_error(await http.post(CHAT, content=b""), 400)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "messages": HI, "max_tokens": "5"}, "max_tokens"),  # strict types: no coercion
        ({"model": MODEL, "messages": HI, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": HI, "max_completion_tokens": -1}, "max_completion_tokens"),
        ({"model": MODEL, "messages": HI, "n": 0}, "n"),
        ({"model": MODEL, "messages": HI, "n": 17}, "n"),
        ({"model": MODEL, "messages": HI, "top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
        ({"model": MODEL, "messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"model": MODEL, "messages": HI, "presence_penalty": 2.5}, "presence_penalty"),
        ({"model": MODEL, "messages": HI, "frequency_penalty": -3}, "frequency_penalty"),
        ({"model": MODEL, "messages": HI, "repetition_penalty": 0}, "repetition_penalty"),
        ({"model": MODEL, "messages": HI, "min_p": 1.5}, "min_p"),
        ({"model": MODEL, "messages": HI, "logit_bias": {"x": 1}}, "logit_bias"),
        ({"model": MODEL, "messages": HI, "logit_bias": {"5": 101}}, "logit_bias"),
        ({"model": MODEL, "messages": HI, "logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"model": MODEL, "messages": HI, "temperature": 3.0}, "temperature"),
        ({"model": MODEL, "messages": HI, "stream": "yes"}, "stream"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL}, "messages"),
        ({"messages": HI}, "model"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"model": MODEL, "messages": HI, "nvext": {"min_tokens": "3"}}, "nvext.min_tokens"),
        ({"model": MODEL, "messages": HI, "response_format": {"type": "xml"}}, "response_format"),
        ({"model": MODEL, "messages": HI, "stop": ["x"] * 17}, "stop"),
        ({"model": MODEL, "messages": HI, "min_tokens": 50, "max_tokens": 10}, "min_tokens"),
    ],
)
async def test_invalid_chat_requests_are_400(
    http: httpx.AsyncClient, backend: FakeBackend, body, param
) -> None:
    assert_error(await http.post(CHAT, json=body), 400, param=param)
    assert backend.requests == []


async def test_invalid_completion_requests_are_400(http: httpx.AsyncClient, backend: FakeBackend) -> None:
    url = "/v1/completions"
    assert_error(await http.post(url, json={"model": MODEL, "prompt": "x", "n": 99}), 400, param="n")
    assert_error(await http.post(url, json={"model": MODEL, "prompt": ["a", "b"]}), 400, param="prompt")
    assert_error(await http.post(url, json={"model": MODEL, "prompt": [1, 10**9]}), 400, param="prompt")
    assert_error(await http.post(url, json={"model": MODEL, "prompt": ""}), 400, param="prompt")
    assert_error(
        await http.post(url, json={"model": MODEL, "prompt": "x", "logprobs": 21}), 400, param="logprobs"
    )
    assert_error(await http.post(url, json={"model": MODEL, "prompt": 5}), 400, param="prompt")
    assert backend.requests == []


async def test_context_length_exceeded_is_400(http: httpx.AsyncClient, card) -> None:
    body = {"model": MODEL, "prompt": [100] * 10, "max_tokens": card.context_length}
    assert_error(await http.post("/v1/completions", json=body), 400, code="context_length_exceeded")


async def test_unknown_model_is_404(http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> None:
    err = assert_error(
        await http.post(CHAT, json={"model": "nope", "messages": HI}),
        404,
        code="model_not_found",
        param="model",
    )
    assert err["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=HI)


async def test_unknown_route_and_wrong_method_are_openai_shaped(http: httpx.AsyncClient) -> None:
    assert_error(await http.get("/v1/nothing"), 404)
    assert_error(await http.get(CHAT), 405)


async def test_huge_declared_body_is_413_without_reading_it(
    server: HttpServer, http: httpx.AsyncClient
) -> None:
    # Declare 50 MB, send 1 KB, and wait: the answer must come before (and without) the rest of the body.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 52428800\r\n\r\n" + b" " * 1024
    )
    await writer.drain()
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    writer.close()
    assert (await http.get("/live")).status_code == 200


async def test_50mb_body_is_413_and_the_server_keeps_serving(
    http: httpx.AsyncClient, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    big = b'{"model": "smollm2", "messages": [{"role": "user", "content": "' + b"a" * (50 << 20) + b'"}]}'
    err = assert_error(await http.post(CHAT, content=big), 413)
    assert err["code"] == "request_too_large"

    async def chunked():  # no content-length: counted while it streams in
        for _ in range(50):
            yield b"a" * (1 << 20)

    assert_error(await http.post(CHAT, content=chunked()), 413)
    backend.say(tokenizer, "still here")
    r = await http.post(CHAT, json={"model": MODEL, "messages": HI})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "still here"


@pytest.mark.parametrize("stream", [False, True])
async def test_backend_503_is_503(http: httpx.AsyncClient, backend: FakeBackend, stream: bool) -> None:
    backend.fail_before = StreamError(ErrorInfo(503, "no decode workers", "no_workers"))
    r = await http.post(CHAT, json={"model": MODEL, "messages": HI, "stream": stream})
    err = assert_error(r, 503, code="no_workers")
    assert err["type"] == "service_unavailable" and "no decode workers" in err["message"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("status", "code"), [(429, "queue_full"), (503, "queue_timeout")])
async def test_backend_overloaded_is_an_http_status_with_retry_after_before_any_byte(
    http: httpx.AsyncClient, backend: FakeBackend, stream: bool, status: int, code: str
) -> None:
    """The router's queue is full (429) or the request waited too long for room (503): the client gets that
    as the response's status with Retry-After, never a 200 stream that then fails."""
    backend.fail_before = Overloaded(ErrorInfo(status, "all workers busy", code), retry_after_s=3)
    r = await http.post(CHAT, json={"model": MODEL, "messages": HI, "stream": stream})
    assert_error(r, status, code=code)
    assert r.headers["retry-after"] == "3"
    assert r.headers["x-request-id"]


async def test_known_but_unservable_model_gets_the_backends_503(
    http: httpx.AsyncClient, backend: FakeBackend, card
) -> None:
    backend.cards = []  # e.g. prefill workers are up, no decode worker yet
    assert_error(await http.post(CHAT, json={"model": MODEL, "messages": HI}), 404, code="model_not_found")
    backend.model_card = lambda model: card if model == MODEL else None
    backend.fail_before = StreamError(ErrorInfo(503, "no live decode worker", "no_workers"))
    assert_error(await http.post(CHAT, json={"model": MODEL, "messages": HI}), 503, code="no_workers")


async def test_unexpected_backend_exception_is_500(http: httpx.AsyncClient, backend: FakeBackend) -> None:
    backend.fail_before = RuntimeError("boom")
    assert_error(await http.post(CHAT, json={"model": MODEL, "messages": HI}), 500)


async def test_mid_stream_failure_ends_with_error_event_and_done(
    http: httpx.AsyncClient, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    backend.say(tokenizer, "one two three four")
    backend.fail_after = 2
    async with asyncio.timeout(5):
        r = await http.post(CHAT, json={"model": MODEL, "messages": HI, "stream": True})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    err = orjson.loads(events[-2])["error"]
    assert err["code"] == "instance_lost" and err["type"] == "internal_server_error"
    texts = [orjson.loads(e)["choices"][0]["delta"]["content"] for e in events[:-2]]
    assert "".join(texts) == "one two"


async def test_worker_error_finish_reason_is_an_error_event(
    http: httpx.AsyncClient, backend: FakeBackend
) -> None:
    backend.script = [GenerateChunk(token_ids=[28]), GenerateChunk(token_ids=[], finish_reason="error")]
    r = await http.post(CHAT, json={"model": MODEL, "messages": HI, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and "error" in orjson.loads(events[-2])


async def test_first_token_timeout_is_504(card, tokenizer: Tokenizer) -> None:
    from dynamo_lite.frontend import FrontendSettings, create_app

    from .conftest import FakeBackend as Fake

    backend = Fake([card])
    backend.say(tokenizer, "late")
    backend.first_delay_s = 5
    settings = FrontendSettings(http_port=0, timeouts=Timeouts(first_token_s=0.3, shutdown_s=1))
    server = HttpServer(create_app(backend, settings), settings)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            for stream in (False, True):
                r = await http.post(CHAT, json={"model": MODEL, "messages": HI, "stream": stream})
                assert_error(r, 504, code="timeout")
        assert backend.cancelled == 2  # the timed-out work was cancelled downstream
    finally:
        await server.stop()


async def test_error_responses_carry_the_request_id(http: httpx.AsyncClient) -> None:
    r = await http.post(CHAT, json={"model": "nope", "messages": HI}, headers={"x-request-id": "abc"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "abc"


async def test_when_every_queue_is_full_the_429_comes_before_the_body_is_read(
    http: httpx.AsyncClient, backend: FakeBackend
) -> None:
    """The backend says any request would be refused (every model's queue is full): the frontend answers 429
    with Retry-After without reading the body — a body that is not even JSON gets the 429, not a 400."""
    refusal = Overloaded(ErrorInfo(429, "every model's queue is full (--queue-depth 4)", "queue_full"), 2)
    backend.refusal = lambda: refusal  # type: ignore[attr-defined]
    r = await http.post(CHAT, content=b"{not json", headers={"content-type": "application/json"})
    err = assert_error(r, 429, code="queue_full")
    assert "--queue-depth 4" in err["message"] and r.headers["retry-after"] == "2"
    assert not backend.requests
    backend.refusal = lambda: None  # type: ignore[attr-defined]
    assert_error(await http.post(CHAT, content=b"{not json"), 400)
