"""In-memory discovery and the LiveView over it: same semantics as etcd, no services."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

from dynamo_lite.protocol import DiscoveryEvent, InstanceInfo, ModelCard, encode
from dynamo_lite.runtime import keys
from dynamo_lite.runtime.config import RuntimeSettings
from dynamo_lite.runtime.discovery_memory import MemoryDiscovery, MemoryStore
from dynamo_lite.runtime.registry import LiveView, deregister, register
from dynamo_lite.runtime.runtime import Runtime


async def next_event(watch) -> DiscoveryEvent:  # noqa: ANN001
    return await asyncio.wait_for(watch.__anext__(), 1.0)


async def test_put_get_prefix_delete() -> None:
    store = MemoryStore()
    d = MemoryDiscovery(store)
    await d.put("a/1", b"x")
    await d.put("a/2", b"y")
    await d.put("b/1", b"z")
    got = {e.key: e.value for e in await d.get_prefix("a/")}
    assert got == {"a/1": b"x", "a/2": b"y"}
    revisions = [e.revision for e in await d.get_prefix("")]
    assert len(set(revisions)) == 3 and min(revisions) > 0
    await d.delete("a/1")
    assert [e.key for e in await d.get_prefix("a/")] == ["a/2"]
    assert await d.delete_prefix("a/") == 1
    assert [e.key for e in await d.get_prefix("")] == ["b/1"]


async def test_watch_sees_puts_and_deletes_in_order_with_rising_revisions() -> None:
    store = MemoryStore()
    d = MemoryDiscovery(store)
    watch = d.watch_prefix("ns/")
    first = asyncio.ensure_future(watch.__anext__())
    await asyncio.sleep(0)  # the watch is registered on its first step
    await d.put("ns/k", b"1")
    await d.put("other/k", b"ignored")
    await d.put("ns/k", b"2")
    await d.delete("ns/k")
    async with aclosing(watch):
        events = [await asyncio.wait_for(first, 1.0), await next_event(watch), await next_event(watch)]
    assert [(e.key, e.value) for e in events] == [("ns/k", b"1"), ("ns/k", b"2"), ("ns/k", None)]
    assert events[0].revision < events[1].revision < events[2].revision
    assert store._watchers == []  # closing the watch unregisters it


async def test_close_removes_own_keys_only_and_watchers_see_the_deletes() -> None:
    store = MemoryStore()
    mine, theirs = MemoryDiscovery(store), MemoryDiscovery(store)
    await mine.put("ns/mine/1", b"a")
    await mine.put("ns/mine/2", b"b")
    await theirs.put("ns/theirs", b"c")
    watch = theirs.watch_prefix("ns/")
    pending = asyncio.ensure_future(watch.__anext__())
    await asyncio.sleep(0)
    await mine.close()
    async with aclosing(watch):
        deleted = {(await asyncio.wait_for(pending, 1.0)).key, (await next_event(watch)).key}
    assert deleted == {"ns/mine/1", "ns/mine/2"}
    assert [e.key for e in await theirs.get_prefix("ns/")] == ["ns/theirs"]


def _info(ns: str, iid: str, component: str = "decode", model: str = "m") -> InstanceInfo:
    return InstanceInfo(
        iid, ns, component, "generate", keys.request_address(ns, component, "generate", iid), model
    )


def _card(model: str = "m", role: str = "decode") -> ModelCard:
    return ModelCard(model, "/models/m", "/models/m/tokenizer.json", role=role)


async def wait_for(predicate, within: float = 1.0) -> None:  # noqa: ANN001
    """Poll state owned by another task or process (no event to wait on); fail after ``within`` seconds."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def test_live_view_tracks_instances_and_cards() -> None:
    ns = "lv-track"
    settings = RuntimeSettings.embedded(namespace=ns)
    worker_a, worker_b, frontend = [await Runtime.connect(settings) for _ in range(3)]
    await register(worker_a, _info(ns, "a"), _card())  # before the view starts: found by the initial list
    view = LiveView(frontend)
    changes: list[int] = []
    view.on_change.append(lambda: changes.append(1))
    await view.start()
    try:
        assert set(view.instances) == {"a"} and set(view.cards["m"]) == {"a"}
        await register(worker_b, _info(ns, "b", "prefill"), _card(role="prefill"))  # after: seen by the watch
        await wait_for(lambda: "b" in view.instances)
        assert [i.instance_id for i in view.instances_of("prefill", "m")] == ["b"]
        assert view.instances_of("decode", "other-model") == []
        assert changes
        await deregister(worker_b, _info(ns, "b", "prefill"), _card(role="prefill"))
        await wait_for(lambda: "b" not in view.instances and set(view.cards["m"]) == {"a"})
        await worker_a.close()  # its lease "expires": everything it wrote vanishes
        await wait_for(lambda: not view.instances and "m" not in view.cards)
    finally:
        await view.stop()
        for rt in (worker_a, worker_b, frontend):
            await rt.close()


async def test_live_view_drops_stale_revisions_and_malformed_values() -> None:
    ns = "lv-stale"
    rt = await Runtime.connect(RuntimeSettings.embedded(namespace=ns))
    view = LiveView(rt)
    key = keys.instance_key(rt.settings.root, ns, "decode", "generate", "x")
    newer, older = _info(ns, "x", model="new"), _info(ns, "x", model="old")
    assert view._apply(DiscoveryEvent(key, encode(newer), revision=10))
    # A late event from before a re-list changes nothing.
    assert not view._apply(DiscoveryEvent(key, encode(older), revision=5))
    assert view.instances["x"].model == "new"
    assert not view._apply(DiscoveryEvent(key, None, revision=9))  # a stale delete does not remove it either
    assert "x" in view.instances
    assert view._apply(DiscoveryEvent(key, None, revision=11))
    assert "x" not in view.instances
    assert not view._apply(DiscoveryEvent(key, encode(newer), revision=10))  # nor resurrects it
    bad_key = keys.instance_key(rt.settings.root, ns, "decode", "generate", "y")
    assert not view._apply(DiscoveryEvent(bad_key, b"\x01not msgpack", revision=12))
    assert "y" not in view.instances
    await rt.close()


async def test_live_view_relists_periodically_and_repairs_missed_events() -> None:
    ns = "lv-resync"
    rt = await Runtime.connect(RuntimeSettings.embedded(namespace=ns, discovery_resync_s=0.05))
    store: MemoryStore = rt.discovery._store  # type: ignore[attr-defined]
    view = LiveView(rt)
    await view.start()
    try:
        key = keys.instance_key(rt.settings.root, ns, "decode", "generate", "ghost")
        # Changes the watch never reports (as when the watch is created on the server after the first list).
        store._revision += 1
        store._data[key] = (encode(_info(ns, "ghost")), store._revision)
        await wait_for(lambda: "ghost" in view.instances, within=2.0)
        del store._data[key]
        await wait_for(lambda: "ghost" not in view.instances, within=2.0)
    finally:
        await view.stop()
        await rt.close()
