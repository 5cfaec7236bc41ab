"""The field policy (fields.py): every field a client sends is honoured, refused with a 400 naming it, or
unknown (400, or a warning line with ``allow_unknown_fields``) — through HTTP with the official client."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from dynamo_lite.frontend import FrontendSettings
from dynamo_lite.frontend.fields import CHAT, COMPLETIONS, NVEXT, RESPONSES, STREAM_OPTIONS, Kind
from dynamo_lite.frontend.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    NvExt,
    ResponsesRequest,
    StreamOptions,
)
from tests.frontend.conftest import MODEL, FakeBackend, serving, sse_events

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("model", "table"),
    [
        (ChatCompletionRequest, CHAT),
        (CompletionRequest, COMPLETIONS),
        (ResponsesRequest, RESPONSES),
        (StreamOptions, STREAM_OPTIONS),
        (NvExt, NVEXT),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_every_declared_field_has_a_policy(model: type, table: dict) -> None:
    assert set(model.model_fields) <= set(table), set(model.model_fields) - set(table)


def test_refused_fields_say_why() -> None:
    for table in (CHAT, COMPLETIONS, RESPONSES):
        for name, rule in table.items():
            assert rule.kind is not Kind.REFUSED or rule.reason, name


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"some_unknown_field": {"x": 1}}, "some_unknown_field"),
        ({"nvext": {"not_a_thing": 1}}, "nvext.not_a_thing"),
        ({"stream_options": {"include_usage": True, "not_a_thing": 1}}, "stream_options.not_a_thing"),
        # honoured fields with values out of their range
        ({"logit_bias": {"28": 500}}, "logit_bias"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"echo": True}, "echo"),  # completions' echo, not chat's
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"store": True}, "store"),
    ],
)
async def test_chat_field_refused_or_unknown_is_400_naming_it(
    client: openai.AsyncOpenAI, backend: FakeBackend, extra: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model=MODEL, messages=HI, extra_body=extra)
    assert err.value.body["param"] == param
    assert not backend.requests


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"echo": True, "n": 2}, "echo"),
        ({"logprobs": 21}, "logprobs"),
        ({"best_of": 2}, "best_of"),
        ({"zzz": 1}, "zzz"),
    ],
)
async def test_completions_field_refused_or_unknown_is_400_naming_it(
    client: openai.AsyncOpenAI, backend: FakeBackend, extra: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model=MODEL, prompt="x", extra_body=extra)
    assert err.value.body["param"] == param
    assert not backend.requests


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"background": True}, "background"),
        ({"truncation": "auto"}, "truncation"),
        ({"n": 2}, "n"),
        ({"zzz": 1}, "zzz"),
    ],
)
async def test_responses_field_refused_or_unknown_is_400_naming_it(
    client: openai.AsyncOpenAI, backend: FakeBackend, extra: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await client.responses.create(model=MODEL, input="x", extra_body=extra)
    assert err.value.body["param"] == param
    assert not backend.requests


async def test_no_op_values_of_refused_fields_are_accepted(
    client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    backend.say(tokenizer, "ok")
    r = await client.chat.completions.create(
        model=MODEL,
        messages=HI,
        presence_penalty=0,
        frequency_penalty=0.0,
        n=1,
        logprobs=False,
        logit_bias={},
        tool_choice="auto",
        parallel_tool_calls=True,
        user="u1",
        extra_body={"min_p": 0, "repetition_penalty": 1.0, "skip_special_tokens": True},
    )
    assert r.choices[0].message.content == "ok"


async def test_what_aiperf_and_genai_perf_send_is_accepted(
    http: httpx.AsyncClient, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    """aiperf's chat payload (max_completion_tokens, a message ``name``) with the extra inputs our benchmark
    scripts pass, and genai-perf's (max_tokens, stream_options, nvext)."""
    backend.say(tokenizer, "ok")
    aiperf = {
        "messages": [{"role": "user", "name": "text", "content": "hi"}],
        "model": MODEL,
        "stream": True,
        "max_completion_tokens": 8,
        "max_tokens": 8,
        "min_tokens": 8,
        "ignore_eos": True,
    }
    genai_perf = {
        "model": MODEL,
        "messages": HI,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 8,
        "top_k": 5,
        "nvext": {"ignore_eos": True, "min_tokens": 8},
    }
    for body in (aiperf, genai_perf):
        r = await http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
    assert backend.requests[-2].sampling.min_tokens == backend.requests[-1].sampling.min_tokens == 8


async def test_continuous_usage_stats_puts_usage_in_every_chunk(
    http: httpx.AsyncClient, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    backend.say(tokenizer, "one two three")
    for path, body in (
        ("/v1/chat/completions", {"messages": HI}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 20}),
    ):
        r = await http.post(
            path,
            json={
                "model": MODEL,
                "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                **body,
            },
        )
        assert r.status_code == 200, r.text
        chunks = [json.loads(e) for e in sse_events(r.text) if e != "[DONE]"]
        with_choices = [c for c in chunks if c["choices"]]
        assert with_choices and all("usage" in c for c in with_choices)
        completion = [c["usage"]["completion_tokens"] for c in with_choices]
        assert completion == sorted(completion) and completion[-1] == chunks[-1]["usage"]["completion_tokens"]
        assert chunks[-1]["choices"] == []  # include_usage's last chunk is still there


@pytest.fixture
async def lenient(backend: FakeBackend) -> AsyncIterator[openai.AsyncOpenAI]:
    settings = FrontendSettings(http_port=0, allow_unknown_fields=True)
    async with serving(backend, settings) as srv:
        oai = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=10)
        try:
            yield oai
        finally:
            await oai.close()


async def test_allow_unknown_fields_accepts_them_with_one_warning_line(
    lenient: openai.AsyncOpenAI,
    backend: FakeBackend,
    tokenizer: Tokenizer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend.say(tokenizer, "ok")
    with caplog.at_level(logging.WARNING, logger="dynamo_lite.frontend.app"):
        r = await lenient.chat.completions.create(
            model=MODEL, messages=HI, extra_body={"my_field": 1, "nvext": {"my_nv_field": 2}}
        )
    assert r.choices[0].message.content == "ok"
    [line] = [rec.getMessage() for rec in caplog.records if "unknown fields" in rec.getMessage()]
    assert "my_field" in line and "nvext.my_nv_field" in line
    # Refused fields stay refused: allowing unknown fields allows nothing else.
    with pytest.raises(openai.BadRequestError) as err:
        await lenient.chat.completions.create(model=MODEL, messages=HI, extra_body={"store": True})
    assert err.value.body["param"] == "store"
