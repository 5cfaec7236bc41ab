"""NATS request plane (nats-py): a subject per instance, replies as sequence-numbered frames on an inbox.

The contract it keeps is ``dynamo_lite.protocol.RequestPlane``'s; this is how, on NATS:

Request:   PUB {address} reply={inbox}.{n}        payload = the request bytes
Accepted:  PUB {inbox}.{n}  Frame(-1, ACK), or Frame(-1, BUSY) instead when the instance is at capacity
           (the request was not accepted: ``InstanceBusy``, the caller places it elsewhere or later). The ACK
           waits up to ``Timeouts.ack_delay_s``: a first frame sent before then acknowledges the request itself
           (any frame does, at the caller). Order still holds: before anything else goes to a caller (a frame
           of another request, a BUSY, a probe's ACK), the held ACKs of requests that came earlier go out.
Reply:     PUB {inbox}.{n}  Frame(seq, DATA|END|ERROR, payload)   — ended by END or ERROR
Cancel:    PUB {address}.cancel  payload = {inbox}.{n}   — the server cancels that handler task
Liveness:  PUB dlhb.{address} every heartbeat interval — a stream whose instance falls silent fails (503)
           instead of hanging; a request to an address nobody serves fails at once (NATS "no responders").
Lost:      NATS keeps one publisher's messages in order, and an instance takes its requests in order, so a request
           is known lost (503, retryable) as soon as a later one to the same address is acknowledged. A request
           still unacknowledged after the heartbeat timeout gets such a later one: a probe (header Dl-Probe, only
           acknowledged). Time alone never decides while the instance heartbeats (a burst queues requests for
           seconds at both ends), except past ``Timeouts.ack_s`` (an instance that heartbeats but takes nothing).
Failures:  every publish and flush goes through ``publish_typed``/``sync_with_server``: nats-py's errors
           (closed, disconnected past its buffer, flush timeout, payload too large) become the seam's typed
           ``RequestPlaneDown`` (503, retryable) or a 413; nothing untyped leaves the plane.
Reading:   nats-py's read path is patched for speed where it passes a check at connect (``nats_fast_path``):
           replies, requests and cancels without headers are handled as they are parsed.
Reconnects: NATS core is at-most-once, and a client that loses its server loses what was sent to it
           meanwhile. The caller fails every stream it had in flight the moment its connection drops (their
           replies may be gone; 503, retryable) and cancels them once reconnected, so no worker keeps working for
           nobody. While disconnected no address is ``reachable``; once back (to the same server or, with a
           comma-separated URL, another of the cluster), an address is reachable when its instance has been heard
           from since (a heartbeat: it is back too), or a heartbeat timeout later; ``on_reachable`` says when.
           A server re-sends, once reconnected, the last frame of streams it ended shortly before: an END still
           in the dead socket would otherwise leave its caller waiting behind a live heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
from nats import errors as nats_errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from dynamo_lite import tracing
from dynamo_lite.protocol import (
    PLANE_DOWN,
    ErrorInfo,
    EventCallback,
    Frame,
    FrameKind,
    Handler,
    InstanceBusy,
    InstanceLost,
    InstanceUnavailable,
    RequestCancelled,
    RequestPlaneDown,
    RequestTimedOut,
    StreamError,
    WireError,
    decode,
    encode,
)
from dynamo_lite.runtime.config import RuntimeSettings
from dynamo_lite.runtime.nats_fast_path import FastPaths
from dynamo_lite.runtime.streams import error_info_for

log = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "dlhb."
PROBE_HEADER = "Dl-Probe"
# An instance silent for this many heartbeat timeouts (and with no stream open) is forgotten: it is gone.
FORGET_SILENT_AFTER_HEARTBEATS = 60
_ACK = encode(Frame(-1, FrameKind.ACK))
_BUSY = encode(Frame(-1, FrameKind.BUSY))


class _ReplyStream:
    """Client side of one reply stream: frames in arrival order, or a failure."""

    __slots__ = ("address", "n", "started", "got_first", "acked", "_frames", "_waiter", "_error")

    def __init__(self, address: str, n: int, now: float) -> None:
        self.address = address
        self.n = n  # publish order: requests to one address are taken (and acknowledged) in this order
        self.started = now
        self.got_first = False
        self.acked = False
        self._frames: deque[Frame] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: StreamError | None = None

    def put(self, frame: Frame) -> None:
        self.got_first = True
        self._frames.append(frame)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def fail(self, error: StreamError) -> None:
        if self._error is None:
            self._error = error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> Frame:
        while not self._frames:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        return self._frames.popleft()


class _NatsEventSubscription:
    def __init__(self, sub) -> None:  # noqa: ANN001
        self._sub = sub

    async def unsubscribe(self) -> None:
        await _unsubscribe_quietly(self._sub)


class _NatsServed:
    """Server side of one address: a task per request, cancellable, drainable."""

    def __init__(
        self,
        plane: NatsRequestPlane,
        address: str,
        handler: Handler,
        max_inflight: int | None = None,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self._plane = plane
        self._address = address
        self._handler = handler
        self._max_inflight = max_inflight
        self._on_refused = on_refused
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Held ACKs (see the module docstring), in the order their requests came: reply → its send-by timer.
        self._unacked: dict[str, asyncio.TimerHandle] = {}
        self._ack_senders: set[asyncio.Task[None]] = set()  # held ACKs due; requests answered before they run
        self._subs: list = []
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        nc = self._plane.nc
        requests = await subscribe_typed(nc, self._address, self._on_request)
        cancels = await subscribe_typed(nc, self._address + ".cancel", self._on_cancel)
        self._subs += [requests, cancels]
        # Read straight off the connection where the fast path is on (``nats_fast_path``): a request's task
        # starts as its message is parsed, not a loop turn later from the subscription's own task.
        self._plane.fast_paths.route_requests(requests, self._on_request_read)
        self._plane.fast_paths.route(cancels, self._cancel)
        # Until the server has our SUB, a request here gets "no responders"; serving means routable.
        await sync_with_server(nc, self._plane.settings.timeouts.connect_s)
        self._heartbeat = asyncio.create_task(self._beat(), name=f"heartbeat {self._address}")

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    async def _beat(self) -> None:
        subject = HEARTBEAT_PREFIX + self._address
        interval = self._plane.settings.timeouts.heartbeat_interval_s
        while True:
            if self._plane.nc.is_connected:
                try:
                    await publish_typed(self._plane.nc, subject, b"")
                except RequestPlaneDown:  # reconnecting; the next beat will do
                    pass
            await asyncio.sleep(interval)

    async def _on_request(self, msg: Msg) -> None:
        if msg.reply:
            await self._take(msg.reply, msg.data, msg.headers)

    def _on_request_read(self, subject: str, reply: str, data: bytes) -> None:
        """A request without headers, straight from the connection's reader (no awaiting here). The common
        case — room, and the ACK held — starts its task now; the others (an ACK or BUSY to send first) go the
        awaiting way in a task of their own: tasks run in the order they were made, so answers keep the order
        of the requests (no request is taken here before that task ran: nothing frees room meanwhile)."""
        if not reply:
            return
        if self._plane.settings.timeouts.ack_delay_s > 0 and not self._full():
            self._start(reply, data, None)
            return
        task = asyncio.get_running_loop().create_task(self._take(reply, data, None))
        self._ack_senders.add(task)
        task.add_done_callback(self._ack_senders.discard)

    def _full(self) -> bool:
        return self._max_inflight is not None and len(self._tasks) >= self._max_inflight

    async def _take(self, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        # Acknowledge (or refuse) at once, before any work: a request lost on the way (NATS is at-most-once)
        # then fails fast at the caller instead of waiting for a first frame that will never come.
        nc = self._plane.nc
        try:
            if headers and PROBE_HEADER in headers:
                await self._send_held_acks()
                await publish_typed(nc, reply, _ACK)  # only says: every request before it got here
                return
            if self._full():
                await self._send_held_acks()
                await publish_typed(nc, reply, _BUSY)
                if self._on_refused is not None:
                    self._on_refused()
                return
            if self._plane.settings.timeouts.ack_delay_s <= 0:
                await publish_typed(nc, reply, _ACK)
        except RequestPlaneDown as e:  # unacknowledged, it never ran: the caller finds it lost and retries
            log.warning("request on %s dropped: %s", self._address, e)
            return
        self._start(reply, data, headers)

    def _start(self, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        """Run an accepted request in a task of its own (its ACK held, when ``ack_delay_s`` says so)."""
        loop = asyncio.get_running_loop()
        delay = self._plane.settings.timeouts.ack_delay_s
        if delay > 0:
            self._unacked[reply] = loop.call_later(delay, self._ack_due)
        task = loop.create_task(self._run(reply, data, headers))
        self._tasks[reply] = task
        # Not in _run's finally: a task cancelled before its first step never runs its body.
        task.add_done_callback(lambda _, reply=reply: self._tasks.pop(reply, None))

    def _ack_due(self) -> None:
        """A held ACK's time is up (timers fire in the order they were set: the earlier ones are due too)."""
        task = asyncio.get_running_loop().create_task(self._send_held_acks())
        self._ack_senders.add(task)
        task.add_done_callback(self._ack_senders.discard)

    async def _send_held_acks(self, upto: str | None = None) -> None:
        """Send the held ACKs, in order: all of them, or those of requests that came before ``upto`` — whose
        own first frame is about to go out and acknowledges it (its held ACK is dropped)."""
        if not self._unacked:
            return
        due: list[str] = []
        for reply in list(self._unacked):  # taken at once, so a concurrent sender never repeats one
            self._unacked.pop(reply).cancel()
            if reply == upto:
                break
            due.append(reply)
        for reply in due:
            try:
                await publish_typed(self._plane.nc, reply, _ACK)
            except RequestPlaneDown:  # its caller finds it lost (or hears its frames, once we are back)
                pass

    async def _on_cancel(self, msg: Msg) -> None:
        self._cancel(msg.subject, msg.data)

    def _cancel(self, subject: str, data: bytes) -> None:
        task = self._tasks.get(data.decode(errors="replace"))
        if task is not None:
            task.cancel()

    async def _run(self, reply: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        tracing.attach_headers(headers)  # the caller's trace continues here (W3C traceparent)
        nc = self._plane.nc

        async def publish(subject: str, frame: bytes) -> None:
            if self._unacked:  # earlier requests' ACKs first; this request's own is this frame
                await self._send_held_acks(upto=reply)
            await publish_typed(nc, subject, frame)

        seq = 0
        gen = self._handler(payload)
        try:
            async for item in gen:
                await publish(reply, encode(Frame(seq, FrameKind.DATA, item)))
                seq += 1
            end = encode(Frame(seq, FrameKind.END))
            await publish(reply, end)
            self._plane.remember_last_frame(reply, end)
        except asyncio.CancelledError:
            if self._stopping:  # shut down past the drain: the caller is still there and hears it at once
                with contextlib.suppress(StreamError):
                    info = RequestCancelled(f"{self._address} stopped").info
                    await publish(reply, encode(Frame(seq, FrameKind.ERROR, encode(info))))
            # else the caller went away (cancel message): nobody to answer
        except Exception as e:  # noqa: BLE001 — every failure travels as an ERROR frame, never silence
            error = encode(Frame(seq, FrameKind.ERROR, encode(error_info_for(e))))
            self._plane.remember_last_frame(reply, error)
            try:
                await publish(reply, error)
            except StreamError:  # NATS is down: re-sent on reconnect, else the caller's liveness
                pass
        finally:
            held = self._unacked.pop(reply, None)  # ended with nothing sent (cancelled): no ACK needed now
            if held is not None:
                held.cancel()
            await gen.aclose()

    async def stop(self, drain_s: float = 0.0) -> None:
        """Stop taking requests; let in-flight ones finish for up to ``drain_s``; cancel the rest."""
        for sub in self._subs[:1]:
            self._plane.fast_paths.unroute(sub)
            await _unsubscribe_quietly(sub)
        if self._plane.nc.is_connected:
            with contextlib.suppress(RequestPlaneDown):  # once the server has our UNSUB, new requests: 503
                await sync_with_server(self._plane.nc, 1.0)
        if drain_s > 0 and self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=drain_s)
        self._stopping = True
        for task in list(self._tasks.values()):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=2.0)
        for sub in self._subs[1:]:
            self._plane.fast_paths.unroute(sub)
            await _unsubscribe_quietly(sub)
        if self._heartbeat:
            self._heartbeat.cancel()

    async def kill(self) -> None:
        """Go away at once, saying nothing: no heartbeat, no frame; callers find out by liveness."""
        for held in self._unacked.values():
            held.cancel()
        self._unacked.clear()
        if self._heartbeat:
            self._heartbeat.cancel()
        for sub in self._subs:
            self._plane.fast_paths.unroute(sub)
            await _unsubscribe_quietly(sub)
        for task in list(self._tasks.values()):
            task.cancel()  # not stopping: no ERROR frame goes out


