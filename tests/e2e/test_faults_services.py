"""Issue 6: etcd and NATS break under load; clients abort at random points. Nothing hangs, nothing leaks."""

from __future__ import annotations

import asyncio
import random
import time
import urllib.request

import httpx
import pytest

from tests.conftest import Services, start_etcd, start_nats, wait_until
from tests.e2e.test_faults_mocker import MODEL, start_stack


async def request_loop(url: str, until: float, results: list[tuple[float, int, int, float]]) -> None:
    """Non-streaming chats back to back; records (start, status, completion tokens, seconds)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 12,
        "ignore_eos": True,
    }
    async with httpx.AsyncClient(timeout=30) as client:
        while time.monotonic() < until:
            t0 = time.monotonic()
            try:
                r = await client.post(url, json=body)
                tokens = r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
                results.append((t0, r.status_code, tokens, time.monotonic() - t0))
            except httpx.HTTPError:
                results.append((t0, 0, 0, time.monotonic() - t0))
                await asyncio.sleep(0.05)


@pytest.fixture
def stack(services: Services):
    procs: list = []  # each process owned here as soon as it runs (a start that fails leaves none behind)
    try:
        url, _ = start_stack(services, procs, 1)
        yield url, procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.popen.wait(10)


def test_nats_restart_under_load(services: Services, stack) -> None:
    url, _ = stack

    async def run() -> tuple[list, float, float]:
        results: list = []
        until = time.monotonic() + 9.0
        loops = [asyncio.create_task(request_loop(url, until, results)) for _ in range(4)]
        await asyncio.sleep(2.0)
        services.nats.kill()
        services.nats.popen.wait(5)
        down_at = time.monotonic()
        await asyncio.sleep(2.0)
        services.nats = await asyncio.to_thread(start_nats, services.tmp, "nats2", services.nats.port)
        up_at = time.monotonic()
        await asyncio.gather(*loops)
        return results, down_at, up_at

    results, down_at, up_at = asyncio.run(run())
    # Without migration a request whose tokens were flowing when NATS died fails (503); one that arrived
    # while it was down waits for it (issue 26), within its deadline: never a hang.
    assert all(status in (200, 503) for _, status, _, _ in results), {s for _, s, _, _ in results}
    assert all(tokens == 12 for _, status, tokens, _ in results if status == 200)
    assert max(seconds for *_, seconds in results) < (up_at - down_at) + 5.0
    assert any(status == 200 for t0, status, _, _ in results if t0 < down_at)
    during = [status for t0, status, _, _ in results if down_at + 0.5 < t0 < up_at]
    assert all(s == 200 for s in during), during  # tests/e2e/test_nats_outage.py sends such requests for sure
    late = [status for t0, status, _, _ in results if t0 > up_at + 2.5]
    assert late and all(s == 200 for s in late), late  # reconnected: served again without restarts


def test_etcd_restart_under_load_drops_nothing(services: Services, stack) -> None:
    url, _ = stack
    etcd = services.etcd

    async def run() -> list:
        results: list = []
        until = time.monotonic() + 7.0
        loops = [asyncio.create_task(request_loop(url, until, results)) for _ in range(4)]
        await asyncio.sleep(1.5)
        etcd.kill()
        etcd.popen.wait(5)
        await asyncio.sleep(1.0)  # shorter than the workers' 2 s lease
        services.etcd = await asyncio.to_thread(
            start_etcd, services.tmp, "etcd", etcd.port, etcd.extra["peer_port"]
        )
        await asyncio.gather(*loops)
        return results

    results = asyncio.run(run())
    assert results and all(status == 200 and tokens == 12 for _, status, tokens, _ in results), {
        (s, t) for _, s, t, _ in results
    }
    health = httpx.get(url.replace("/v1/chat/completions", "/health"), timeout=2).json()
    assert len(health["instances"]["prefill"]) == 1 and len(health["instances"]["decode"]) == 1


def _gauge_sum(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_500_client_aborts_leave_no_active_sequences(services: Services, stack) -> None:
    url, procs = stack
    workers = [p for p in procs if p.name.startswith("worker")]
    rng = random.Random(7)
    started: list[float] = []

    async def one(client: httpx.AsyncClient, abort_after: float) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 60,
            "stream": True,
            "ignore_eos": True,
        }

        async def consume() -> None:
            async with client.stream("POST", url, json=body) as r:
                seen = False
                async for data in r.aiter_bytes():
                    if not seen and r.status_code == 200 and b"data:" in data:
                        seen = True
                        started.append(abort_after)  # tokens were flowing when the client left

        try:
            await asyncio.wait_for(consume(), abort_after)
        except (TimeoutError, httpx.HTTPError):
            pass

    async def run() -> None:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            sem = asyncio.Semaphore(50)

            async def bounded(delay: float) -> None:
                async with sem:
                    await one(client, delay)

            await asyncio.gather(*(bounded(rng.uniform(0.0, 1.2)) for _ in range(500)))

    # The stack serves whole requests before the storm, and aborts then hit streams that were generating.
    ok = [httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 8, "ignore_eos": True}, timeout=30) for _ in range(5)]  # fmt: skip
    assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8 for r in ok)
    asyncio.run(run())
    assert len(started) >= 25, len(started)

    def idle() -> bool:
        return all(
            _gauge_sum(w.port, "dynamo_lite_worker_active_seqs") == 0
            and _gauge_sum(w.port, "dynamo_lite_worker_queued_requests") == 0
            for w in workers
        )

    wait_until(idle, 10, what="every worker idle after 500 aborts")
    assert _gauge_sum(workers[0].port, "dynamo_lite_worker_kv_bytes_held") == 0
