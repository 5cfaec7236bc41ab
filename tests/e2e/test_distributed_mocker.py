"""Issue 2 acceptance, as a user runs it: etcd, nats-server, frontend, prefill and decode worker processes."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid

import aetcd
import httpx
import openai
import pytest

from tests.conftest import Proc, Services, start_frontend, start_worker, wait_until

MODEL = "smol-mock"
WORKER_ARGS = ("--served-model-name", MODEL, "--speedup-ratio", "0", "--lease-ttl", "2")


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return r.read().decode()


def worker_requests(port: int, phase: str) -> float:
    total = 0.0
    for line in metrics_text(port).splitlines():
        if (
            line.startswith("dynamo_lite_worker_requests_total{")
            and f'phase="{phase}"' in line
            and 'status="ok"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def etcd_keys(services: Services, prefix: str) -> list[str]:
    async def get() -> list[str]:
        async with aetcd.Client(host="127.0.0.1", port=services.etcd.port) as c:
            return [kv.key.decode() for kv in await c.get_prefix(prefix.encode())]

    return asyncio.run(get())


@pytest.fixture
def stack(services: Services):
    ns = f"t{uuid.uuid4().hex[:8]}"
    procs: list[Proc] = []  # each one owned as soon as it runs
    try:
        procs.append(prefill := start_worker(services, ns, "prefill", *WORKER_ARGS))
        procs.append(decode := start_worker(services, ns, "decode", *WORKER_ARGS))
        procs.append(frontend := start_frontend(services, ns))
        yield ns, prefill, decode, frontend, procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.popen.wait(10)


def wait_ready(frontend_port: int, timeout: float = 10) -> None:
    def ready() -> bool:
        r = httpx.get(f"http://127.0.0.1:{frontend_port}/v1/models", timeout=2)
        return any(m["id"] == MODEL for m in r.json()["data"])

    wait_until(ready, timeout, what="model listed")


def test_streaming_chat_through_separate_processes(services: Services, stack) -> None:
    ns, prefill, decode, frontend, _ = stack
    wait_ready(frontend.port)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{frontend.port}/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me about disaggregated serving."}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text and finish == "length"
    assert usage is not None and usage.completion_tokens == 24 and usage.prompt_tokens > 5
    # Both workers did their part, and say so in their own metrics.
    assert worker_requests(prefill.port, "prefill") == 1
    assert worker_requests(decode.port, "decode") == 1
    health = httpx.get(f"http://127.0.0.1:{frontend.port}/health", timeout=2).json()
    assert health["instances"]["prefill"] == [prefill.extra["instance_id"]]
    assert health["instances"]["decode"] == [decode.extra["instance_id"]]


def test_decode_killed_then_503_fast_then_recovers(services: Services, stack) -> None:
    ns, prefill, decode, frontend, procs = stack
    wait_ready(frontend.port)
    url = f"http://127.0.0.1:{frontend.port}/v1/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert httpx.post(url, json=body, timeout=10).status_code == 200

    decode.kill()
    decode.popen.wait(5)
    key = f"dynamo_lite/{ns}/instances/decode/generate/{decode.extra['instance_id']}"
    killed_at = time.monotonic()
    wait_until(lambda: key not in etcd_keys(services, f"dynamo_lite/{ns}/"), 2 + 3, what="decode key expiry")
    assert time.monotonic() - killed_at <= 2 + 3  # lease TTL 2 s (+ etcd's expiry granularity)

    started = time.monotonic()
    r = httpx.post(url, json=body, timeout=10)
    assert time.monotonic() - started < 1.0
    assert r.status_code == 503
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and "decode" in err["message"]

    new_decode = start_worker(services, ns, "decode", *WORKER_ARGS)
    procs.append(new_decode)
    wait_until(lambda: httpx.post(url, json=body, timeout=10).status_code == 200, 10, what="recovery")
    r = httpx.post(url, json=body, timeout=10)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_bad_requests_get_openai_errors_and_server_keeps_serving(services: Services, stack) -> None:
    _, _, _, frontend, _ = stack
    wait_ready(frontend.port)
    url = f"http://127.0.0.1:{frontend.port}/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (b"{not json", 400),
        (json.dumps({"model": "nope", "messages": msgs}).encode(), 404),
        (json.dumps({"model": MODEL, "messages": msgs, "n": 17}).encode(), 400),
        (json.dumps({"model": MODEL, "messages": msgs, "max_tokens": 0}).encode(), 400),
        (b'{"model": "' + MODEL.encode() + b'", "messages": [], "pad": "' + b"x" * (50 << 20) + b'"}', 413),
    ]
    with httpx.Client(timeout=30) as client:
        for body, status in cases:
            r = client.post(url, content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, (status, r.text[:300])
            err = r.json()["error"]
            assert set(err) >= {"message", "type", "param", "code"}
        ok = client.post(url, json={"model": MODEL, "messages": msgs, "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