async def sync_with_server(nc: NatsClient, flush_timeout_s: float) -> None:
    """Return once the server has processed every command we sent before (SUB, UNSUB).

    nats-py writes a flush's PING straight to the socket, ahead of commands still in its buffer, so one PONG
    does not cover them; by the time it arrives the buffer has been written, and a second PING/PONG does.
    """
    try:
        await nc.flush(timeout=flush_timeout_s)
        await nc.flush(timeout=flush_timeout_s)
    except (nats_errors.Error, OSError) as e:
        raise RequestPlaneDown(f"NATS did not confirm our subscriptions: {_describe(e)}") from e


async def publish_typed(
    nc: NatsClient, subject: str, payload: bytes, reply: str = "", headers: dict[str, str] | None = None
) -> None:
    """``nc.publish``, its failures typed: ``RequestPlaneDown`` when NATS can't take the message now (closed,
    draining, disconnected with its reconnect buffer full), a 413 ``StreamError`` when it is too large."""
    try:
        await nc.publish(subject, payload, reply=reply, headers=headers)
    except nats_errors.MaxPayloadError as e:
        raise StreamError(
            ErrorInfo(
                413, f"a message of {len(payload)} bytes exceeds the NATS max payload", "request_too_large"
            )
        ) from e
    except (nats_errors.Error, OSError) as e:
        raise RequestPlaneDown(f"NATS refused a message to {subject}: {_describe(e)}") from e


