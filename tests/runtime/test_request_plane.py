"""Both request planes, one contract: ordered streams, errors with their status, cancellation, fast 503s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from dynamo_lite.engines.base import EngineError
from dynamo_lite.protocol import (
    ErrorInfo,
    Frame,
    FrameKind,
    InstanceBusy,
    RequestPlane,
    StreamError,
    decode,
    encode,
)
from dynamo_lite.runtime.config import RuntimeSettings
from dynamo_lite.runtime.request_plane_inproc import InProcRequestPlane
from dynamo_lite.runtime.request_plane_nats import HEARTBEAT_PREFIX, PROBE_HEADER, NatsRequestPlane

if TYPE_CHECKING:
    from conftest import Launcher, Proc

HEARTBEAT = {"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 1.0}


@dataclass
class Planes:
    server: RequestPlane
    client: RequestPlane


@pytest.fixture(params=["inproc", "nats"])
async def planes(request: pytest.FixtureRequest) -> AsyncIterator[Planes]:
    if request.param == "inproc":
        plane = InProcRequestPlane()
        yield Planes(plane, plane)
        await plane.close()
        return
    port = request.getfixturevalue("nats_server").port
    settings = RuntimeSettings(nats_url=f"nats://127.0.0.1:{port}", **HEARTBEAT)
    server = await NatsRequestPlane.connect(settings, name="test-server")
    # The client has its own connection, like a frontend.
    client = await NatsRequestPlane.connect(settings, name="test-client")
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


async def test_closing_the_client_stream_cancels_the_handler(planes: Planes) -> None:
    started, finished = asyncio.Event(), asyncio.Event()
    addr = address()
    served = await planes.server.serve(addr, endless(started, finished))
    stream = planes.client.stream(addr, b"", first_timeout=5.0)
    assert [await stream.__anext__() for _ in range(3)] == [b"0", b"1", b"2"]
    await stream.aclose()
    await asyncio.wait_for(finished.wait(), 1.0)
    await asyncio.sleep(0.05)
    assert served.inflight == 0  # type: ignore[attr-defined]


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


async def test_unknown_address_fails_fast_with_503(planes: Planes) -> None:
    t0 = time.monotonic()
    with pytest.raises(StreamError) as err:
        await collect(planes.client, address(), first_timeout=30.0)
    assert err.value.info.status == 503
    assert time.monotonic() - t0 < 1.0


async def test_silent_handler_fails_with_504_after_first_timeout(planes: Planes) -> None:
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
    with pytest.raises(StreamError) as err:
        await collect(planes.client, addr, first_timeout=0.3)
    assert err.value.info.status == 504
    assert time.monotonic() - t0 < 1.5
    await asyncio.wait_for(finished.wait(), 1.0)  # and the handler was told to stop


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
    with pytest.raises(StreamError) as err:
        await collect(planes.client, addr)
    assert err.value.info.status == 503


async def test_stop_past_the_drain_ends_open_streams_with_503(planes: Planes) -> None:
    started, finished = asyncio.Event(), asyncio.Event()
    addr = address()
    served = await planes.server.serve(addr, endless(started, finished))
    in_flight = asyncio.create_task(collect(planes.client, addr))
    await asyncio.wait_for(started.wait(), 2.0)
    await served.stop(drain_s=0.1)
    stopped = time.monotonic()
    with pytest.raises(StreamError) as err:
        await asyncio.wait_for(in_flight, 3.0)
    assert err.value.info.status == 503 and err.value.info.code == "instance_stopped"
    assert time.monotonic() - stopped < 0.5  # told at once, not found out by a liveness timeout
    await asyncio.wait_for(finished.wait(), 1.0)


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
    assert err.value.info.status == 503 and err.value.info.code == "instance_busy"
    assert refused == [None]
    await holder.aclose()
    await asyncio.wait_for(finished.wait(), 1.0)
    started.clear()
    await asyncio.sleep(0.05)  # the handler's task is gone: room again
    assert await collect_some(planes.client, addr, 2) == [b"0", b"1"]


# ---- NATS only: what a network adds ---------------------------------------------------------------------


async def test_nats_request_over_max_payload_is_refused_with_413(nats_server: Proc) -> None:
    plane = await NatsRequestPlane.connect(RuntimeSettings(nats_url=f"nats://127.0.0.1:{nats_server.port}"))
    try:
        with pytest.raises(StreamError) as err:
            await collect(plane, address(), b"x" * (plane.nc.max_payload + 1))
        assert err.value.info.status == 413
    finally:
        await plane.close()


SERVER_SCRIPT = """
import asyncio, sys
from dynamo_lite.runtime.config import RuntimeSettings
from dynamo_lite.runtime.request_plane_nats import NatsRequestPlane

