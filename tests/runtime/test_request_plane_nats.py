"""The NATS request plane beyond the shared contract (``test_request_plane.py``): what a network adds —
payload limits, processes that die, servers that go down, requests lost on the way, reconnects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import TYPE_CHECKING

import msgspec
import pytest

from dynamo_lite.protocol import (
    Frame,
    FrameKind,
    InstanceLost,
    InstanceUnavailable,
    RequestPlane,
    RequestPlaneDown,
    StreamError,
    decode,
    encode,
)
from dynamo_lite.runtime import request_plane_nats
from dynamo_lite.runtime.config import RuntimeSettings, Timeouts
from dynamo_lite.runtime.request_plane_nats import (
    HEARTBEAT_PREFIX,
    PROBE_HEADER,
    NatsRequestPlane,
    sync_with_server,
)

if TYPE_CHECKING:
    from conftest import Launcher, Proc

HEARTBEAT = Timeouts(heartbeat_interval_s=0.2, heartbeat_s=1.0)

_next = iter(range(1_000_000))


def address() -> str:
    return f"test.nats.generate.{next(_next)}"


async def collect(
    plane: RequestPlane, addr: str, payload: bytes = b"", first_timeout: float = 5.0
) -> list[bytes]:
    async with aclosing(plane.stream(addr, payload, first_timeout=first_timeout)) as stream:
        return [item async for item in stream]


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
            finished.set()

    return handler


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
from dynamo_lite.runtime.config import RuntimeSettings, Timeouts
from dynamo_lite.runtime.request_plane_nats import NatsRequestPlane

async def handler(payload):
    i = 0
    while True:
        yield b"%d" % i
        i += 1
        await asyncio.sleep(0.02)

async def main():
    settings = RuntimeSettings(nats_url=sys.argv[1], timeouts=Timeouts(heartbeat_interval_s=0.2, heartbeat_s=1.0))
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
    settings = RuntimeSettings(nats_url=url, timeouts=HEARTBEAT)
    client = await NatsRequestPlane.connect(settings)
    try:
        got: list[bytes] = []
        with pytest.raises(InstanceLost) as err:
            async with aclosing(client.stream(addr, b"", first_timeout=5.0)) as stream:
                async for item in stream:
                    got.append(item)
                    if len(got) == 5:
                        proc.kill()  # SIGKILL: no goodbye, no error frame
                        killed = time.monotonic()
        elapsed = time.monotonic() - killed
        assert got[:5] == [b"0", b"1", b"2", b"3", b"4"]
        assert err.value.info.status == 503 and err.value.info.code == "instance_lost"
        assert elapsed < settings.timeouts.heartbeat_s + 1.0
        assert not client.instance_alive(addr)
    finally:
        await client.close()


async def test_nats_down_fails_requests_fast_with_503_and_recovers(launcher: Launcher) -> None:
    nats = await asyncio.to_thread(launcher.nats)
    settings = RuntimeSettings(nats_url=f"nats://127.0.0.1:{nats.port}", timeouts=HEARTBEAT)
    server, client = await NatsRequestPlane.connect(settings), await NatsRequestPlane.connect(settings)
    try:
        started, finished = asyncio.Event(), asyncio.Event()
        addr = address()
        await server.serve(addr, endless(started, finished))
        in_flight = asyncio.create_task(collect(client, addr))
        await asyncio.wait_for(started.wait(), 2.0)
        assert client.reachable(addr)
        reachable_again = asyncio.Event()
        client.on_reachable.append(reachable_again.set)
        nats.kill()
        nats.popen.wait(5)
        killed = time.monotonic()
        # A stream open when NATS died ends with 503, within the liveness bound.
        with pytest.raises(StreamError) as err:
            await asyncio.wait_for(in_flight, settings.timeouts.heartbeat_s + 2.0)
        assert err.value.info.status == 503
        assert time.monotonic() - killed < settings.timeouts.heartbeat_s + 1.0
        # A new request while NATS is down fails at once.
        t0 = time.monotonic()
        with pytest.raises(InstanceUnavailable) as err:
            await collect(client, addr, first_timeout=30.0)
        assert isinstance(err.value, RequestPlaneDown) and err.value.plane_failed
        assert time.monotonic() - t0 < 0.5
        assert not client.reachable(addr)  # the router's admission keeps requests waiting meanwhile
        # NATS back on the same port: both sides reconnect by themselves and the address is served again; it is
        # reachable again once its instance was heard from (its heartbeat), and the client says so.
        await asyncio.to_thread(launcher.nats, "nats", nats.port)
        await asyncio.wait_for(reachable_again.wait(), settings.timeouts.heartbeat_s + 5.0)
        assert client.reachable(addr)
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
        # Not nc.flush(): its PING can overtake the SUB, and a request sent then finds no responder (seen in CI).
        await sync_with_server(self.nc, 5.0)
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
        async with LosesTheFirst(settings.nats_url, settings.timeouts.heartbeat_interval_s) as instance:
            started = time.monotonic()
            with pytest.raises(InstanceUnavailable) as err:
                await collect(client, instance.addr, b"x", first_timeout=30.0)
            assert err.value.info.status == 503 and err.value.retryable
            assert time.monotonic() - started < settings.timeouts.heartbeat_s + 1.0
            assert instance.seen[:2] == [False, True]
    finally:
        await client.close()


async def test_nats_burst_acknowledged_late_but_in_order_is_not_taken_for_lost(nats_server: Proc) -> None:
    """A burst keeps an instance (and its caller) busy for seconds: acknowledgements come late, in order, with
    heartbeats flowing. That is no evidence of a lost request: no stream fails."""
    settings = RuntimeSettings(nats_url=f"nats://127.0.0.1:{nats_server.port}", timeouts=HEARTBEAT)
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
        async with Slow(settings.nats_url, settings.timeouts.heartbeat_interval_s) as instance:
            results = await asyncio.gather(
                *(collect(client, instance.addr, b"x", first_timeout=30.0) for _ in range(64)),
                return_exceptions=True,
            )
            assert results == [[]] * 64
            assert max(acked) > settings.timeouts.heartbeat_s  # late indeed, and not failed
            assert any(instance.seen)  # the caller probed, and waited for its answer
    finally:
        await client.close()


async def test_nats_frames_of_a_kind_from_a_newer_sender_are_skipped(nats_server: Proc) -> None:
    """A newer worker may send a frame kind this caller doesn't know, numbered or not (a rolling upgrade):
    the caller skips it and the stream goes on, in order, to its END."""
    settings = RuntimeSettings(nats_url=f"nats://127.0.0.1:{nats_server.port}", timeouts=HEARTBEAT)
    client = await NatsRequestPlane.connect(settings)

    class Newer(RawInstance):
        async def on_request(self, msg, probe: bool) -> None:  # noqa: ANN001
            await self.ack(msg)
            newer = msgspec.msgpack.encode([-1, 42, b"", "a next-version field"])  # outside the numbering
            frames = [encode(Frame(0, FrameKind.DATA, b"a")), msgspec.msgpack.encode([1, 43, b"progress"])]
            frames += [newer, encode(Frame(2, FrameKind.DATA, b"b")), encode(Frame(3, FrameKind.END))]
            for frame in frames:
                await self.nc.publish(msg.reply, frame)

    try:
        async with Newer(settings.nats_url, settings.timeouts.heartbeat_interval_s) as instance:
            assert await collect(client, instance.addr, b"x") == [b"a", b"b"]
    finally:
        await client.close()


async def test_nats_instance_that_takes_nothing_fails_requests_after_the_ack_timeout(
    launcher: Launcher,
) -> None:
    nats = await asyncio.to_thread(launcher.nats)
    settings = RuntimeSettings(
        nats_url=f"nats://127.0.0.1:{nats.port}", timeouts=replace(HEARTBEAT, ack_s=2.0)
    )
    client = await NatsRequestPlane.connect(settings)
    try:
        async with RawInstance(settings.nats_url, settings.timeouts.heartbeat_interval_s) as instance:
            started = time.monotonic()
            with pytest.raises(InstanceUnavailable):
                await collect(client, instance.addr, b"x", first_timeout=30.0)
            assert settings.timeouts.ack_s <= time.monotonic() - started < settings.timeouts.ack_s + 1.0
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
    client = await NatsRequestPlane.connect(
        RuntimeSettings(nats_url=",".join(urls.values()), timeouts=HEARTBEAT)
    )
    victim = a if client.nc.connected_url.port == a.port else b
    survivor = b if victim is a else a
    server = await NatsRequestPlane.connect(RuntimeSettings(nats_url=urls[survivor.port], timeouts=HEARTBEAT))
    try:
        started, finished = asyncio.Event(), asyncio.Event()
        addr = address()
        await server.serve(addr, endless(started, finished))
        in_flight = asyncio.create_task(collect(client, addr, first_timeout=60.0))
        await asyncio.wait_for(started.wait(), 5.0)
        victim.kill()
        killed = time.monotonic()
        with pytest.raises(InstanceLost) as err:
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
    settings = RuntimeSettings(nats_url=f"nats://127.0.0.1:{nats_server.port}", timeouts=HEARTBEAT)
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


async def test_nats_instances_long_silent_are_forgotten(
    nats_server: Proc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers come and go (restarts, scaling): a long-running caller keeps no state per instance it ever
    heard, once that instance has been silent for a while and no stream is open to it."""
    monkeypatch.setattr(request_plane_nats, "FORGET_SILENT_AFTER_HEARTBEATS", 2)
    timeouts = Timeouts(heartbeat_interval_s=0.05, heartbeat_s=0.25)  # forgotten after 0.5 s of silence
    settings = RuntimeSettings(nats_url=f"nats://127.0.0.1:{nats_server.port}", timeouts=timeouts)
    server, client = await NatsRequestPlane.connect(settings), await NatsRequestPlane.connect(settings)
    addr = address()
    try:
        started, finished = asyncio.Event(), asyncio.Event()
        await server.serve(addr, endless(started, finished))
        assert await collect_some(client, addr, 3) and client.instance_alive(addr)
        await server.close()  # gone: no more heartbeats
        await asyncio.sleep(1.5)  # a check runs every 0.5 s and forgets what was silent 0.5 s
        assert addr not in client._last_seen and addr not in client._acked_upto
        assert not client.instance_alive(addr)
    finally:
        await client.close()
        await server.close()