async def subscribe_typed(nc: NatsClient, subject: str, cb: Callable[[Msg], Any]) -> Any:
    """``nc.subscribe``, its failures typed (``RequestPlaneDown``)."""
    try:
        return await nc.subscribe(subject, cb=cb)
    except (nats_errors.Error, OSError) as e:
        raise RequestPlaneDown(f"NATS refused a subscription to {subject}: {_describe(e)}") from e


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def _unsubscribe_quietly(sub) -> None:  # noqa: ANN001
    try:
        await sub.unsubscribe()
    except Exception:  # noqa: BLE001
        pass


def _tls_context(settings: RuntimeSettings) -> ssl.SSLContext | None:
    if not (settings.nats_tls_ca or settings.nats_tls_cert):
        return None
    ctx = ssl.create_default_context(cafile=settings.nats_tls_ca or None)
    if settings.nats_tls_cert:
        ctx.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key or None)
    return ctx


class NatsRequestPlane:
    """A ``RequestPlane`` over NATS. Use ``await NatsRequestPlane.connect(settings)``."""

    def __init__(
        self, nc: NatsClient, settings: RuntimeSettings, fast_paths: FastPaths | None = None
    ) -> None:
        self.nc = nc
        self.settings = settings
        self._fast_paths = fast_paths if fast_paths is not None else FastPaths(nc)
        self._inbox = nc.new_inbox()
        self._streams: dict[str, _ReplyStream] = {}
        self._last_seen: dict[str, float] = {}
        self._acked_upto: dict[str, int] = {}  # address → the latest request (publish order) it acknowledged
        self._probes: dict[str, tuple[str, int]] = {}  # reply subject → (address, n) of probes in flight
        self._probed: dict[str, tuple[int, float]] = {}  # address → (n, time) of its latest probe
        # Observer of acknowledgement latency (address, seconds from publish to ACK/BUSY seen): benchmarks.
        self.on_ack: Callable[[str, float], None] | None = None
        self._ids = itertools.count()
        self._loop_time = asyncio.get_running_loop().time
        self._served: list[_NatsServed] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list = []
        # (time, reply, last frame) of streams this process ended, to re-send after a reconnect
        self._recent_ends: deque[tuple[float, str, bytes]] = deque()
        self._cancel_on_reconnect: list[tuple[str, str]] = []  # (address, reply) of streams failed while down
        self._reconnected_at: float | None = None
        self.on_reachable: list[Callable[[], None]] = []

    @classmethod
    async def connect(cls, settings: RuntimeSettings, name: str = "dynamo_lite") -> NatsRequestPlane:
        events = _ConnectionEvents()
        kwargs: dict = {
            "servers": [s.strip() for s in settings.nats_url.split(",") if s.strip()],
            "name": name,
            "connect_timeout": settings.timeouts.connect_s,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": settings.timeouts.nats_reconnect_wait_s,
            "ping_interval": settings.timeouts.nats_ping_interval_s,
            "max_outstanding_pings": 3,
            "error_cb": _log_error,
            "disconnected_cb": events.disconnected,
            "reconnected_cb": events.reconnected,
        }
        if settings.nats_user:
            kwargs.update(user=settings.nats_user, password=settings.nats_password)
        if settings.nats_token:
            kwargs["token"] = settings.nats_token
        tls = _tls_context(settings)
        if tls is not None:
            kwargs["tls"] = tls
        try:
            nc = await asyncio.wait_for(nats.connect(**kwargs), settings.timeouts.connect_s + 1)
        except Exception as e:  # noqa: BLE001
            raise ConnectionError(f"NATS unreachable at {settings.nats_url}: {e!r}") from e
        fast_paths = await FastPaths.install(nc, settings.nats_fast_path, settings.timeouts.connect_s)
        self = cls(nc, settings, fast_paths)
        events.plane = self
        inbox = await subscribe_typed(nc, self._inbox + ".*", self._on_reply)
        self._subs.append(inbox)
        fast_paths.route(inbox, self._reply)
        self._subs.append(await subscribe_typed(nc, HEARTBEAT_PREFIX + ">", self._on_heartbeat))
        self._tasks.append(asyncio.create_task(self._monitor(), name="nats-stream-monitor"))
        return self

    @property
    def read_path(self) -> str:
        """How this connection reads messages: "fast" (nats-py patched, checked at connect) or "standard"."""
        return self._fast_paths.read_path

    @property
    def fast_paths(self) -> FastPaths:
        return self._fast_paths

    # ---- reconnects ----------------------------------------------------------------------------------------
    def on_disconnected(self) -> None:
        """Our server is gone: replies published to us from now until we are back are lost, so every stream
        in flight fails now (retryable) rather than wait behind live heartbeats for frames that never come."""
        for stream in list(self._streams.values()):
            stream.fail(
                InstanceLost("lost the connection to NATS; replies sent meanwhile are lost", PLANE_DOWN)
            )

    def reachable(self, address: str) -> bool:
        if not self.nc.is_connected:
            return False
        back_at = self._reconnected_at
        if back_at is None or self._loop_time() - back_at > self.settings.timeouts.heartbeat_s:
            return True
        return self._last_seen.get(address, -1.0) >= back_at

    def _heard(self, address: str, now: float) -> None:
        """A message from ``address``'s instance (heartbeat, frame): it is alive, and reachable if it is the
        first since a reconnect."""
        before = self._last_seen.get(address, -1.0)
        self._last_seen[address] = now
        back_at = self._reconnected_at
        if back_at is not None and before < back_at <= now:
            self._notify_reachable()

    def _notify_reachable(self) -> None:
        for callback in list(self.on_reachable):
            try:
                callback()
            except Exception:  # noqa: BLE001 — an observer's failure must not stop the read loop
                log.exception("on_reachable callback failed")

    async def on_reconnected(self) -> None:
        self._reconnected_at = self._loop_time()
        # Addresses never heard from again become reachable after a heartbeat timeout: look again then.
        asyncio.get_running_loop().call_later(
            self.settings.timeouts.heartbeat_s + 0.01, self._notify_reachable
        )
        pending, self._cancel_on_reconnect = self._cancel_on_reconnect, []
        for address, reply in pending:  # the workers still serving them stop now
            with contextlib.suppress(StreamError):
                await publish_typed(self.nc, address + ".cancel", reply.encode())
        horizon = self._loop_time() - self.settings.timeouts.heartbeat_s * 4
        for at, reply, frame in list(self._recent_ends):
            if at >= horizon:
                with contextlib.suppress(StreamError):
                    await publish_typed(self.nc, reply, frame)

    def remember_last_frame(self, reply: str, frame: bytes) -> None:
        """Keep a stream's END/ERROR for a few heartbeat timeouts, to re-send after a reconnect (the caller
        ignores it if it already has it)."""
        now = self._loop_time()
        self._recent_ends.append((now, reply, frame))
        horizon = now - self.settings.timeouts.heartbeat_s * 4
        while self._recent_ends and self._recent_ends[0][0] < horizon:
            self._recent_ends.popleft()

    # ---- server side -------------------------------------------------------------------------------------
    async def serve(
        self,
        address: str,
        handler: Handler,
        *,
        max_inflight: int | None = None,
        on_refused: Callable[[], None] | None = None,
    ) -> _NatsServed:
        served = _NatsServed(self, address, handler, max_inflight, on_refused)
        await served.start()
        self._served.append(served)
        return served

    # ---- events --------------------------------------------------------------------------------------------
    async def publish(self, subject: str, payload: bytes) -> None:
        """Events are periodic: one published while NATS is disconnected is dropped."""
        if self.nc.is_connected:
            await publish_typed(self.nc, subject, payload)

    async def subscribe(self, prefix: str, callback: EventCallback) -> _NatsEventSubscription:
        async def on_msg(msg: Msg) -> None:
            callback(msg.subject, msg.data)

        # NATS subjects are dot-separated tokens: "a.b." + ">" matches everything below "a.b".
        sub = await subscribe_typed(self.nc, prefix.rstrip(".") + ".>", on_msg)
        await sync_with_server(self.nc, self.settings.timeouts.connect_s)
        return _NatsEventSubscription(sub)

    # ---- client side -------------------------------------------------------------------------------------
    def _acknowledged(self, address: str, n: int, started: float | None) -> None:
        if n > self._acked_upto.get(address, -1):
            self._acked_upto[address] = n
        now = self._loop_time()
        self._heard(address, now)  # a frame is as good as a heartbeat: under load heartbeats queue
        if self.on_ack is not None and started is not None:
            self.on_ack(address, now - started)

    async def _on_reply(self, msg: Msg) -> None:
        self._reply(msg.subject, msg.data, msg.headers)

    def _reply(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        """A message on our inbox: a frame of a stream, an answer to a probe, or NATS's "no responders"."""
        stream = self._streams.get(subject)
        if stream is None:
            probe = self._probes.pop(subject, None)
            if probe is not None and not (headers and headers.get("Status") == "503"):
                self._acknowledged(probe[0], probe[1], None)
            return  # else a late frame of a stream we already left
        if headers and headers.get("Status") == "503":
            stream.fail(InstanceUnavailable(f"no instance serves {stream.address}"))
            return
        try:
            frame = decode(data, Frame)
        except WireError as e:
            stream.fail(StreamError(ErrorInfo(502, f"bad frame from {stream.address}: {e}", "bad_frame")))
            return
        if not stream.acked:
            stream.acked = True
            self._acknowledged(stream.address, stream.n, stream.started)
        else:
            self._heard(stream.address, self._loop_time())
        if frame.kind == FrameKind.BUSY:
            stream.fail(InstanceBusy(stream.address))
        elif frame.seq >= 0:  # ACK (and a newer sender's kind outside the numbering) says nothing more
            stream.put(frame)

    async def _on_heartbeat(self, msg: Msg) -> None:
        self._heard(msg.subject[len(HEARTBEAT_PREFIX) :], self._loop_time())

    async def _monitor(self) -> None:
        """Fail streams whose instance went silent or lost their request (never a hang)."""
        interval = self.settings.timeouts.heartbeat_interval_s / 2
        silence = self.settings.timeouts.heartbeat_s
        ack_timeout = max(self.settings.timeouts.ack_s, silence)
        loop = asyncio.get_running_loop()
        woke = forgot_at = loop.time()
        forget_after = silence * FORGET_SILENT_AFTER_HEARTBEATS
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            lag, woke = now - woke - interval, now
            if lag > silence / 2:
                # This process itself fell behind (a saturated event loop): heartbeats waiting in our socket
                # buffer are not evidence of a dead instance. Judge again once we have caught up.
                continue
            self._forget_stale_probes(now, ack_timeout)
            if now - forgot_at > forget_after:
                forgot_at = now
                self._forget_silent(now - forget_after)
            for stream in list(self._streams.values()):
                seen = max(self._last_seen.get(stream.address, 0.0), stream.started)
                if now - seen > silence:
                    stream.fail(InstanceLost(f"instance {stream.address} stopped responding"))
                elif not stream.acked:
                    waited = now - stream.started
                    if self._acked_upto.get(stream.address, -1) > stream.n or waited > ack_timeout:
                        stream.fail(
                            InstanceUnavailable(f"instance {stream.address} did not receive the request")
                        )
                    elif waited > silence and self.nc.is_connected:
                        await self._probe(stream.address, stream.n, now, silence)
                elif not self.nc.is_connected and now - stream.started > silence:
                    stream.fail(InstanceLost("request plane disconnected", PLANE_DOWN))

    async def _probe(self, address: str, after: int, now: float, every: float) -> None:
        """Send ``address`` a request that is only acknowledged: once it is, every request published to
        ``address`` before it has been taken or lost. One probe per address in flight (re-sent every
        ``every`` seconds while unanswered)."""
        last = self._probed.get(address)
        if last is not None and last[0] > after and now - last[1] < every:
            return
        n = next(self._ids)
        reply = f"{self._inbox}.{n}"
        self._probes[reply] = (address, n)
        self._probed[address] = (n, now)
        try:
            await publish_typed(self.nc, address, b"", reply, {PROBE_HEADER: "1"})
        except StreamError:  # reconnecting: the next pass probes again
            self._probes.pop(reply, None)

    def _forget_stale_probes(self, now: float, ack_timeout: float) -> None:
        for reply, (address, n) in list(self._probes.items()):
            sent = self._probed.get(address)
            if sent is None or sent[0] != n or now - sent[1] > ack_timeout:
                del self._probes[reply]

    def _forget_silent(self, before: float) -> None:
        """Drop what is kept of instances silent since ``before`` with no stream open to them: instances come and
        go (restarts, scaling), and a long-running frontend must not keep an entry per instance it ever heard.
        One that is merely partitioned is re-learnt from its next heartbeat."""
        busy = {stream.address for stream in self._streams.values()}
        gone = [a for a, seen in self._last_seen.items() if seen < before and a not in busy]
        for address in gone:
            del self._last_seen[address]
            self._acked_upto.pop(address, None)
            self._probed.pop(address, None)

    def instance_alive(self, address: str) -> bool:
        seen = self._last_seen.get(address)
        return (
            seen is not None
            and asyncio.get_running_loop().time() - seen <= self.settings.timeouts.heartbeat_s
        )

    async def stream(
        self, address: str, payload: bytes, *, first_timeout: float | None
    ) -> AsyncIterator[bytes]:
        if not self.nc.is_connected:
            raise RequestPlaneDown("request plane (NATS) is not connected")
        if len(payload) > self.nc.max_payload:
            raise StreamError(
                ErrorInfo(
                    413,
                    f"request of {len(payload)} bytes exceeds the NATS max payload {self.nc.max_payload}",
                    "request_too_large",
                )
            )
        loop = asyncio.get_running_loop()
        n = next(self._ids)
        reply = f"{self._inbox}.{n}"
        stream = _ReplyStream(address, n, loop.time())
        self._streams[reply] = stream
        finished = False
        expected = 0
        try:
            try:
                await publish_typed(self.nc, address, payload, reply, tracing.headers())
            except StreamError:
                finished = True  # never sent: nothing to cancel
                raise
            while True:
                try:
                    frame = (
                        await asyncio.wait_for(stream.get(), first_timeout)
                        if not stream.got_first
                        else await stream.get()
                    )
                except InstanceBusy:
                    finished = True  # refused: nothing runs there, nothing to cancel
                    raise
                except TimeoutError:
                    raise RequestTimedOut(f"no answer from {address} in {first_timeout:.1f}s") from None
                if frame.seq != expected:
                    raise InstanceLost(
                        f"frame {frame.seq} from {address}, expected {expected}", "frame_lost", 502
                    )
                expected += 1
                if frame.kind == FrameKind.DATA:
                    yield frame.payload
                elif frame.kind == FrameKind.END:
                    finished = True
                    return
                elif frame.kind == FrameKind.ERROR:
                    finished = True
                    raise StreamError.from_info(decode(frame.payload, ErrorInfo))
                # else a kind from a newer sender: it only adds information, skipped
        finally:
            self._streams.pop(reply, None)
            if not finished:
                if self.nc.is_connected:
                    try:
                        await publish_typed(self.nc, address + ".cancel", reply.encode())
                    except StreamError:  # the instance cleans up via its own liveness paths
                        pass
                else:
                    self._cancel_on_reconnect.append((address, reply))

    async def close(self) -> None:
        for served in self._served:
            await served.stop()
        for task in self._tasks:
            task.cancel()
        for sub in self._subs:
            await _unsubscribe_quietly(sub)
        try:
            await asyncio.wait_for(self.nc.close(), self.settings.timeouts.close_s)
        except Exception:  # noqa: BLE001
            pass


async def _log_error(e: Exception) -> None:
    log.warning("NATS: %s", e)


class _ConnectionEvents:
    """nats-py's connection callbacks, forwarded to the plane once it exists."""

    def __init__(self) -> None:
        self.plane: NatsRequestPlane | None = None

    async def disconnected(self) -> None:
        log.warning("NATS disconnected; reconnecting")
        if self.plane is not None:
            self.plane.on_disconnected()

    async def reconnected(self) -> None:
        log.warning("NATS reconnected")
        if self.plane is not None:
            await self.plane.on_reconnected()
