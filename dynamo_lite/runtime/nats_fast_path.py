"""nats-py's read path made cheaper per streamed token, and checked by behaviour before it is used.

Two patches of nats-py 2.x internals, both per connection:

- the parser: ``FastParser`` (``nats_parser.py``) takes over the connection's ``Parser`` in place;
- direct delivery: ``Client._process_msg(sid, subject, reply, data, headers)`` is wrapped so that messages
  without headers of chosen subscriptions (the reply inbox; a worker's requests and cancels) go straight to a
  function as the parser reads them, instead of a ``Msg`` in a queue and a task per subscription that awaits its
  callback (one event-loop turn and a task switch less per message).

Names prove nothing: a release may keep them and change what they mean. So ``FastPaths.install`` sends one
message through each path on a private subject — a plain one delivered directly, one with a reply subject
delivered directly with it, a plain one to an ordinary subscription (our parser, then nats-py's
``_process_msg``), one with headers (nats-py's parser, which ours hands over to) — and checks each arrives intact
by the way it should. If one does not, every patch is undone, the fallback is logged, and the connection reads
messages nats-py's own way. ``RuntimeSettings.nats_fast_path`` (``DYNAMO_LITE_NATS_FAST_PATH=0``) leaves them
off; ``read_path`` says which way runs (a metric exports it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.client import __version__ as nats_version
from nats.aio.msg import Msg
from nats.protocol.parser import Parser
from prometheus_client import CollectorRegistry, Gauge

from dynamo_lite.runtime.nats_parser import FastParser

log = logging.getLogger(__name__)

Deliver = Callable[[str, bytes], None]
DeliverRequest = Callable[[str, str, bytes], None]
"""Takes ``(subject, reply, data)``: a message someone expects an answer to."""
FAST, STANDARD = "fast", "standard"
# A payload that would trip a parser reading by lines instead of by size.
_CHECK_PAYLOAD = b"MSG x 1 2\r\n\x00fast path check\r\n"
_CHECK_HEADERS = {"Dl-Check": "1"}


class FastPaths:
    """The fast paths of one nats-py connection: ``await FastPaths.install(nc, enabled, timeout_s)``."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._routes: dict[int, Deliver] = {}
        self._request_routes: dict[int, DeliverRequest] = {}
        self.active = False

    @property
    def read_path(self) -> str:
        return FAST if self.active else STANDARD

    @classmethod
    async def install(cls, nc: NatsClient, enabled: bool, timeout_s: float) -> FastPaths:
        """Patch ``nc`` and check the patches by behaviour; on any failure undo them and log why."""
        paths = cls(nc)
        if not enabled:
            log.info("NATS fast paths off (DYNAMO_LITE_NATS_FAST_PATH=0): nats-py reads messages its own way")
            return paths
        failure = paths._patch()
        if failure is None:
            failure = await paths._check(timeout_s)
        if failure is not None:
            paths._unpatch()
            log.warning(
                "NATS fast paths fail their check with nats-py %s (%s): falling back to nats-py's own read path",
                nats_version,
                failure,
            )
        return paths

    def route(self, sub: Any, deliver: Deliver) -> bool:
        """Hand ``sub``'s messages without headers to ``deliver(subject, data)`` as the parser reads them;
        messages with headers (NATS's status replies) keep ``sub``'s callback. False (nothing changed) while
        the fast paths are off."""
        sid = getattr(sub, "_id", None)
        if not self.active or not isinstance(sid, int):
            return False
        self._routes[sid] = deliver
        return True

    def route_requests(self, sub: Any, deliver: DeliverRequest) -> bool:
        """As ``route``, for messages that carry a reply subject: ``deliver(subject, reply, data)``."""
        sid = getattr(sub, "_id", None)
        if not self.active or not isinstance(sid, int):
            return False
        self._request_routes[sid] = deliver
        return True

    def unroute(self, sub: Any) -> None:
        """Stop delivering ``sub``'s messages directly (before unsubscribing it: messages already read would
        still arrive)."""
        sid = getattr(sub, "_id", None)
        self._routes.pop(sid, None)  # type: ignore[arg-type]
        self._request_routes.pop(sid, None)  # type: ignore[arg-type]

    def _patch(self) -> str | None:
        nc = self._nc
        parser = getattr(nc, "_ps", None)
        process_msg = getattr(nc, "_process_msg", None)
        if type(parser) is not Parser:
            return f"the connection's parser is {type(parser).__name__}, not nats.protocol.parser.Parser"
        if process_msg is None:
            return "nats-py has no Client._process_msg"
        routes, request_routes = self._routes, self._request_routes

        async def fast_process_msg(
            sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
        ) -> None:
            if not headers:
                deliver = routes.get(sid)
                try:
                    if deliver is not None:
                        deliver(subject.decode(), data)
                        return
                    take = request_routes.get(sid)
                    if take is not None:
                        take(subject.decode(), reply.decode(), data)
                        return
                except Exception:  # as nats-py does with a callback's error: the read loop must go on
                    log.exception("direct delivery on %r failed", subject)
                    return
            await process_msg(sid, subject, reply, data, headers)

        parser.__class__ = FastParser
        nc._process_msg = fast_process_msg  # type: ignore[method-assign]
        self.active = True
        return None

    def _unpatch(self) -> None:
        nc = self._nc
        if type(getattr(nc, "_ps", None)) is FastParser:
            nc._ps.__class__ = Parser  # the state fields are shared: it goes on where ours stopped
        nc.__dict__.pop("_process_msg", None)
        self._routes.clear()
        self._request_routes.clear()
        self.active = False

    async def _check(self, timeout_s: float) -> str | None:
        """One message through each path (see the module docstring); None if all arrived as they should."""
        nc = self._nc
        loop = asyncio.get_running_loop()
        subject = nc.new_inbox()
        direct: asyncio.Future[tuple[str, bytes]] = loop.create_future()
        request: asyncio.Future[tuple[str, str, bytes]] = loop.create_future()
        plain: asyncio.Future[tuple[str, bytes, Any]] = loop.create_future()
        with_headers: asyncio.Future[tuple[str, bytes, Any]] = loop.create_future()

        def on_direct(subj: str, data: bytes) -> None:
            if not direct.done():
                direct.set_result((subj, data))

        def on_request(subj: str, reply: str, data: bytes) -> None:
            if not request.done():
                request.set_result((subj, reply, data))

        async def on_msg(msg: Msg) -> None:
            future = with_headers if msg.headers else plain
            if not future.done():
                future.set_result((msg.subject, msg.data, msg.headers))

        parsed_before = getattr(nc._ps, "fast_messages", 0)
        routed = await nc.subscribe(subject + ".direct", cb=on_msg)
        routed_requests = await nc.subscribe(subject + ".request", cb=on_msg)
        ordinary = await nc.subscribe(subject + ".callback", cb=on_msg)
        try:
            if not self.route(routed, on_direct) or not self.route_requests(routed_requests, on_request):
                return "Subscription._id is not the subscription's int sid"
            await nc.publish(subject + ".direct", _CHECK_PAYLOAD)
            await nc.publish(subject + ".request", _CHECK_PAYLOAD, reply=subject + ".reply")
            await nc.publish(subject + ".callback", _CHECK_PAYLOAD)
            await nc.publish(subject + ".callback", _CHECK_PAYLOAD, headers=_CHECK_HEADERS)
            # One publisher's messages are read in order, and direct delivery happens as they are read: once
            # the later ones reached their callbacks, a directly delivered one that is missing never comes.
            await asyncio.wait([plain, with_headers], timeout=timeout_s)
            expected = {
                "a plain message delivered directly": (direct, (subject + ".direct", _CHECK_PAYLOAD)),
                "a message with a reply subject delivered directly": (
                    request,
                    (subject + ".request", subject + ".reply", _CHECK_PAYLOAD),
                ),
                "a plain message to a callback": (plain, (subject + ".callback", _CHECK_PAYLOAD, None)),
                "a message with headers": (
                    with_headers,
                    (subject + ".callback", _CHECK_PAYLOAD, _CHECK_HEADERS),
                ),
            }
            for what, (future, want) in expected.items():
                if not future.done():
                    return f"{what} did not arrive"
                if future.result() != want:
                    return f"{what} arrived as {future.result()!r}"
            if getattr(nc._ps, "fast_messages", 0) <= parsed_before:
                return "the fast parser read no message"
            return None
        except Exception as e:  # noqa: BLE001 — whatever broke, the standard path is the answer
            return f"{type(e).__name__}: {e}"
        finally:
            self.unroute(routed)
            self.unroute(routed_requests)
            for sub in (routed, routed_requests, ordinary):
                try:
                    await sub.unsubscribe()
                except Exception as e:  # noqa: BLE001 — the connection is failing: the caller will see it
                    log.debug("unsubscribing the fast path check failed: %s", e)


def export_read_path(registry: CollectorRegistry, plane: object) -> None:
    """``dynamo_lite_nats_read_path{path}`` in ``registry``: 1 for the way ``plane``'s NATS connection reads
    messages ("fast": our parser and direct delivery; "standard": nats-py's own), 0 for the other. Nothing for
    a plane without NATS."""
    if not hasattr(plane, "read_path"):
        return
    gauge = Gauge(
        "dynamo_lite_nats_read_path",
        "How this process's NATS connection reads messages: fast (patched, checked at start) or standard",
        ["path"],
        registry=registry,
    )
    for path in (FAST, STANDARD):
        gauge.labels(path).set_function(lambda path=path: float(plane.read_path == path))  # type: ignore[attr-defined]
