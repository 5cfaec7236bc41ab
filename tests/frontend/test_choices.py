"""``n > 1`` answers every field as ``n = 1`` does: continuous usage, ``nvext.extra_fields`` and inter-token
latency, streamed and whole (one writer for every n)."""

from __future__ import annotations

import httpx
import orjson
import pytest
from tokenizers import Tokenizer

from .conftest import MODEL, FakeBackend, sse_events

HI = [{"role": "user", "content": "hi"}]
N = 3
EXTRA = {"nvext": {"extra_fields": ["timing", "worker_id"]}}


def itl_count(metrics: str) -> float:
    line = f'dynamo_frontend_inter_token_latency_seconds_count{{model="{MODEL}"}} '
    found = [row for row in metrics.splitlines() if row.startswith(line)]
    return float(found[0][len(line) :]) if found else 0.0


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_n_choices_streamed_with_continuous_usage_and_extra_fields(
    http: httpx.AsyncClient, backend: FakeBackend, tokenizer: Tokenizer, path: str
) -> None:
    ids = backend.say(tokenizer, "one two three")
    prompt = {"messages": HI} if path.endswith("chat/completions") else {"prompt": "x", "max_tokens": 20}
    body = {
        "model": MODEL,
        "n": N,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        **prompt,
        **EXTRA,
    }
    before = itl_count((await http.get("/metrics")).text)
    r = await http.post(path, json=body)
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    with_choices = [c for c in chunks if c["choices"]]
    # every choice's events, each with the usage of all choices so far
    assert {c["choices"][0]["index"] for c in with_choices} == set(range(N))
    assert all("usage" in c for c in with_choices)
    completion = [c["usage"]["completion_tokens"] for c in with_choices]
    assert completion == sorted(completion) and completion[-1] == N * (len(ids) + 1)
    # then the nvext chunk, then include_usage's last chunk
    nvext, last = chunks[-2], chunks[-1]
    assert nvext["choices"] == [] and set(nvext["nvext"]) == {"timing", "worker_id"}
    assert nvext["nvext"]["timing"]["ttft_ms"] > 0
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == N * (len(ids) + 1)
    # each choice's chunks after its first are inter-token latencies
    assert itl_count((await http.get("/metrics")).text) - before == N * len(ids)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_n_choices_whole_with_extra_fields(
    http: httpx.AsyncClient, backend: FakeBackend, tokenizer: Tokenizer, path: str
) -> None:
    ids = backend.say(tokenizer, "one two three")
    prompt = {"messages": HI} if path.endswith("chat/completions") else {"prompt": "x", "max_tokens": 20}
    before = itl_count((await http.get("/metrics")).text)
    # continuous_usage_stats only concerns streams: a whole response has its usage once, as for n = 1
    options = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    r = await http.post(path, json={"model": MODEL, "n": N, **prompt, **EXTRA, **options})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert [c["index"] for c in answer["choices"]] == list(range(N))
    text = [c["message"]["content"] if "message" in c else c["text"] for c in answer["choices"]]
    assert text == ["one two three"] * N
    assert answer["usage"]["completion_tokens"] == N * (len(ids) + 1)
    assert set(answer["nvext"]) == {"timing", "worker_id"} and answer["nvext"]["timing"]["ttft_ms"] > 0
    assert list(answer)[-1] == "nvext"  # after usage, as for n = 1
    assert itl_count((await http.get("/metrics")).text) - before == N * len(ids)


async def test_one_choice_answers_the_same_fields(
    http: httpx.AsyncClient, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    """The same requests with n = 1: the same fields, in the same places."""
    ids = backend.say(tokenizer, "one two three")
    body = {"model": MODEL, "messages": HI, **EXTRA}
    whole = (await http.post("/v1/chat/completions", json=body)).json()
    assert len(whole["choices"]) == 1 and set(whole["nvext"]) == {"timing", "worker_id"}
    stream = {
        **body,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    chunks = [
        orjson.loads(e) for e in sse_events((await http.post("/v1/chat/completions", json=stream)).text)[:-1]
    ]
    assert all("usage" in c for c in chunks if c["choices"])
    assert chunks[-2]["nvext"]["worker_id"] == {"prefill_worker_id": None, "decode_worker_id": None}
    assert chunks[-1]["usage"]["completion_tokens"] == len(ids) + 1