async def handler(payload):
    i = 0
    while True:
        yield b"%d" % i
        i += 1
        await asyncio.sleep(0.02)

async def main():
    settings = RuntimeSettings(nats_url=sys.argv[1], heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0)
    plane = await NatsRequestPlane.connect(settings)
    await plane.serve(sys.argv[2], handler)
    print("READY", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_nats_stream_fails_with_503_when_the_instance_process_dies(
    nats_server: Proc, launcher: Launcher
) -> None:
    url, addr = f"nats://127.0.0.1:{nats_server.port}", address()
    proc = await asyncio.to_thread(launcher.python, "plane-server", SERVER_SCRIPT, url, addr)
    settings = RuntimeSettings(nats_url=url, **HEARTBEAT)
    client = await NatsRequestPlane.connect(settings)
    try:
        got: list[bytes] = []
        with pytest.raises(StreamError) as err:
            async with aclosing(client.stream(addr, b"", first_timeout=5.0)) as stream:
                async for item in stream:
                    got.append(item)
                    if len(got) == 5:
                        proc.kill()  # SIGKILL: no goodbye, no error frame
                        killed = time.monotonic()
        elapsed = time.monotonic() - killed
        assert got[:5] == [b"0", b"1", b"2", b"3", b"4"]
        assert err.value.info.status == 503 and err.value.info.code == "instance_lost"
        assert elapsed < settings.heartbeat_timeout_s + 1.0
        assert not client.instance_alive(addr)
    finally:
        await client.close()


async def test_nats_down_fails_requests_fast_with_503_and_recovers(launcher: Launcher) -> None:
    nats = await asyncio.to_thread(launcher.nats)
    settings = RuntimeSettings(nats_url=f"nats://127.0.0.1:{nats.port}", **HEARTBEAT)
    server, client = await NatsRequestPlane.connect(settings), await NatsRequestPlane.connect(settings)
    try:
        started, finished = asyncio.Event(), asyncio.Event()
        addr = address()
        await server.serve(addr, endless(started, finished))
        in_flight = asyncio.create_task(collect(client, addr))
        await asyncio.wait_for(started.wait(), 2.0)
        nats.kill()
        nats.popen.wait(5)
        killed = time.monotonic()
        # A stream open when NATS died ends with 503, within the liveness bound.
        with pytest.raises(StreamError) as err:
            await asyncio.wait_for(in_flight, settings.heartbeat_timeout_s + 2.0)
        assert err.value.info.status == 503
        assert time.monotonic() - killed < settings.heartbeat_timeout_s + 1.0
        # A new request while NATS is down fails at once.
        t0 = time.monotonic()
        with pytest.raises(StreamError) as err:
            await collect(client, addr, first_timeout=30.0)
        assert err.value.info.status == 503 and err.value.info.code == "request_plane_down"
        assert time.monotonic() - t0 < 0.5
        # NATS back on the same port: both sides reconnect by themselves and the address is served again.
        await asyncio.to_thread(launcher.nats, "nats", nats.port)
        deadline = time.monotonic() + 10.0
        while True:
            try:
                got = await collect_some(client, addr, 3)
                break
            except StreamError as e:
                assert e.info.status == 503 and time.monotonic() < deadline, e
                await asyncio.sleep(0.1)
        assert got == [b"0", b"1", b"2"]
    finally:
        await client.close()
        await server.close()


async def collect_some(plane: RequestPlane, addr: str, n: int) -> list[bytes]:
    async with aclosing(plane.stream(addr, b"", first_timeout=2.0)) as stream:
        return [await stream.__anext__() for _ in range(n)]


class RawInstance:
    """A heartbeating instance on a raw NATS connection whose request handling a test scripts: ``on_request``
    gets each request message (probes included) and may acknowledge it with ``ack``."""

    def __init__(self, url: str, interval_s: float) -> None:
        self.url, self.interval_s, self.addr = url, interval_s, address()
        self.seen: list[bool] = []  # per message: was it a probe

    async def __aenter__(self) -> RawInstance:
        import nats

        self.nc = await nats.connect(self.url)
        await self.nc.subscribe(self.addr, cb=self._on_msg)
        await self.nc.flush()
        self._beat = asyncio.create_task(self._beating())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._beat.cancel()
        await self.nc.close()

    async def _beating(self) -> None:
        while True:
            await self.nc.publish(HEARTBEAT_PREFIX + self.addr, b"")
            await asyncio.sleep(self.interval_s)

    async def _on_msg(self, msg) -> None:  # noqa: ANN001
        probe = bool(msg.headers and PROBE_HEADER in msg.headers)
        self.seen.append(probe)
        await self.on_request(msg, probe)

    async def on_request(self, msg, probe: bool) -> None:  # noqa: ANN001
        """Default: take nothing (every request lost)."""

    async def ack(self, msg) -> None:  # noqa: ANN001
        await self.nc.publish(msg.reply, encode(Frame(-1, FrameKind.ACK)))


async def test_nats_request_lost_on_the_way_fails_fast_though_the_instance_heartbeats(
    nats_server: Proc,
) -> None:
    """NATS delivers at most once: a live instance (heartbeating) that never got the request must not leave the
    caller waiting for ``first_timeout``. Past the heartbeat timeout the caller probes the instance; the probe's
    acknowledgement proves the request before it lost (one publisher's messages stay in order), and the stream
    fails with a retryable 503."""
    settings = RuntimeSettings(nats_url=f"nats://127.0.0.1:{nats_server.port}")
    client = await NatsRequestPlane.connect(settings)

    class LosesTheFirst(RawInstance):
        async def on_request(self, msg, probe: bool) -> None:  # noqa: ANN001
            if len(self.seen) > 1:
                await self.ack(msg)  # the probe (and anything after) is taken

    try:
        async with LosesTheFirst(settings.nats_url, settings.heartbeat_interval_s) as instance:
            started = time.monotonic()
            with pytest.raises(StreamError) as err:
                await collect(client, instance.addr, b"x", first_timeout=30.0)
            assert err.value.info.status == 503 and err.value.info.code == "instance_unavailable"
            assert time.monotonic() - started < settings.heartbeat_timeout_s + 1.0
            assert instance.seen[:2] == [False, True]
    finally:
        await client.close()


async def test_nats_burst_acknowledged_late_but_in_order_is_not_taken_for_lost(nats_server: Proc) -> None:
    """A burst keeps an instance (and its caller) busy for seconds: acknowledgements come late, in order, with
    heartbeats flowing. That is no evidence of a lost request: no stream fails."""
    settings = RuntimeSettings(nats_url=f"nats://127.0.0.1:{nats_server.port}", **HEARTBEAT)
    client = await NatsRequestPlane.connect(settings)
    acked: list[float] = []
    client.on_ack = lambda address, seconds: acked.append(seconds)

    class Slow(RawInstance):
        async def on_request(self, msg, probe: bool) -> None:  # noqa: ANN001
            await asyncio.sleep(0.03)  # in order, like a worker's request subscription: 64 take ~2 s
            await self.ack(msg)
            if not probe:
                await self.nc.publish(msg.reply, encode(Frame(0, FrameKind.END)))

    try:
        async with Slow(settings.nats_url, settings.heartbeat_interval_s) as instance:
            results = await asyncio.gather(
                *(collect(client, instance.addr, b"x", first_timeout=30.0) for _ in range(64)),
                return_exceptions=True,
            )
            assert results == [[]] * 64
            assert max(acked) > settings.heartbeat_timeout_s  # late indeed, and not failed
            assert any(instance.seen)  # the caller probed, and waited for its answer
    finally:
        await client.close()


async def test_nats_instance_that_takes_nothing_fails_requests_after_the_ack_timeout(
    nats_server: Proc,
) -> None:
    settings = RuntimeSettings(
        nats_url=f"nats://127.0.0.1:{nats_server.port}", **HEARTBEAT, ack_timeout_s=2.0
    )
    client = await NatsRequestPlane.connect(settings)
    try:
        async with RawInstance(settings.nats_url, settings.heartbeat_interval_s) as instance:
            started = time.monotonic()
            with pytest.raises(StreamError) as err:
                await collect(client, instance.addr, b"x", first_timeout=30.0)
            assert err.value.info.code == "instance_unavailable"
            assert settings.ack_timeout_s <= time.monotonic() - started < settings.ack_timeout_s + 1.0
    finally:
        await client.close()


def routed_nats_pair(launcher: Launcher) -> tuple[Proc, Proc]:
    """Two nats-servers joined by a route (a cluster of two)."""
    import json
    import urllib.request
    import uuid

    from tests.conftest import free_port, start_nats, wait_until

    cluster = f"dl-{uuid.uuid4().hex[:8]}"
    routes = {"a": free_port(), "b": free_port()}
    monitors = {"a": free_port(), "b": free_port()}
    servers = {}
    for name, other in (("a", "b"), ("b", "a")):
        args = [
            "-m",
            str(monitors[name]),
            "--cluster_name",
            cluster,
            "--cluster",
            f"nats://127.0.0.1:{routes[name]}",
        ]
        args += ["--routes", f"nats://127.0.0.1:{routes[other]}"]
        servers[name] = launcher._own(start_nats(launcher.tmp, f"nats-{name}", extra_args=args))

    def routed(name: str) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitors[name]}/routez", timeout=1) as r:
            return json.loads(r.read()).get("num_routes") == 1

    wait_until(lambda: routed("a") and routed("b"), 20, what="NATS pair routed")
    return servers["a"], servers["b"]


