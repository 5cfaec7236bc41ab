"""Issue 6: break real processes mid-stream and check that no request hangs and none is lost."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import httpx
import orjson

from tests.conftest import Proc, Services, start_frontend, start_worker, wait_until

MODEL = "smol-mock"
# speedup 1: a decode step takes ~10 ms, so a 150-token stream lasts a couple of seconds.
WORKER_ARGS = ("--served-model-name", MODEL, "--speedup-ratio", "1", "--lease-ttl", "2")


async def stream_chat(client: httpx.AsyncClient, url: str, max_tokens: int) -> dict:
    """One streaming chat; returns what the client saw: tokens (usage), text chunks, error, duration."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    seen = {"usage": None, "error": None, "chunks": 0, "done": False, "status": 0}
    started = time.monotonic()
    async with client.stream("POST", url, json=body) as r:
        seen["status"] = r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                seen["done"] = True
                break
            event = orjson.loads(data)
            if "error" in event:
                seen["error"] = event["error"]
            elif event.get("usage"):
                seen["usage"] = event["usage"]
            elif event.get("choices"):
                seen["chunks"] += 1
    seen["seconds"] = time.monotonic() - started
    return seen


def start_stack(
    services: Services, procs: list[Proc], decoders: int, *frontend_args: str
) -> tuple[str, list[Proc]]:
    """A prefill worker, ``decoders`` decode workers and a frontend, each added to ``procs`` (stopped by the
    caller) as soon as it runs; the chat URL and the decode workers."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    procs.append(start_worker(services, ns, "prefill", *WORKER_ARGS))
    decode = []
    for _ in range(decoders):
        decode.append(start_worker(services, ns, "decode", *WORKER_ARGS))
        procs.append(decode[-1])
    frontend = start_frontend(services, ns, *frontend_args)
    procs.append(frontend)

    def ready() -> bool:
        health = httpx.get(f"http://127.0.0.1:{frontend.port}/health", timeout=2).json()
        return len(health["instances"]["decode"]) == decoders and len(health["instances"]["prefill"]) == 1

    wait_until(ready, 10, what="all workers discovered")
    return f"http://127.0.0.1:{frontend.port}/v1/chat/completions", decode


async def kill_after(proc: Proc, delay: float) -> float:
    await asyncio.sleep(delay)
    proc.kill(signal.SIGKILL)
    return time.monotonic()


def test_decode_killed_mid_stream_migrates_every_request(services: Services, procs_to_stop) -> None:
    url, decoders = start_stack(services, procs_to_stop, 2, "--migration-limit", "1")

    async def run() -> list[dict]:
        limits = httpx.Limits(max_connections=80)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            streams = [asyncio.create_task(stream_chat(client, url, 150)) for _ in range(64)]
            await kill_after(decoders[0], 0.8)
            return await asyncio.gather(*streams)

    results = asyncio.run(run())
    assert all(r["status"] == 200 and r["done"] and r["error"] is None for r in results), [
        r for r in results if r["error"]
    ][:3]
    assert [r["usage"]["completion_tokens"] for r in results] == [150] * 64


def test_decode_killed_without_migration_ends_streams_with_error_fast(
    services: Services, procs_to_stop
) -> None:
    url, decoders = start_stack(services, procs_to_stop, 1)

    async def run() -> tuple[float, list[dict], list[float]]:
        async with httpx.AsyncClient(timeout=60) as client:
            streams = [asyncio.create_task(stream_chat(client, url, 400)) for _ in range(8)]
            killed_at = await kill_after(decoders[0], 0.8)
            ends = []
            for s in asyncio.as_completed(streams):
                await s
                ends.append(time.monotonic() - killed_at)
            return killed_at, [s.result() for s in streams], ends

    _, results, ends = asyncio.run(run())
    assert all(r["error"] is not None and r["done"] for r in results)
    assert max(ends) < 2.0, ends  # every stream ended with an error chunk within 2 s of the crash