async def test_nats_ack_is_held_until_a_first_frame_or_its_delay_and_keeps_request_order(
    nats_server: Proc,
) -> None:
    """A served request's ACK waits ``ack_delay_s``: a first frame sent before then acknowledges the request
    itself (no ACK message at all), a slower request gets its ACK when the delay is up, and a request's frame
    never overtakes the ACK of one that came before it (callers judge lost requests by that order)."""
    import nats

    settings = RuntimeSettings(
        nats_url=f"nats://127.0.0.1:{nats_server.port}", timeouts=replace(HEARTBEAT, ack_delay_s=0.5)
    )
    server = await NatsRequestPlane.connect(settings)
    release_slow = asyncio.Event()

    async def handler(payload: bytes) -> AsyncIterator[bytes]:
        if payload == b"slow":
            await release_slow.wait()
        yield payload

    addr = address()
    raw = await nats.connect(settings.nats_url)
    got: list[tuple[str, int, int]] = []  # (reply, seq, kind) in the order they arrived
    arrived = asyncio.Event()

    async def on_reply(msg) -> None:  # noqa: ANN001
        frame = decode(msg.data, Frame)
        got.append((msg.subject.rsplit(".", 1)[1], frame.seq, frame.kind))
        arrived.set()

    try:
        await server.serve(addr, handler)
        await raw.subscribe("rawinbox.*", cb=on_reply)
        await raw.flush()

        async def wait_for(n: int) -> None:
            while len(got) < n:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 5.0)

        # fast: DATA and END, no ACK
        await raw.publish(addr, b"fast", reply="rawinbox.fast")
        await wait_for(2)
        assert got == [("fast", 0, FrameKind.DATA), ("fast", 1, FrameKind.END)]
        # slow, then fast: the slow one's ACK goes out before the fast one's first frame
        got.clear()
        await raw.publish(addr, b"slow", reply="rawinbox.slow")
        await raw.publish(addr, b"fast", reply="rawinbox.fast2")
        await wait_for(3)
        assert got == [
            ("slow", -1, FrameKind.ACK),
            ("fast2", 0, FrameKind.DATA),
            ("fast2", 1, FrameKind.END),
        ]
        release_slow.set()
        await wait_for(5)
        assert got[3:] == [("slow", 0, FrameKind.DATA), ("slow", 1, FrameKind.END)]
        # slow alone: its ACK when the delay is up, long before its answer
        got.clear()
        release_slow.clear()
        started = time.monotonic()
        await raw.publish(addr, b"slow", reply="rawinbox.slow2")
        await wait_for(1)
        assert got == [("slow2", -1, FrameKind.ACK)]
        assert 0.4 < time.monotonic() - started < 2.0
        release_slow.set()
        await wait_for(3)
    finally:
        release_slow.set()
        await raw.close()
        await server.close()


