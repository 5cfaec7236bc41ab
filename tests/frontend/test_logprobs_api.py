"""The frontend's side of logprobs and penalties (fake backend): what reaches ``SamplingOptions``, and the
engines' ``TokenLogprobs`` rendered in OpenAI's chat and legacy completion shapes, whole and streamed."""

from __future__ import annotations

import asyncio

import httpx
import openai
import orjson
import pytest
from tokenizers import Tokenizer

from dynamo_lite.protocol import GenerateChunk, TokenLogprobs

from .conftest import EOS_ID, MODEL, FakeBackend, sse_events

HI = [{"role": "user", "content": "hi"}]


def script(backend: FakeBackend, tokenizer: Tokenizer, text: str) -> list[int]:
    """``text`` one token per chunk, each with logprob -(i+1)/10 and two alternatives (itself, and id 0)."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids + [EOS_ID]
    backend.script = [
        GenerateChunk(
            token_ids=[t],
            finish_reason="stop" if t == EOS_ID else None,
            logprobs=TokenLogprobs([-(i + 1) / 10], [[t, 0]], [[-(i + 1) / 10, -9.0]]),
        )
        for i, t in enumerate(ids)
    ]
    return ids


async def test_chat_logprobs_whole_and_streamed(
    client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    ids = script(backend, tokenizer, "Hello, wörld")
    r = await client.chat.completions.create(model=MODEL, messages=HI, logprobs=True, top_logprobs=2)
    assert backend.requests[-1].sampling.logprobs == 2
    content = r.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx([-(i + 1) / 10 for i in range(len(ids))])
    assert "".join(e.token for e in content[:-1]) == r.choices[0].message.content == "Hello, wörld"
    assert b"".join(bytes(e.bytes) for e in content[:-1]) == "Hello, wörld".encode()
    assert content[-1].token == "<|im_end|>"
    assert [len(e.top_logprobs) for e in content] == [2] * len(ids)
    assert content[0].top_logprobs[1].logprob == -9.0

    streamed = []
    async for chunk in await client.chat.completions.create(
        model=MODEL, messages=HI, logprobs=True, top_logprobs=2, stream=True
    ):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]

    await client.chat.completions.create(model=MODEL, messages=HI, logprobs=True)
    assert backend.requests[-1].sampling.logprobs == 0
    plain = await client.chat.completions.create(model=MODEL, messages=HI)
    assert backend.requests[-1].sampling.logprobs is None and plain.choices[0].logprobs is None


async def test_completion_logprobs_legacy_shape(
    client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    ids = script(backend, tokenizer, "one two")
    r = await client.completions.create(model=MODEL, prompt="x", logprobs=1)
    assert backend.requests[-1].sampling.logprobs == 1
    lp = r.choices[0].logprobs
    texts = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert lp.tokens == texts
    assert lp.token_logprobs == pytest.approx([-(i + 1) / 10 for i in range(len(ids))])
    assert lp.text_offset == [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    assert lp.top_logprobs[0] == {texts[0]: -0.1, tokenizer.decode([0], skip_special_tokens=False): -9.0}

    streamed: list[str] = []
    async for chunk in await client.completions.create(model=MODEL, prompt="x", logprobs=1, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed.extend(chunk.choices[0].logprobs.tokens)
    assert streamed == texts


async def test_penalties_reach_the_engine(
    client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer
) -> None:
    backend.say(tokenizer, "ok")
    await client.chat.completions.create(
        model=MODEL,
        messages=HI,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"42": -100, "7": 3},
        extra_body={"repetition_penalty": 1.2, "min_p": 0.05},
    )
    s = backend.requests[-1].sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.min_p) == (0.5, -0.5, 1.2, 0.05)
    assert s.logit_bias == {42: -100.0, 7: 3.0}
    backend.say(tokenizer, "ok")
    await client.completions.create(model=MODEL, prompt="x")
    s = backend.requests[-1].sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.min_p, s.logit_bias) == (
        0.0, 0.0, 1.0, 0.0, {},
    )  # fmt: skip


async def test_n_choices_whole_and_streamed(
    client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer
) -> None:
    script(backend, tokenizer, "a b c")  # 4 tokens with eos, per choice
    r = await client.chat.completions.create(model=MODEL, messages=HI, n=3, seed=5, logprobs=True)
    sent = backend.requests[-3:]
    assert [q.sampling.seed for q in sent] == [5, 6, 7]
    assert len({q.request_id for q in sent}) == 3
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == "a b c" and c.finish_reason == "stop" for c in r.choices)
    assert all(len(c.logprobs.content) == 4 for c in r.choices)
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(sent[0].token_ids)

    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage = None
    async for chunk in await client.completions.create(
        model=MODEL, prompt="x", n=2, stream=True, stream_options={"include_usage": True}
    ):
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {0: "a b c", 1: "a b c"} and finishes == {0: "stop", 1: "stop"}
    assert usage is not None and usage.completion_tokens == 8
    assert [q.sampling.seed for q in backend.requests[-2:]] == [None, None]


async def test_n_choices_stop_early_on_a_stop_string(
    client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer
) -> None:
    backend.say(tokenizer, "one two three")
    r = await client.completions.create(model=MODEL, prompt="x", n=2, stop=[" two"])
    assert [c.text for c in r.choices] == ["one", "one"]
    assert [c.finish_reason for c in r.choices] == ["stop", "stop"]


async def test_include_stop_str_in_output(
    client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer
) -> None:
    backend.say(tokenizer, "one two three")
    r = await client.completions.create(
        model=MODEL, prompt="x", stop=[" two"], extra_body={"include_stop_str_in_output": True}
    )
    assert r.choices[0].text == "one two" and r.choices[0].finish_reason == "stop"
    backend.say(tokenizer, "one two three")
    r = await client.completions.create(model=MODEL, prompt="x", stop=[" two"])
    assert r.choices[0].text == "one"


async def test_echo_returns_the_prompt_and_its_scores(
    client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    prompt = tokenizer.encode("The sky is", add_special_tokens=False).ids
    ids = script(backend, tokenizer, " blue")
    backend.script[0].prompt_logprobs = TokenLogprobs(
        [-1.5, -2.5], [[1, 2], [3, 4]], [[-1.0, -2.0], [-3.0, -4.0]]
    )
    r = await client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2)
    assert backend.requests[-1].sampling.prompt_logprobs == 2
    assert r.choices[0].text == "The sky is blue"
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(prompt) + len(ids) == 3 + len(ids)
    assert lp.token_logprobs[:3] == [None, -1.5, -2.5] and lp.top_logprobs[0] is None
    assert lp.top_logprobs[1] == {tokenizer.decode([1], skip_special_tokens=False): -1.0,
                                  tokenizer.decode([2], skip_special_tokens=False): -2.0}  # fmt: skip
    assert "".join(lp.tokens[:-1]) == r.choices[0].text
    assert lp.text_offset[3] == len("The sky is")

    script(backend, tokenizer, " blue")
    streamed = ""
    async for chunk in await client.completions.create(
        model=MODEL, prompt="The sky is", echo=True, stream=True
    ):
        streamed += "".join(c.text for c in chunk.choices)
    assert streamed == "The sky is blue" and backend.requests[-1].sampling.prompt_logprobs is None


async def test_a_failing_choice_fails_the_response_and_closes_the_others(
    http: httpx.AsyncClient, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    backend.say(tokenizer, "one two three four")
    backend.fail_after = 2
    body = {"model": MODEL, "messages": HI, "n": 2}
    r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 500 and r.json()["error"]["code"] == "instance_lost"
    r = await http.post("/v1/chat/completions", json={**body, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and orjson.loads(events[-2])["error"]["code"] == "instance_lost"
    assert backend.completed == 0
    backend.fail_after, backend.forever = None, True  # never ends by itself: a stop string ends both choices
    before = backend.cancelled
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2, "stop": [" three"]})
    assert [c["text"] for c in r.json()["choices"]] == ["one two", "one two"]
    for _ in range(500):  # both forever-streams closed (cancelled), soon after the answer
        if backend.cancelled == before + 2:
            break
        await asyncio.sleep(0.01)
    assert backend.cancelled == before + 2
