"""Adding up the metrics of a frontend's processes (``--workers N``): each process's registry, then the sum."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import msgspec
from prometheus_client.parser import text_string_to_metric_families

from dynamo_lite.frontend.metrics import FrontendMetrics
from dynamo_lite.frontend.sibling_metrics import PROCESSES, SiblingMetrics, Snapshot, exposition, snapshot


def process_metrics(requests: int, inflight: int, ttfts: list[float], itls: list[float]) -> FrontendMetrics:
    m = FrontendMetrics()
    mm = m.model("m")
    for _ in range(requests):
        m.request_done("m", "chat", 200, stream=True)
    mm.inflight.inc(inflight)
    for t in ttfts:
        mm.ttft.observe(t)
    for t in itls:
        mm.itl.observe(t)
    m.watch_queue(lambda: {"m": inflight})
    return m


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text.decode())
        for s in fam.samples
    }


def value(found: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in found.items() if n == name and set(labels.items()) <= set(ls))


def test_merge_adds_counters_histograms_and_gauges_and_keeps_the_first_created() -> None:
    a = process_metrics(3, 2, [0.01, 0.5], [0.001, 0.001, 0.2])
    b = process_metrics(4, 1, [0.02], [0.002])
    snaps = [
        msgspec.msgpack.decode(msgspec.msgpack.encode(snapshot(m.registry)), type=Snapshot) for m in (a, b)
    ]
    found = samples(exposition(snaps))
    assert value(found, "dynamo_frontend_requests_total", status="success") == 7
    assert value(found, "dynamo_frontend_inflight_requests", model="m") == 3  # livesum
    assert value(found, "dynamo_frontend_queued_requests", model="m") == 3
    assert value(found, "dynamo_frontend_time_to_first_token_seconds_count") == 3
    assert abs(value(found, "dynamo_frontend_time_to_first_token_seconds_sum") - 0.53) < 1e-9
    assert value(found, "dynamo_frontend_time_to_first_token_seconds_bucket", le="+Inf") == 3
    assert value(found, "dynamo_frontend_inter_token_latency_seconds_count") == 4
    created = [
        value(samples(m.render()), "dynamo_frontend_requests_created", status="success") for m in (a, b)
    ]
    assert value(found, "dynamo_frontend_requests_created", status="success") == min(created)


def test_a_process_renders_the_sum_over_its_siblings_sockets(tmp_path: Path) -> None:
    """Two registries behind two sockets in one directory: either one's render is the sum of both; a stale
    socket (a killed process's) is skipped."""

    async def main() -> tuple[bytes, bytes]:
        a = process_metrics(2, 1, [0.1], [])
        b = process_metrics(5, 0, [], [])
        here = SiblingMetrics(a.registry, tmp_path)
        there = SiblingMetrics(b.registry, tmp_path, pid=os.getpid() + 1)  # a sibling's socket, served here
        (tmp_path / "999999999.sock").touch()  # a dead process's leftover: nothing listens
        await here.start()
        await there.start()
        try:
            return await here.render(), await there.render()
        finally:
            await here.stop()
            await there.stop()

    for text in asyncio.run(main()):
        found = samples(text)
        assert value(found, "dynamo_frontend_requests_total") == 7
        assert value(found, "dynamo_frontend_inflight_requests") == 1
        assert value(found, PROCESSES) == 2