async def test_nats_caller_losing_its_server_fails_its_streams_at_once_and_cancels_them_on_reconnect(
    launcher: Launcher,
) -> None:
    """Seen in CI as a 15 s hang: the frontend's NATS server died while a reply was on its way. Replies sent to
    a disconnected client are lost, and the worker (on another server) keeps heartbeating, so the caller must
    fail its in-flight streams the moment it loses its server (retryable 503) and, once reconnected to the
    other server, cancel them so the worker stops."""
    a, b = await asyncio.to_thread(routed_nats_pair, launcher)
    urls = {a.port: f"nats://127.0.0.1:{a.port}", b.port: f"nats://127.0.0.1:{b.port}"}
    client = await NatsRequestPlane.connect(RuntimeSettings(nats_url=",".join(urls.values()), **HEARTBEAT))
    victim = a if client.nc.connected_url.port == a.port else b
    survivor = b if victim is a else a
    server = await NatsRequestPlane.connect(RuntimeSettings(nats_url=urls[survivor.port], **HEARTBEAT))
    try:
        started, finished = asyncio.Event(), asyncio.Event()
        addr = address()
        await server.serve(addr, endless(started, finished))
        in_flight = asyncio.create_task(collect(client, addr, first_timeout=60.0))
        await asyncio.wait_for(started.wait(), 5.0)
        victim.kill()
        killed = time.monotonic()
        with pytest.raises(StreamError) as err:
            await asyncio.wait_for(in_flight, 5.0)
        assert err.value.info.status == 503 and err.value.info.code == "request_plane_down"
        assert time.monotonic() - killed < 0.5  # not after the heartbeat timeout, let alone first_timeout
        # Reconnected to the survivor, the caller cancels what it abandoned: the worker's handler stops.
        await asyncio.wait_for(finished.wait(), 10.0)
        assert client.nc.connected_url.port == survivor.port
    finally:
        await client.close()
        await server.close()


