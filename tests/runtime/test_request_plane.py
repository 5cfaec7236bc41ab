"""The request plane's contract (``dynamo_lite.protocol.RequestPlane``), run against every plane: NATS (read by
our fast paths, and by nats-py's own as with DYNAMO_LITE_NATS_FAST_PATH=0) and in-process. Accept or refuse at
once (ACK, busy), ordered streams with the handler's errors, a lost instance and a late first answer fail typed
and fast, cancellation flows down, stopping drains then cancels.
What only a network adds is in ``test_request_plane_nats.py``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import pytest

from dynamo_lite.engines.base import EngineError
from dynamo_lite.protocol import (
    ErrorInfo,
    InstanceBusy,
    InstanceLost,
    InstanceUnavailable,
    RequestCancelled,
    RequestPlane,
    RequestTimedOut,
    StreamError,
)
from dynamo_lite.runtime.config import RuntimeSettings, Timeouts
from dynamo_lite.runtime.request_plane_inproc import InProcRequestPlane
from dynamo_lite.runtime.request_plane_nats import NatsRequestPlane

HEARTBEAT = Timeouts(heartbeat_interval_s=0.2, heartbeat_s=1.0)
LOST_WITHIN_S = HEARTBEAT.heartbeat_s + 0.5  # NATS finds a silent instance by its heartbeats


@dataclass
class Planes:
    server: RequestPlane
    client: RequestPlane


@pytest.fixture(params=["inproc", "nats", "nats-standard-read-path"])
async def planes(request: pytest.FixtureRequest) -> AsyncIterator[Planes]:
    if request.param == "inproc":
        plane = InProcRequestPlane()
        yield Planes(plane, plane)
        await plane.close()
        return
    port = request.getfixturevalue("nats_server").port
    fast = request.param == "nats"  # else as with DYNAMO_LITE_NATS_FAST_PATH=0: nats-py's own read path
    settings = RuntimeSettings(nats_url=f"nats://127.0.0.1:{port}", timeouts=HEARTBEAT, nats_fast_path=fast)
    server = await NatsRequestPlane.connect(settings, name="test-server")
    # The client has its own connection, like a frontend.
    client = await NatsRequestPlane.connect(settings, name="test-client")
    assert server.read_path == client.read_path == ("fast" if fast else "standard")
    yield Planes(server, client)
    await client.close()
    await server.close()


_next = iter(range(1_000_000))


def address() -> str:
    return f"test.plane.generate.{next(_next)}"


async def collect(
    plane: RequestPlane, addr: str, payload: bytes = b"", first_timeout: float = 5.0
) -> list[bytes]:
    async with aclosing(plane.stream(addr, payload, first_timeout=first_timeout)) as stream:
        return [item async for item in stream]


async def collect_some(plane: RequestPlane, addr: str, n: int) -> list[bytes]:
    async with aclosing(plane.stream(addr, b"", first_timeout=2.0)) as stream:
        return [await stream.__anext__() for _ in range(n)]


def endless(started: asyncio.Event, finished: asyncio.Event):  # noqa: ANN201
    async def handler(payload: bytes) -> AsyncIterator[bytes]:
        started.set()
        try:
            i = 0
            while True:
                yield b"%d" % i
                i += 1
                await asyncio.sleep(0.005)
        finally:
            finished.set()  # where a real handler frees its batch slot and KV

    return handler


def the_failures() -> list[tuple[StreamError, bool]]:
    return [
        (InstanceUnavailable("x"), True),
        (InstanceLost("x"), True),
        (InstanceBusy("x"), True),
        (RequestTimedOut("x"), False),
        (RequestCancelled("x"), False),
        (StreamError(ErrorInfo(500, "x", "engine_error")), False),
    ]


@pytest.mark.parametrize(("error", "retryable"), the_failures(), ids=lambda v: type(v).__name__)
def test_retryability_is_the_failure_types_and_survives_the_wire(error: StreamError, retryable: bool) -> None:
    assert error.retryable is retryable
    if not isinstance(error, InstanceBusy):  # busy is an answer in place of the ACK, never an error frame
        back = StreamError.from_info(error.info)
        assert type(back) is type(error) and back.info == error.info


async def test_stream_arrives_complete_and_in_order(planes: Planes) -> None:
    async def handler(payload: bytes) -> AsyncIterator[bytes]:
        for i in range(int(payload)):
            yield b"%d" % i

    addr = address()
    await planes.server.serve(addr, handler)
    assert await collect(planes.client, addr, b"300") == [b"%d" % i for i in range(300)]
    assert await collect(planes.client, addr, b"0") == []
    # Concurrent streams to one address stay separate.
    results = await asyncio.gather(*(collect(planes.client, addr, b"%d" % n) for n in (5, 50, 20)))
    assert [len(r) for r in results] == [5, 50, 20]


async def test_every_accepted_request_is_acknowledged_before_its_first_payload(planes: Planes) -> None:
    release = asyncio.Event()
    acked: list[str] = []

    async def handler(payload: bytes) -> AsyncIterator[bytes]:
        await release.wait()
        yield b"done"

    addr = address()
    await planes.server.serve(addr, handler)
    planes.client.on_ack = lambda address, seconds: acked.append(address)
    try:
        waiting = asyncio.create_task(collect(planes.client, addr))
        async with asyncio.timeout(2.0):
            while not acked:  # noqa: ASYNC110 — the observer is a plain callback
                await asyncio.sleep(0.01)
        assert acked == [addr] and not waiting.done()  # accepted, and nothing produced yet
        release.set()
        assert await waiting == [b"done"]
    finally:
        planes.client.on_ack = None


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (StreamError(ErrorInfo(429, "slow down", "rate_limited")), 429, "rate_limited"),
        (EngineError("prompt too long", 400, "context_length"), 400, "context_length"),
        (RuntimeError("boom"), 500, "internal_error"),
    ],
)
async def test_handler_errors_reach_the_client_with_their_status(
    planes: Planes, exc: Exception, status: int, code: str
) -> None:
    async def handler(payload: bytes) -> AsyncIterator[bytes]:
        yield b"first"
        raise exc

    addr = address()
    await planes.server.serve(addr, handler)
    got: list[bytes] = []
    with pytest.raises(StreamError) as err:
        async with aclosing(planes.client.stream(addr, b"", first_timeout=5.0)) as stream:
            async for item in stream:
                got.append(item)
    assert got == [b"first"]
    assert (err.value.info.status, err.value.info.code) == (status, code)
    assert (
        type(err.value) is StreamError and not err.value.retryable
    )  # the request's failure, not the plane's


async def test_an_address_at_capacity_refuses_before_accepting_with_instance_busy(planes: Planes) -> None:
    started, finished = asyncio.Event(), asyncio.Event()
    refused: list[None] = []
    addr = address()
    await planes.server.serve(
        addr, endless(started, finished), max_inflight=1, on_refused=lambda: refused.append(None)
    )
    holder = planes.client.stream(addr, b"", first_timeout=5.0)
    assert await holder.__anext__() == b"0"
    with pytest.raises(InstanceBusy) as err:
        await collect(planes.client, addr)
    assert err.value.info.status == 503 and err.value.retryable
    assert refused == [None]
    await holder.aclose()
    await asyncio.wait_for(finished.wait(), 1.0)
    started.clear()
    await asyncio.sleep(0.05)  # the handler's task is gone: room again
    assert await collect_some(planes.client, addr, 2) == [b"0", b"1"]


async def test_unknown_address_fails_fast_with_instance_unavailable(planes: Planes) -> None:
    t0 = time.monotonic()
    with pytest.raises(InstanceUnavailable) as err:
        await collect(planes.client, address(), first_timeout=30.0)
    assert err.value.info.status == 503
    assert time.monotonic() - t0 < 1.0


async def test_a_lost_instance_fails_open_streams_with_instance_lost(planes: Planes) -> None:
    """The instance goes away saying nothing (a crash) while one caller waits on a handler that is between
    payloads and another on one that will never answer again: both fail, typed, never hang."""
    started, finished = asyncio.Event(), asyncio.Event()
    stuck = asyncio.Event()

    async def stalls(payload: bytes) -> AsyncIterator[bytes]:
        yield b"only"
        try:
            await asyncio.Event().wait()  # an engine that wedged
            yield b"never"
        finally:
            stuck.set()

    flowing, stalled = address(), address()
    served = [
        await planes.server.serve(flowing, endless(started, finished)),
        await planes.server.serve(stalled, stalls),
    ]
    a = planes.client.stream(flowing, b"", first_timeout=5.0)
    b = planes.client.stream(stalled, b"", first_timeout=5.0)
    assert await a.__anext__() == b"0" and await b.__anext__() == b"only"
    waits = [asyncio.create_task(collect_rest(s)) for s in (a, b)]
    await asyncio.sleep(0.05)
    for s in served:
        await s.kill()
    killed = time.monotonic()
    for wait in waits:
        with pytest.raises(InstanceLost) as err:
            await asyncio.wait_for(wait, LOST_WITHIN_S + 1.0)
        assert err.value.info.status == 503 and err.value.retryable
    assert time.monotonic() - killed < LOST_WITHIN_S
    await asyncio.wait_for(finished.wait(), 1.0)  # and the handlers were stopped
    await asyncio.wait_for(stuck.wait(), 1.0)
    with pytest.raises(InstanceUnavailable):
        await collect(planes.client, flowing)


async def collect_rest(stream: AsyncIterator[bytes]) -> list[bytes]:
    async with aclosing(stream):
        return [item async for item in stream]


async def test_no_first_payload_in_time_fails_with_request_timed_out_and_cancels_the_handler(
    planes: Planes,
) -> None:
    finished = asyncio.Event()

    async def handler(payload: bytes) -> AsyncIterator[bytes]:
        try:
            await asyncio.sleep(30)
            yield b"too late"
        finally:
            finished.set()

    addr = address()
    await planes.server.serve(addr, handler)
    t0 = time.monotonic()
    with pytest.raises(RequestTimedOut) as err:
        await collect(planes.client, addr, first_timeout=0.3)
    assert err.value.info.status == 504 and not err.value.retryable
    assert time.monotonic() - t0 < 1.5
    await asyncio.wait_for(finished.wait(), 1.0)  # and the handler was told to stop


async def test_closing_the_client_stream_cancels_the_handler(planes: Planes) -> None:
    started, finished = asyncio.Event(), asyncio.Event()
    addr = address()
    served = await planes.server.serve(addr, endless(started, finished))
    stream = planes.client.stream(addr, b"", first_timeout=5.0)
    assert [await stream.__anext__() for _ in range(3)] == [b"0", b"1", b"2"]
    await stream.aclose()
    await asyncio.wait_for(finished.wait(), 1.0)
    await asyncio.sleep(0.05)
    assert served.inflight == 0


async def test_cancelling_the_consumer_task_cancels_the_handler(planes: Planes) -> None:
    started, finished = asyncio.Event(), asyncio.Event()
    addr = address()
    await planes.server.serve(addr, endless(started, finished))
    consumer = asyncio.create_task(collect(planes.client, addr))
    await asyncio.wait_for(started.wait(), 2.0)
    await asyncio.sleep(0.05)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    await asyncio.wait_for(finished.wait(), 1.0)


async def test_stop_drains_in_flight_streams_and_refuses_new_ones(planes: Planes) -> None:
    async def handler(payload: bytes) -> AsyncIterator[bytes]:
        for i in range(10):
            await asyncio.sleep(0.02)
            yield b"%d" % i

    addr = address()
    served = await planes.server.serve(addr, handler)
    in_flight = asyncio.create_task(collect(planes.client, addr))
    await asyncio.sleep(0.05)
    await served.stop(drain_s=5.0)
    assert len(await asyncio.wait_for(in_flight, 2.0)) == 10
    with pytest.raises(InstanceUnavailable):
        await collect(planes.client, addr)


async def test_stop_past_the_drain_ends_open_streams_with_request_cancelled(planes: Planes) -> None:
    started, finished = asyncio.Event(), asyncio.Event()
    addr = address()
    served = await planes.server.serve(addr, endless(started, finished))
    in_flight = asyncio.create_task(collect(planes.client, addr))
    await asyncio.wait_for(started.wait(), 2.0)
    await served.stop(drain_s=0.1)
    stopped = time.monotonic()
    with pytest.raises(RequestCancelled) as err:
        await asyncio.wait_for(in_flight, 3.0)
    assert err.value.info.status == 503 and not err.value.retryable
    assert time.monotonic() - stopped < 0.5  # told at once, not found out by a liveness timeout
    await asyncio.wait_for(finished.wait(), 1.0)