@pytest.mark.parametrize("fast", [True, False])
async def test_nats_without_an_ack_delay_acks_before_the_first_frame(nats_server: Proc, fast: bool) -> None:
    """``ack_delay_s = 0``: every request is acknowledged before anything runs, on either read path (the fast
    one takes requests as they are parsed and leaves the ACK to a task: it still goes first)."""
    import nats

    settings = RuntimeSettings(
        nats_url=f"nats://127.0.0.1:{nats_server.port}",
        timeouts=replace(HEARTBEAT, ack_delay_s=0.0),
        nats_fast_path=fast,
    )
    server = await NatsRequestPlane.connect(settings)

    async def handler(payload: bytes) -> AsyncIterator[bytes]:
        yield payload

    addr = address()
    raw = await nats.connect(settings.nats_url)
    got: list[tuple[str, int, int]] = []
    three = asyncio.Event()

    async def on_reply(msg) -> None:  # noqa: ANN001
        frame = decode(msg.data, Frame)
        got.append((msg.subject.rsplit(".", 1)[1], frame.seq, frame.kind))
        if len(got) == 6:
            three.set()

    try:
        await server.serve(addr, handler)
        await raw.subscribe("rawinbox.*", cb=on_reply)
        await raw.flush()
        await raw.publish(addr, b"a", reply="rawinbox.a")
        await raw.publish(addr, b"b", reply="rawinbox.b")
        await asyncio.wait_for(three.wait(), 5.0)
        for reply in ("a", "b"):
            assert [(s, k) for r, s, k in got if r == reply] == [
                (-1, FrameKind.ACK),
                (0, FrameKind.DATA),
                (1, FrameKind.END),
            ]
        assert [r for r, s, _ in got if s == -1] == ["a", "b"]
    finally:
        await raw.close()
        await server.close()