async def test_nats_server_resends_the_last_frame_of_streams_it_ended_just_before_a_reconnect(
    nats_server: Proc,
) -> None:
    """An END still in the socket of a dying connection is lost, and its caller would wait behind live
    heartbeats: a worker re-sends the last frame of streams it ended shortly before, once reconnected."""
    settings = RuntimeSettings(nats_url=f"nats://127.0.0.1:{nats_server.port}", **HEARTBEAT)
    server, client = await NatsRequestPlane.connect(settings), await NatsRequestPlane.connect(settings)
    try:
        addr = address()
        dropped: list[bytes] = []

        async def two(payload: bytes):  # noqa: ANN202
            yield b"0"
            yield b"1"

        await server.serve(addr, two)
        real_publish = server.nc.publish

        async def lose_the_end(subject: str, payload: bytes = b"", **kw) -> None:  # noqa: ANN003
            if (
                subject.startswith(client._inbox)
                and decode(payload, Frame).kind == FrameKind.END
                and not dropped
            ):
                dropped.append(payload)  # the END frame: "still in the socket" when the connection died
                return
            await real_publish(subject, payload, **kw)

        server.nc.publish = lose_the_end  # type: ignore[method-assign]
        stream = asyncio.create_task(collect(client, addr, first_timeout=5.0))
        await asyncio.sleep(0.5)
        assert dropped and not stream.done()  # the caller has both DATA frames and waits for the END
        server.nc.publish = real_publish  # type: ignore[method-assign]
        await server.on_reconnected()  # what nats-py calls once the connection is back
        assert await asyncio.wait_for(stream, 2.0) == [b"0", b"1"]
    finally:
        await client.close()
        await server.close()
