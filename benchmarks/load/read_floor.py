"""The floor under the load client's CPU cost: a Protocol that sends the same requests and only counts reads.

What it costs per read is the event loop's and the kernel's share, which no Python client avoids; the load
client's own cost is what it spends above this. Against a chunked streaming endpoint (the mock server):

    python -m benchmarks.load.read_floor --url http://127.0.0.1:8001 --concurrency 64 --request-count 3000
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import cast

import orjson

from .http import Origin, build_request
from .runner import run_blocking


class _CountingProtocol(asyncio.Protocol):
    reads = 0

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        _CountingProtocol.reads += 1
        if data.endswith(b"0\r\n\r\n") and self.done is not None:  # the last chunk of a chunked body
            self.done.set_result(None)


async def measure(url: str, concurrency: int, count: int, max_tokens: int) -> dict[str, float]:
    origin = Origin.from_url(url)
    body = orjson.dumps(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi " * 170}],
            "max_tokens": max_tokens,
            "stream": True,
        }
    )
    request = build_request(origin, "/v1/chat/completions", body, {}, stream=True)
    loop = asyncio.get_running_loop()
    conns = [
        (await loop.create_connection(_CountingProtocol, origin.host, origin.port))[1]
        for _ in range(concurrency)
    ]
    left = count

    async def worker(p: _CountingProtocol) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            p.done = loop.create_future()
            assert p.transport is not None
            p.transport.write(request)
            await asyncio.wait_for(p.done, 60)

    _CountingProtocol.reads = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(p) for p in conns))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    for p in conns:
        if p.transport is not None:
            p.transport.close()
    reads = max(1, _CountingProtocol.reads)
    return {
        "us_per_request": cpu / count * 1e6,
        "us_per_read": cpu / reads * 1e6,
        "reads_per_request": reads / count,
        "requests_per_s": count / wall,
        "cpu_percent": 100 * cpu / wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load.read_floor")
    p.add_argument("--url", default="http://127.0.0.1:8001")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--request-count", type=int, default=3000)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args()
    out = run_blocking(
        lambda: measure(args.url, args.concurrency, args.request_count, args.max_tokens), not args.no_uvloop
    )
    print(
        f"floor: {out['us_per_request']:.0f} µs/request, {out['us_per_read']:.2f} µs/read, "
        f"{out['reads_per_request']:.1f} reads/request, {out['requests_per_s']:.0f} req/s, "
        f"{out['cpu_percent']:.0f}% of a core"
    )


if __name__ == "__main__":
    main()
