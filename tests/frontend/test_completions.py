"""Chat and legacy completions end to end: the official ``openai`` client → a real uvicorn server → the app →
a fake backend streaming real SmolLM2 token ids."""

from __future__ import annotations

import asyncio

import httpx
import openai
import orjson
import pytest
from tokenizers import Tokenizer

from dynamo_lite.protocol import GenerateChunk

from .conftest import EOS_ID, MODEL, FakeBackend, sse_events
from .test_chat_template import SMOL_PROMPT

HI = [{"role": "user", "content": "Hi"}]


async def test_chat_non_stream_text_finish_and_usage(
    client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    ids = backend.say(tokenizer, "Hello there! How are you?", cached_tokens=12)
    r = await client.chat.completions.create(model=MODEL, messages=HI)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "Hello there! How are you?"
    assert r.choices[0].finish_reason == "stop"
    prompt_ids = tokenizer.encode(SMOL_PROMPT, add_special_tokens=False).ids
    assert backend.requests[0].token_ids == prompt_ids
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(ids) + 1  # the eos token counts
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 12
    # a stream that ended by itself is drained, not cancelled
    assert backend.completed == 1 and backend.cancelled == 0


async def test_chat_stream_deltas_finish_and_include_usage(
    client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    ids = backend.say(tokenizer, "One, two, three. Four!", per_chunk=2)
    stream = await client.chat.completions.create(
        model=MODEL, messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "One, two, three. Four!"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == len(ids) + 1
    assert last.usage.prompt_tokens == len(backend.requests[0].token_ids)
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert backend.completed == 1 and backend.cancelled == 0


async def test_stream_without_include_usage_has_no_usage_chunk(
    http: httpx.AsyncClient, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    backend.say(tokenizer, "ok")
    r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert all("usage" not in orjson.loads(e) for e in events[:-1])


async def test_completions_string_and_token_prompts(
    client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    backend.say(tokenizer, " jumps over")
    r = await client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=5)
    assert r.object == "text_completion"
    assert r.choices[0].text == " jumps over" and r.choices[0].finish_reason == "stop"
    assert backend.requests[-1].token_ids == tokenizer.encode("The quick brown fox").ids
    assert backend.requests[-1].sampling.max_tokens == 5
    assert r.usage.prompt_tokens == len(backend.requests[-1].token_ids)

    r = await client.completions.create(model=MODEL, prompt=[504, 2365, 6354], max_tokens=5)
    assert backend.requests[-1].token_ids == [504, 2365, 6354]
    assert r.usage.prompt_tokens == 3

    stream = await client.completions.create(model=MODEL, prompt="x", stream=True, max_tokens=5)
    parts = [c async for c in stream]
    assert "".join(c.choices[0].text for c in parts) == " jumps over"
    assert parts[-1].choices[0].finish_reason == "stop"


async def test_completions_default_max_tokens_is_16(
    client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    backend.say(tokenizer, "a")
    await client.completions.create(model=MODEL, prompt="x")
    assert backend.requests[-1].sampling.max_tokens == 16


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_string_across_chunk_boundaries(
    client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer: Tokenizer, stream: bool
) -> None:
    backend.say(tokenizer, "The answer is 42.\nUser: what else? more text here", finish=None)
    backend.forever = True  # only the stop string ends this request
    stop_ids = tokenizer.encode("\nUser:", add_special_tokens=False).ids
    assert len(stop_ids) > 1  # the stop string spans several tokens, hence several chunks
    r = await client.chat.completions.create(model=MODEL, messages=HI, stop=["\nUser:", "zzz"], stream=stream)
    if stream:
        chunks = [c async for c in r]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert text == "The answer is 42."
    assert finish == "stop"
    async with asyncio.timeout(2):
        await backend.cancel_event.wait()  # the frontend stopped the backend's work
    assert backend.cancelled == 1


async def test_stop_string_given_as_plain_string(
    client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    backend.say(tokenizer, "alpha beta gamma")
    r = await client.completions.create(model=MODEL, prompt="x", stop=" gamma", max_tokens=10)
    assert r.choices[0].text == "alpha beta" and r.choices[0].finish_reason == "stop"


async def test_max_tokens_cuts_with_length(
    client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    ids = backend.say(tokenizer, "one two three four five six seven", finish=None)
    backend.forever = True
    r = await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3
    assert r.choices[0].message.content == tokenizer.decode(ids[:3])


async def test_backend_length_finish_is_reported(
    client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    ids = tokenizer.encode("cut short", add_special_tokens=False).ids
    backend.script = [GenerateChunk(token_ids=ids, finish_reason="length")]
    stream = await client.chat.completions.create(model=MODEL, messages=HI, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "cut short"
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_multibyte_utf8_streams_without_replacement_chars(
    client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    text = "Grüße! 你好世界 🚀🎉 naïve — 𝔘𝔫𝔦"
    ids = backend.say(tokenizer, text)
    assert len(ids) > len(text.split())  # characters split over tokens
    stream = await client.chat.completions.create(model=MODEL, messages=HI, stream=True)
    deltas = [c.choices[0].delta.content or "" async for c in stream]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


async def test_chat_content_parts_are_joined(
    client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    backend.say(tokenizer, "ok")
    parts = [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]
    await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}])
    rendered = tokenizer.decode(backend.requests[-1].token_ids, skip_special_tokens=False)
    assert "<|im_start|>user\nH\ni<|im_end|>" in rendered


async def test_sampling_options_mapping_top_level_and_nvext(
    http: httpx.AsyncClient, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    backend.say(tokenizer, "ok")
    body = {
        "model": MODEL,
        "messages": HI,
        "max_completion_tokens": 40,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "nvext": {"ignore_eos": True, "min_tokens": 20, "top_k": 5},
    }
    r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    s = backend.requests[-1].sampling
    assert (s.max_tokens, s.min_tokens, s.ignore_eos, s.top_k) == (40, 20, True, 5)
    assert (s.temperature, s.top_p, s.seed) == (0.5, 0.9, 7)

    body = {
        "model": MODEL,
        "prompt": "x",
        "max_tokens": 30,
        "ignore_eos": True,
        "min_tokens": 10,
        "top_k": -1,
    }
    r = await http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    s = backend.requests[-1].sampling
    assert (s.max_tokens, s.min_tokens, s.ignore_eos, s.top_k) == (30, 10, True, 0)
    assert (s.temperature, s.top_p, s.seed) == (1.0, 1.0, None)


async def test_request_id_is_honoured_and_echoed(
    http: httpx.AsyncClient, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    backend.say(tokenizer, "ok")
    r = await http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": HI}, headers={"x-request-id": "req-123"}
    )
    assert r.headers["x-request-id"] == "req-123"
    assert backend.requests[-1].request_id == "req-123"
    assert r.json()["id"] == "chatcmpl-req-123"
    r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "stream": True})
    generated = r.headers["x-request-id"]
    assert len(generated) >= 16 and backend.requests[-1].request_id == generated


async def test_eos_only_output_is_an_empty_message(client: openai.AsyncOpenAI, backend: FakeBackend) -> None:
    backend.script = [GenerateChunk(token_ids=[EOS_ID], finish_reason="stop")]
    r = await client.chat.completions.create(model=MODEL, messages=HI)
    assert r.choices[0].message.content == "" and r.usage.completion_tokens == 1
    stream = await client.chat.completions.create(model=MODEL, messages=HI, stream=True)
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
