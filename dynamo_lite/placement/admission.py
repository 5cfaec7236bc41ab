"""Admission: a request waits at the frontend, per model, until an instance of the role it needs has room.

An instance's room is its capacity (its worker's ``max_inflight``, registered in discovery; 0 = unbounded) less
what is in flight there: this router's own requests (counted from placement to release) plus other routers'
(from the instance's load reports, less ours at the time of the report). A worker that refuses anyway
(``InstanceBusy``: another frontend got there first) counts as full until it reports again.

Waiting requests are placed in arrival order, per (model, role), as room appears: one of our requests ends, a
load report comes, an instance joins. A request finding ``queue_depth`` requests of its model already waiting,
or waiting longer than ``queue_timeout_s``, is refused with ``Overloaded`` (429 or 503, with Retry-After),
which the frontend answers before any byte of a response.

A started stream (its worker died and it migrates; placed unbounded) whose role has no live instance at all waits
up to ``worker_return_s`` (0 by default: not at all) for one to (re)appear — a restarted worker, e.g. the one
decode worker of a 1P+1D GPU — instead of failing at once; a request that has not started fails at once (503
``no_workers``).

An instance the request plane can't reach now (``RequestPlane.reachable``: NATS is down, or just back and the
instance not heard from again) has no room: during a request-plane outage requests wait here, within the same
limits, and are placed once it is back (``on_reachable``) instead of failing at once.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Collection
from dataclasses import dataclass

from dynamo_lite.placement.load import LoadTracker
from dynamo_lite.placement.policies import Policy
from dynamo_lite.protocol import (
    ErrorInfo,
    GenerateRequest,
    InstanceInfo,
    Overloaded,
    RequestPlane,
    Role,
    StreamError,
)
from dynamo_lite.runtime.registry import LiveView


@dataclass(slots=True, eq=False)
class _Waiter:
    role: Role
    request: GenerateRequest
    exclude: Collection[str]
    future: asyncio.Future[InstanceInfo]
    queued: bool = True
    patient: bool = False  # a started stream: waits for a worker of its role to come back (bounded)
    orphan_deadline: float | None = None  # loop time at which a patient waiter stops waiting for a worker


class Admission:
    """Places requests on instances with room, or queues them (bounded) until one has room."""

    def __init__(
        self,
        view: LiveView,
        load: LoadTracker,
        policies: dict[Role, Policy],
        *,
        queue_depth: int,
        queue_timeout_s: float,
        retry_after_s: int,
        plane: RequestPlane | None = None,
        worker_return_s: float = 0.0,
    ) -> None:
        self.view = view
        self._reachable = plane.reachable if plane is not None else None
        if plane is not None:
            plane.on_reachable.append(self.dispatch_all)
        self.load = load
        self.policies = policies
        self.queue_depth = queue_depth
        self.queue_timeout_s = queue_timeout_s
        self.worker_return_s = worker_return_s
        self.retry_after_s = retry_after_s
        self._queues: dict[tuple[str, str], deque[_Waiter]] = {}
        self._waiting: defaultdict[str, int] = defaultdict(int)  # model → requests waiting (all roles)

    def queued(self) -> dict[str, int]:
        """Requests waiting for an instance, per model (models that ever queued stay, at 0)."""
        return dict(self._waiting)

    def refusal(self, models: Collection[str]) -> Overloaded | None:
        """What any new request would be told, whatever its model, when the queue of every one of ``models`` is
        full (429 ``queue_full``); None while some request could still be taken."""
        if not models or any(self._waiting[m] < self.queue_depth for m in models):
            return None
        return Overloaded(
            ErrorInfo(
                429,
                f"every model's queue of requests waiting for a worker is full (--queue-depth "
                f"{self.queue_depth}); retry later",
                "queue_full",
            ),
            self.retry_after_s,
        )

    def has_room(self, instance: InstanceInfo) -> bool:
        iid = instance.instance_id
        if self.load.is_full(iid):
            return False
        if self._reachable is not None and not self._reachable(instance.address):
            return False
        if instance.max_inflight <= 0:
            return True
        return self.load.local_inflight.get(iid, 0) + self.load.others(iid) < instance.max_inflight

    def _choose(
        self, role: Role, model: str, request: GenerateRequest, exclude: Collection[str]
    ) -> InstanceInfo | None:
        candidates = [
            i
            for i in self.view.instances_of(role, model)
            if i.instance_id not in exclude and self.has_room(i)
        ]
        return self.policies[role].pick(candidates, request) if candidates else None

    async def place(
        self,
        role: Role,
        model: str,
        request: GenerateRequest,
        exclude: Collection[str] = (),
        *,
        bounded: bool = True,
    ) -> InstanceInfo:
        """An instance of ``role`` for ``request``, reserved for it until ``release``; waits for room.

        ``bounded``: the queue's depth and wait limits apply (``Overloaded``). A request whose client already
        has bytes of its answer is placed unbounded: it waits, rather than fail a started stream, and goes
        ahead of the requests that have not started.
        Raises ``StreamError`` 503 when no instance of the role exists.
        """
        queue = self._queues.get((model, role))
        if not queue or not bounded:
            chosen = self._choose(role, model, request, exclude)
            if chosen is not None:
                self.load.started(chosen.instance_id)
                return chosen
        orphan = not any(i.instance_id not in exclude for i in self.view.instances_of(role, model))
        if orphan and (bounded or self.worker_return_s <= 0):
            raise StreamError(ErrorInfo(503, f"no live {role} worker for model {model!r}", "no_workers"))
        if bounded and self._waiting[model] >= self.queue_depth:
            raise Overloaded(
                ErrorInfo(
                    429,
                    f"{self._waiting[model]} requests for {model!r} already wait for a worker "
                    f"(--queue-depth {self.queue_depth}); retry later",
                    "queue_full",
                ),
                self.retry_after_s,
            )
        waiter = _Waiter(
            role,
            request,
            exclude,
            asyncio.get_running_loop().create_future(),
            patient=not bounded and self.worker_return_s > 0,
        )
        queue = self._queues.setdefault((model, role), deque())
        if orphan:
            self._fail_orphans_later(model, role, [waiter])
        if bounded:
            queue.append(waiter)
        else:
            queue.appendleft(waiter)
        self._waiting[model] += 1
        placed: InstanceInfo | None = None
        try:
            async with asyncio.timeout(self.queue_timeout_s if bounded else None):
                placed = await waiter.future
            return placed
        except TimeoutError:
            raise Overloaded(
                ErrorInfo(
                    503,
                    f"no {role} worker for {model!r} had room within {self.queue_timeout_s:g} s",
                    "queue_timeout",
                ),
                self.retry_after_s,
            ) from None
        finally:
            if placed is None:
                fut = waiter.future
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self.release(fut.result())  # placed just as we gave up
                elif not fut.done():
                    fut.cancel()
                self._unqueue(model, waiter)

    def release(self, instance: InstanceInfo, *, refused: bool = False) -> None:
        """The request placed on ``instance`` ended there: its room goes to the next waiting request.
        ``refused``: the instance refused it for capacity (``InstanceBusy``), so it counts as full for now."""
        self.load.finished(instance.instance_id)
        if refused:
            self.load.mark_full(instance.instance_id)
            # Without a load report (none subscribed, or none coming), look again once the mark has expired.
            asyncio.get_running_loop().call_later(
                self.load.ttl_s + 0.01, self.dispatch, instance.model, instance.role
            )
        else:
            self.dispatch(instance.model, instance.role)

    def dispatch(self, model: str, role: Role) -> None:
        """Place waiting requests of (``model``, ``role``), in arrival order, while an instance has room."""
        queue = self._queues.get((model, role))
        while queue:
            waiter = queue[0]
            if waiter.future.done():  # its task was cancelled and has not run its cleanup yet
                queue.popleft()
                self._dequeued(model, waiter)
                continue
            chosen = self._choose(role, model, waiter.request, waiter.exclude)
            if chosen is None:
                return
            queue.popleft()
            self._dequeued(model, waiter)
            self.load.started(chosen.instance_id)
            waiter.future.set_result(chosen)

    def dispatch_all(self) -> None:
        """Place what now fits, in every queue (instances became reachable)."""
        for model, role in list(self._queues):
            self.dispatch(model, Role(role))

    def instance_reported(self, instance_id: str) -> None:
        """A load report came: its instance may have room now."""
        info = self.view.instances.get(instance_id)
        if info is not None:
            self.dispatch(info.model, info.role)

    def instances_changed(self) -> None:
        """Instances joined or left: place what now fits; fail waiters whose role has no instance left (started
        streams only after ``worker_return_s`` without one: a restarting worker may come back)."""
        for (model, role), queue in list(self._queues.items()):
            if not queue:
                pass
            elif self.view.instances_of(role, model):
                for waiter in queue:  # a worker is back: started streams wait for room as before
                    waiter.orphan_deadline = None
            else:
                self._fail_orphans(model, role)
                self._fail_orphans_later(model, role, [w for w in queue if w.orphan_deadline is None])
            self.dispatch(model, role)

    def _fail_orphans_later(self, model: str, role: Role, waiters: list[_Waiter]) -> None:
        """Give ``waiters`` (started streams whose role just lost its last instance) ``worker_return_s``."""
        if not waiters:
            return
        loop = asyncio.get_running_loop()
        for waiter in waiters:
            waiter.orphan_deadline = loop.time() + self.worker_return_s
        loop.call_later(self.worker_return_s, self._fail_orphans, model, role)

    def _fail_orphans(self, model: str, role: Role) -> None:
        """Fail the waiters of (``model``, ``role``) while it has no live instance: at once those that have not
        started, started streams once their ``orphan_deadline`` has passed."""
        queue = self._queues.get((model, role))
        if not queue or self.view.instances_of(role, model):
            return
        now = asyncio.get_running_loop().time()
        error = StreamError(ErrorInfo(503, f"no live {role} worker for model {model!r}", "no_workers"))
        for waiter in list(queue):
            deadline = waiter.orphan_deadline
            if waiter.patient and (deadline is None or deadline > now + 1e-3):
                continue
            queue.remove(waiter)
            self._dequeued(model, waiter)
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def _dequeued(self, model: str, waiter: _Waiter) -> None:
        if waiter.queued:
            waiter.queued = False
            self._waiting[model] -= 1

    def _unqueue(self, model: str, waiter: _Waiter) -> None:
        if waiter.queued:
            queue = self._queues.get((model, waiter.role))
            if queue is not None:
                try:
                    queue.remove(waiter)
                except ValueError:
                    pass
            self._dequeued(model, waiter)
