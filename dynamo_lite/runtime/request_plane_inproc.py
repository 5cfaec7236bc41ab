"""In-process request plane: the NATS plane's semantics without a network (embedded mode, unit tests).

The handler's generator runs in the caller's task; closing the caller's iterator closes the handler's, which
is exactly what a cancel message does over NATS.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from dynamo_lite.protocol import ErrorInfo, EventCallback, Handler, InstanceBusy, StreamError
from dynamo_lite.runtime.streams import error_info_for


class _InProcSubscription:
    def __init__(self, subscribers: list, entry: tuple) -> None:
        self._subscribers = subscribers
        self._entry = entry

    async def unsubscribe(self) -> None:
        if self._entry in self._subscribers:
            self._subscribers.remove(self._entry)


class _InProcServed:
    def __init__(
        self,
        plane: InProcRequestPlane,
        address: str,
        max_inflight: int | None = None,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self._plane = plane
        self._address = address
        self.max_inflight = max_inflight
        self.on_refused = on_refused
        self.inflight = 0
        self.stopped = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def stop(self, drain_s: float = 0.0) -> None:
        self._plane._handlers.pop(self._address, None)
        if drain_s > 0 and self.inflight:
            try:
                await asyncio.wait_for(self._idle.wait(), drain_s)
            except TimeoutError:
                pass
        self.stopped = True  # streams still running past the drain end at their next item, as over NATS


async def _first_item(gen: AsyncIterator[bytes], address: str, first_timeout: float | None) -> bytes:
    """Same contract as NATS: a handler that never answers fails the stream (504), never hangs it."""
    timer = asyncio.timeout(first_timeout)
    try:
        async with timer:
            return await gen.__anext__()
    except TimeoutError:
        if not timer.expired():
            raise  # the handler's own TimeoutError: a handler failure like any other
    raise StreamError(ErrorInfo(504, f"no answer from {address} in {first_timeout:.1f}s", "timeout"))


class InProcRequestPlane:
    """A ``RequestPlane`` whose addresses live in this process."""

    def __init__(self) -> None:
        self._handlers: dict[str, tuple[Handler, _InProcServed]] = {}
        self._subscribers: list[tuple[str, EventCallback]] = []

    async def publish(self, subject: str, payload: bytes) -> None:
        for prefix, callback in list(self._subscribers):
            if subject.startswith(prefix):
                callback(subject, payload)

    async def subscribe(self, prefix: str, callback: EventCallback) -> _InProcSubscription:
        entry = (prefix, callback)
        self._subscribers.append(entry)
        return _InProcSubscription(self._subscribers, entry)

    async def serve(
        self,
        address: str,
        handler: Handler,
        *,
        max_inflight: int | None = None,
        on_refused: Callable[[], None] | None = None,
    ) -> _InProcServed:
        served = _InProcServed(self, address, max_inflight, on_refused)
        self._handlers[address] = (handler, served)
        return served

    async def stream(
        self, address: str, payload: bytes, *, first_timeout: float | None
    ) -> AsyncIterator[bytes]:
        entry = self._handlers.get(address)
        if entry is None:
            raise StreamError(ErrorInfo(503, f"no instance serves {address}", "instance_unavailable"))
        handler, served = entry
        if served.max_inflight is not None and served.inflight >= served.max_inflight:
            if served.on_refused is not None:
                served.on_refused()
            raise InstanceBusy(address)
        served.inflight += 1
        served._idle.clear()
        gen = handler(payload)
        first = True
        try:
            while True:
                try:
                    item = await (_first_item(gen, address, first_timeout) if first else gen.__anext__())
                    first = False
                except StopAsyncIteration:
                    return
                except StreamError:
                    raise
                except Exception as e:  # noqa: BLE001 — the remote side's failure, as NATS would carry it
                    raise StreamError(error_info_for(e)) from e
                if served.stopped:
                    raise StreamError(ErrorInfo(503, f"{address} stopped", "instance_stopped"))
                yield item
        finally:
            await gen.aclose()
            served.inflight -= 1
            if not served.inflight:
                served._idle.set()

    async def close(self) -> None:
        self._handlers.clear()
