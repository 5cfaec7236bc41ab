"""Admission in isolation: room per instance, the bounded FIFO per (model, role), releases and reports."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from dynamo_lite.placement.admission import Admission
from dynamo_lite.placement.load import LoadTracker
from dynamo_lite.placement.policies import RoundRobin
from dynamo_lite.protocol import (
    ErrorInfo,
    GenerateRequest,
    InstanceInfo,
    LoadReport,
    Overloaded,
    SamplingOptions,
    StreamError,
    encode,
)
from dynamo_lite.router.settings import RouterSettings

MODEL = "m"
REQ = GenerateRequest("r", MODEL, [1, 2, 3], SamplingOptions())


@dataclass
class View:
    """What Admission reads of a ``LiveView``."""

    instances: dict[str, InstanceInfo] = field(default_factory=dict)

    def instances_of(self, component: str, model: str | None = None) -> list[InstanceInfo]:
        return [i for i in self.instances.values() if i.role == component and i.model == model]

    def add(self, iid: str, capacity: int) -> InstanceInfo:
        info = InstanceInfo(iid, "ns", "decode", "generate", f"addr.{iid}", MODEL, max_inflight=capacity)
        self.instances[iid] = info
        return info


def admission(
    view: View,
    load: LoadTracker | None = None,
    depth: int = 8,
    timeout: float = 5.0,
    worker_return: float = 0.0,
) -> Admission:
    return Admission(
        view,  # type: ignore[arg-type]
        load or LoadTracker(RouterSettings().load_report_ttl_s),
        {"decode": RoundRobin()},
        queue_depth=depth,
        queue_timeout_s=timeout,
        retry_after_s=1,
        worker_return_s=worker_return,
    )


async def test_places_where_there_is_room_then_queues_in_arrival_order() -> None:
    view = View()
    a = view.add("a", 1)
    adm = admission(view)
    assert await adm.place("decode", MODEL, REQ) == a
    waiting = [asyncio.create_task(adm.place("decode", MODEL, REQ)) for _ in range(3)]
    await asyncio.sleep(0)
    assert adm.queued() == {MODEL: 3} and not any(w.done() for w in waiting)
    adm.release(a)
    await asyncio.sleep(0)
    assert [w.done() for w in waiting] == [True, False, False]  # the first to come is the first placed
    adm.release(await waiting[0])
    adm.release(await waiting[1])
    adm.release(await waiting[2])
    assert adm.queued() == {MODEL: 0} and not adm.load.local_inflight


async def test_a_started_stream_goes_ahead_and_past_the_depth() -> None:
    view = View()
    a = view.add("a", 1)
    adm = admission(view, depth=1)
    await adm.place("decode", MODEL, REQ)
    new = asyncio.create_task(adm.place("decode", MODEL, REQ))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await adm.place("decode", MODEL, REQ)  # the queue is full for requests that have not started
    started = asyncio.create_task(adm.place("decode", MODEL, REQ, bounded=False))
    await asyncio.sleep(0)
    adm.release(a)
    assert await started == a
    assert not new.done()
    adm.release(a)
    assert await new == a


async def test_other_routers_load_from_reports_takes_room() -> None:
    view = View()
    view.add("a", 2)
    b = view.add("b", 2)
    load = LoadTracker(ttl_s=5.0)
    load._on_report("", encode(LoadReport("a", inflight=2)))  # another frontend fills a
    adm = admission(view, load)
    assert [await adm.place("decode", MODEL, REQ) for _ in range(2)] == [b, b]
    waiting = asyncio.create_task(adm.place("decode", MODEL, REQ))
    await asyncio.sleep(0)
    assert not waiting.done()
    load.on_report = adm.instance_reported
    load._on_report("", encode(LoadReport("a", inflight=1)))  # one of theirs ended: room on a
    assert (await waiting).instance_id == "a"


async def test_a_waiter_that_gives_up_leaves_the_queue() -> None:
    view = View()
    a = view.add("a", 1)
    adm = admission(view, timeout=0.05)
    await adm.place("decode", MODEL, REQ)
    with pytest.raises(Overloaded) as err:
        await adm.place("decode", MODEL, REQ)
    assert err.value.info.status == 503 and err.value.info.code == "queue_timeout"
    left = asyncio.create_task(adm.place("decode", MODEL, REQ))
    await asyncio.sleep(0)
    left.cancel()  # its client left before room came
    placed_as_it_left = asyncio.create_task(adm.place("decode", MODEL, REQ))
    await asyncio.sleep(0)
    adm.release(a)
    placed_as_it_left.cancel()  # placed, then its client left before it ran: the slot must come back
    for task in (left, placed_as_it_left):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert adm.queued() == {MODEL: 0} and not adm.load.local_inflight


async def test_waiters_fail_with_503_when_the_last_instance_goes() -> None:
    view = View()
    view.add("a", 1)
    adm = admission(view)
    await adm.place("decode", MODEL, REQ)
    waiting = asyncio.create_task(adm.place("decode", MODEL, REQ))
    await asyncio.sleep(0)
    view.instances.clear()
    adm.instances_changed()
    with pytest.raises(StreamError) as err:
        await waiting
    assert err.value.info == ErrorInfo(503, "no live decode worker for model 'm'", "no_workers")
    with pytest.raises(StreamError):
        await adm.place("decode", MODEL, REQ)


async def test_a_started_stream_waits_for_a_worker_of_its_role_to_come_back() -> None:
    """The one decode worker died (and restarts): a migrating stream (unbounded) waits for the new instance
    instead of failing; a new request fails at once; without a comeback the wait ends after worker_return_s."""
    view = View()
    view.add("a", 1)
    adm = admission(view, timeout=5.0, worker_return=0.3)
    view.instances.clear()
    adm.instances_changed()
    migrating = asyncio.create_task(adm.place("decode", MODEL, REQ, exclude={"a"}, bounded=False))
    await asyncio.sleep(0.1)
    assert not migrating.done()
    with pytest.raises(StreamError):
        await adm.place("decode", MODEL, REQ)  # not started: no worker, no wait
    b = view.add("b", 1)  # the restarted worker registers
    adm.instances_changed()
    assert await migrating == b
    adm.release(b)
    view.instances.clear()
    adm.instances_changed()
    started = asyncio.get_running_loop().time()
    with pytest.raises(StreamError) as err:
        await adm.place("decode", MODEL, REQ, bounded=False)
    assert err.value.info.code == "no_workers" and asyncio.get_running_loop().time() - started >= 0.25
    assert adm.queued() == {MODEL: 0}


async def test_by_default_a_started_stream_fails_at_once_when_its_role_has_no_worker() -> None:
    """worker_return_s 0 (the default): a migrating stream with no worker of its role left gets its 503 at
    once, never a silent wait."""
    view = View()
    view.add("a", 1)
    adm = admission(view)
    view.instances.clear()
    adm.instances_changed()
    with pytest.raises(StreamError) as err:
        await asyncio.wait_for(adm.place("decode", MODEL, REQ, exclude={"a"}, bounded=False), 0.5)
    assert err.value.info.code == "no_workers"
    assert not any(adm.queued().values())  # nothing left waiting


async def test_an_instance_that_refused_counts_as_full_until_it_reports() -> None:
    view = View()
    a = view.add("a", 4)
    load = LoadTracker(ttl_s=5.0)
    adm = admission(view, load)
    load.on_report = adm.instance_reported
    await adm.place("decode", MODEL, REQ)
    adm.release(a, refused=True)  # InstanceBusy: another frontend got there first
    waiting = asyncio.create_task(adm.place("decode", MODEL, REQ))
    await asyncio.sleep(0)
    assert not waiting.done()
    load._on_report("", encode(LoadReport("a", inflight=3)))
    assert await waiting == a


@dataclass
class Plane:
    """What Admission reads of a ``RequestPlane``: which addresses it can reach now."""

    down: set[str] = field(default_factory=set)
    on_reachable: list = field(default_factory=list)

    def reachable(self, address: str) -> bool:
        return address not in self.down

    def back(self) -> None:
        self.down.clear()
        for callback in self.on_reachable:
            callback()


async def test_while_the_request_plane_cannot_reach_an_instance_requests_wait_within_the_limits() -> None:
    """A NATS outage: the instances are still in discovery but unreachable; requests wait (bounded by the queue's
    depth and wait, as for room) and are placed once the plane says they are reachable again."""
    view = View()
    a, b = view.add("a", 0), view.add("b", 0)
    plane = Plane({a.address, b.address})
    adm = Admission(
        view,  # type: ignore[arg-type]
        LoadTracker(RouterSettings().load_report_ttl_s),
        {"decode": RoundRobin()},
        queue_depth=2,
        queue_timeout_s=5.0,
        retry_after_s=1,
        plane=plane,  # type: ignore[arg-type]
    )
    waiting = [asyncio.create_task(adm.place("decode", MODEL, REQ)) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert adm.queued() == {MODEL: 2} and not any(w.done() for w in waiting)
    with pytest.raises(Overloaded) as full:  # the queue's limits still hold
        await adm.place("decode", MODEL, REQ)
    assert full.value.info.status == 429
    plane.back()
    assert {(await w).instance_id for w in waiting} <= {"a", "b"}
    assert adm.queued() == {MODEL: 0}
