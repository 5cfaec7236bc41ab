"""Issue 20: a burst beyond what the workers take waits at the frontend; past the queue limit the client gets 429
with Retry-After as the response's status, and no stream that started fails."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import orjson

from tests.conftest import Services, start_frontend, start_worker, wait_until

MODEL = "smol-mock"
# speedup 1: a decode step takes ~10 ms, so 60 tokens hold a worker's slot for ~0.6 s.
WORKER_ARGS = ("--served-model-name", MODEL, "--speedup-ratio", "1", "--max-inflight", "2")


async def chat(client: httpx.AsyncClient, url: str) -> dict:
    """One streaming chat: the status, Retry-After, whether [DONE] came, and any error event in the stream."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 60,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    seen = {"status": 0, "retry_after": None, "done": False, "error": None, "tokens": 0}
    async with client.stream("POST", url, json=body) as r:
        seen["status"], seen["retry_after"] = r.status_code, r.headers.get("retry-after")
        if r.status_code != 200:
            seen["error"] = orjson.loads(await r.aread())["error"]
            return seen
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                seen["done"] = True
            elif line.startswith("data: "):
                event = orjson.loads(line[6:])
                if "error" in event:
                    seen["error"] = event["error"]
                elif event.get("usage"):
                    seen["tokens"] = event["usage"]["completion_tokens"]
    return seen


def test_a_burst_queues_up_to_the_limit_and_the_excess_gets_429_before_any_byte(
    services: Services, procs_to_stop
) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    procs_to_stop.append(start_worker(services, ns, "prefill", *WORKER_ARGS))
    procs_to_stop.append(start_worker(services, ns, "decode", *WORKER_ARGS))
    frontend = start_frontend(services, ns, "--queue-depth", "4")
    procs_to_stop.append(frontend)
    base = f"http://127.0.0.1:{frontend.port}"

    def ready() -> bool:
        health = httpx.get(f"{base}/health", timeout=2).json()
        return bool(health["instances"]["decode"] and health["instances"]["prefill"])

    wait_until(ready, 10, what="workers discovered")

    async def burst() -> tuple[list[dict], float]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            runs = [asyncio.create_task(chat(client, f"{base}/v1/chat/completions")) for _ in range(16)]
            peak = 0.0
            while not all(r.done() for r in runs):
                metrics = (await client.get(f"{base}/metrics")).text
                for line in metrics.splitlines():
                    if line.startswith(f'dynamo_frontend_queued_requests{{model="{MODEL}"}}'):
                        peak = max(peak, float(line.split()[-1]))
                await asyncio.sleep(0.05)
            return [r.result() for r in runs], peak

    results, peak = asyncio.run(burst())
    served = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] != 200]
    # The decode worker takes 2 at once and 4 more wait: the other 10 are refused, as an HTTP status.
    assert len(served) == 6 and peak == 4, (len(served), peak)
    assert all(r["done"] and r["error"] is None and r["tokens"] == 60 for r in served), served
    assert all(r["status"] == 429 and r["retry_after"] == "1" for r in refused), refused
    assert all(r["error"]["code"] == "queue_full" for r in refused)
