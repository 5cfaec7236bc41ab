"""``dynamo_lite.timing``: what a request's timing report says, from the stamps the path leaves."""

from __future__ import annotations

import asyncio

from dynamo_lite import timing
from dynamo_lite.protocol import GenerateChunk, WorkerTiming, decode, encode


def test_report_adds_the_parts_it_was_given():
    rt = timing.RequestTiming(received=100.0, preprocessed=100.010)
    rt.queue_s = 0.005
    rt.prefilled("p1", WorkerTiming("p1", first_chunk_ms=80.0, engine_queue_ms=3.0), 0.090)
    rt.decode_sent = 100.110
    rt.first_token = 100.106
    rt.decode_chunk(
        "d1", WorkerTiming("d1", kv_transfer_ms=4.0, kv_bytes=1024, kv_transport="shm"), last=False
    )
    rt.decode_chunk("d1", None, last=True)
    rt.decode_done = 100.510  # as if the last chunk came then
    report = rt.report(frozenset({timing.TIMING, timing.WORKER_ID}), output_tokens=5)
    t = report["timing"]
    assert report["worker_id"] == {"prefill_worker_id": "p1", "decode_worker_id": "d1"}
    assert t["preprocess_ms"] == 10.0 and t["queue_ms"] == 5.0 and t["prefill_ms"] == 90.0
    assert t["prefill_worker_ms"] == 80.0 and t["prefill_queue_ms"] == 3.0
    assert (t["kv_transfer_ms"], t["kv_transfer_bytes"], t["kv_transport"]) == (4.0, 1024, "shm")
    assert t["decode_ms"] == 400.0 and t["ttft_ms"] == 106.0
    assert t["prefill_worker_id"] == "p1" and t["decode_worker_id"] == "d1"
    assert timing.RequestTiming(1.0).report(frozenset({timing.WORKER_ID}), 0).keys() == {"worker_id"}


async def test_kv_transfers_add_to_the_timing_of_the_request_of_their_task():
    async def serve(instance: str, pulls: list[int]) -> WorkerTiming:
        wt = timing.worker_timing(instance)
        for n in pulls:
            await asyncio.sleep(0)
            timing.note_kv_transfer(0.002, n, "tcp")
        return wt

    a, b = await asyncio.gather(serve("a", [10, 20]), serve("b", [5]))
    assert (a.kv_bytes, b.kv_bytes) == (30, 5) and a.kv_transfer_ms == 4.0 and b.kv_transport == "tcp"
    timing.note_kv_transfer(1.0, 1, "tcp")  # no request in this task: nothing to add to, no error


def test_worker_timing_rides_on_a_chunk_and_is_left_out_when_absent():
    chunk = GenerateChunk([1], timing=WorkerTiming("w", first_chunk_ms=1.5, kv_bytes=7))
    assert decode(encode(chunk), GenerateChunk).timing == WorkerTiming("w", first_chunk_ms=1.5, kv_bytes=7)
    assert len(encode(GenerateChunk([1]))) < len(encode(chunk))
