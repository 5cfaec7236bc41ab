"""In-process request plane: the ``RequestPlane`` contract without a network (embedded mode, unit tests).

The handler's generator runs in the caller's task; closing the caller's iterator closes the handler's, which
is exactly what a cancel message does over NATS. Acceptance is immediate (no message can be lost), so
``on_ack`` sees every accepted request at once. An instance that goes away while a caller waits on it
(``Served.stop`` past its drain, ``Served.kill``) interrupts that wait: the caller gets ``RequestCancelled`` or
``InstanceLost`` at once, and the handler sees ``CancelledError``, as it would over NATS.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from dynamo_lite.protocol import (
    EventCallback,
    Handler,
    InstanceBusy,
    InstanceLost,
    InstanceUnavailable,
    RequestCancelled,
    RequestTimedOut,
    StreamError,
)
from dynamo_lite.runtime.streams import error_info_for


class _InProcSubscription:
    def __init__(self, subscribers: list, entry: tuple) -> None:
        self._subscribers = subscribers
        self._entry = entry

    async def unsubscribe(self) -> None:
        if self._entry in self._subscribers:
            self._subscribers.remove(self._entry)


class _Call:
    """One open stream, as its instance sees it: whether its caller is waiting on the handler right now (and
    in which task), and the failure to end it with if the instance goes away."""

    __slots__ = ("task", "waiting", "interrupted", "failure")

    def __init__(self) -> None:
        self.task: asyncio.Task | None = None
        self.waiting = False
        self.interrupted = False  # we cancelled ``task`` to deliver ``failure``
        self.failure: StreamError | None = None

    def end(self, failure: StreamError) -> None:
        if self.failure is not None:
            return
        self.failure = failure
        if self.waiting and self.task is not None:
            self.interrupted = True
            self.task.cancel()  # lands in the handler's await: it stops, as a cancelled NATS handler task does


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
        self.calls: set[_Call] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def inflight(self) -> int:
        return len(self.calls)

    def _withdraw(self) -> None:
        entry = self._plane._handlers.get(self._address)
        if entry is not None and entry[1] is self:
            del self._plane._handlers[self._address]

    async def stop(self, drain_s: float = 0.0) -> None:
        self._withdraw()
        if drain_s > 0 and self.calls:
            try:
                await asyncio.wait_for(self._idle.wait(), drain_s)
            except TimeoutError:
                pass
        for call in list(self.calls):
            call.end(RequestCancelled(f"{self._address} stopped"))

    async def kill(self) -> None:
        self._withdraw()
        for call in list(self.calls):
            call.end(InstanceLost(f"instance {self._address} is gone"))


class InProcRequestPlane:
    """A ``RequestPlane`` whose addresses live in this process."""

    def __init__(self) -> None:
        self._handlers: dict[str, tuple[Handler, _InProcServed]] = {}
        self._subscribers: list[tuple[str, EventCallback]] = []
        self.on_ack: Callable[[str, float], None] | None = None
        self.on_reachable: list[Callable[[], None]] = []  # never called: every address is always reachable

    def reachable(self, address: str) -> bool:
        return True

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
            raise InstanceUnavailable(f"no instance serves {address}")
        handler, served = entry
        if served.max_inflight is not None and served.inflight >= served.max_inflight:
            if served.on_refused is not None:
                served.on_refused()
            raise InstanceBusy(address)
        call = _Call()
        served.calls.add(call)
        served._idle.clear()
        if self.on_ack is not None:
            self.on_ack(address, 0.0)
        gen = handler(payload)
        # The first answer within first_timeout (the handler is then cancelled): a 504, never a hang.
        timer: asyncio.Timeout | None = asyncio.timeout(first_timeout)
        try:
            while True:
                if call.failure is not None:
                    raise call.failure
                call.task, call.waiting = asyncio.current_task(), True
                try:
                    if timer is not None:
                        async with timer:
                            item = await gen.__anext__()
                        timer = None
                    else:
                        item = await gen.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if call.interrupted:
                        call.interrupted = False
                        assert call.task is not None and call.failure is not None
                        if call.task.uncancel() == 0:  # ours alone: the instance went away
                            raise call.failure from None
                    raise
                except Exception as e:  # noqa: BLE001 — the handler's failure, typed as NATS would carry it
                    if timer is not None and timer.expired():
                        raise RequestTimedOut(f"no answer from {address} in {first_timeout:.1f}s") from None
                    raise StreamError.from_info(error_info_for(e)) from e
                finally:
                    call.waiting = False
                if call.interrupted:  # the handler swallowed our cancel and answered anyway: too late
                    call.interrupted = False
                    if call.task is not None:
                        call.task.uncancel()
                    continue
                yield item
        finally:
            await gen.aclose()
            served.calls.discard(call)
            if not served.calls:
                served._idle.set()

    async def close(self) -> None:
        """The plane goes away with this process's instances: open streams fail with ``InstanceLost``."""
        for _, served in list(self._handlers.values()):
            await served.kill()
        self._handlers.clear()
