"""Load reports, least-loaded and KV-aware routing, multi-model serving — with real mocker workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from dynamo_lite.kv.blocks import PrefixCacheIndex, block_hashes
from dynamo_lite.placement.kv_index import KvIndex
from dynamo_lite.placement.load import LoadTracker
from dynamo_lite.placement.policies import KvAware, LeastLoaded
from dynamo_lite.protocol import (
    GenerateRequest,
    InstanceInfo,
    KvEvent,
    KvEventKind,
    LoadReport,
    SamplingOptions,
    encode,
)
from dynamo_lite.router.settings import RouterSettings
from tests.router.test_orchestrator import Cluster, ntokens, req, run, until


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        await c.close()


def inst(iid: str) -> InstanceInfo:
    return InstanceInfo(iid, "ns", "agg", "generate", f"addr.{iid}", "m")


def test_block_hashes_are_chained_and_prefix_stable() -> None:
    a = block_hashes(list(range(100)), 32)
    b = block_hashes(list(range(96)) + [7, 7, 7, 7, 7], 32)
    assert len(a) == 3 and a == b  # only full blocks; the tail is not hashed
    c = block_hashes([1] + list(range(1, 100)), 32)
    assert c[0] != a[0] and c[1] != a[1]  # a change in block 0 changes every later hash


def test_prefix_cache_index_reports_stores_and_evictions() -> None:
    events = []
    cache = PrefixCacheIndex(capacity=3, sink=events.append)
    cache.store([1, 2])
    cache.store([1, 2, 3, 4])
    assert cache.cached_prefix([1, 2, 3, 4]) == 0  # block 1 was evicted: the prefix breaks at once
    assert cache.cached_prefix([2, 3, 4]) == 3
    assert events == [(KvEventKind.STORED, [1, 2]), (KvEventKind.STORED, [3, 4]), (KvEventKind.REMOVED, [1])]


def test_kv_index_events_and_approximate_mode() -> None:
    index = KvIndex(approx_ttl_s=60)
    index.apply(KvEvent("a", KvEventKind.STORED, [10, 11, 12]))
    assert index.overlap("a", [10, 11, 12, 13]) == 3 and index.overlap("b", [10]) == 0
    index.apply(KvEvent("a", KvEventKind.REMOVED, [11]))
    assert index.overlap("a", [10, 11, 12]) == 1
    index.routed("a", [99])  # "a" publishes events: guesses are not recorded for it
    assert index.overlap("a", [99]) == 0
    index.routed("b", [10, 11])  # "b" publishes nothing: assume what was routed there stays cached
    assert index.overlap("b", [10, 11, 12]) == 2
    index.apply(KvEvent("a", KvEventKind.CLEARED))
    assert index.overlap("a", [10]) == 0


def test_least_loaded_prefers_the_idle_instance_and_drops_stale_reports() -> None:
    load = LoadTracker(ttl_s=0.05)
    policy = LeastLoaded(load)
    load.started("a")
    load.started("a")
    request = GenerateRequest("r", "m", [1], SamplingOptions())
    assert policy.pick([inst("a"), inst("b")], request).instance_id == "b"
    load._on_report("x", encode(LoadReport("b", active_seqs=9, queued=5, inflight=9)))
    assert policy.pick([inst("a"), inst("b")], request).instance_id == "a"  # b reports more work than a has
    time.sleep(0.06)
    assert load.report("b") is None  # stale: ignored


def test_load_view_forgets_instances_that_left_discovery() -> None:
    """Workers come and go: a long-running router keeps nothing of those that left (issue 26's chaos runs)."""
    load = LoadTracker(ttl_s=60)
    for iid in ("a", "b"):
        load._on_report("x", encode(LoadReport(iid, inflight=1)))
    load.mark_full("b")
    load.forget_gone({"a"})
    assert load.report("a") is not None and load.report("b") is None and not load.is_full("b")
    assert set(load._reports) == set(load._local_at_report) == {"a"}


def test_kv_aware_weighs_cached_prefix_against_load() -> None:
    settings = RouterSettings()
    load, index = LoadTracker(settings.load_report_ttl_s), KvIndex(settings.kv_approx_ttl_s)
    policy = KvAware(load, index, block_size=4, load_weight=1.0)
    prompt = list(range(40))  # 10 blocks
    index.apply(KvEvent("a", KvEventKind.STORED, block_hashes(prompt, 4)[:8]))
    request = GenerateRequest("r", "m", prompt, SamplingOptions())
    assert policy.pick([inst("a"), inst("b")], request).instance_id == "a"
    for _ in range(9):  # a is now busier than the 8 blocks it would save are worth
        load.started("a")
    assert policy.pick([inst("a"), inst("b")], request).instance_id == "b"


async def test_kv_mode_sends_a_conversation_back_to_its_cache(cluster: Cluster) -> None:
    timing = {"prefill_per_token_s": 0.0, "num_cache_blocks": 1000}
    workers = [await cluster.worker("agg", timing=timing) for _ in range(2)]
    router = await cluster.start_router(RouterSettings(policy="kv", kv_block_size=32))
    await router.start()
    history = list(range(1000, 1000 + 64 * 5))  # 10 blocks
    picked = []
    for turn in range(4):
        history = history + list(range(5000 + turn * 40, 5040 + turn * 40))
        chunks = await run(router, req(max_tokens=2, prompt=history, rid=f"turn-{turn}"))
        assert ntokens(chunks) == 2
        picked.append([w.engine.stats().total_tokens for w in workers])
        if turn:
            assert chunks[0].cached_tokens >= len(history) - 80  # the earlier turns' blocks were reused
        await until(lambda: len(router.kv_index.instances()) >= 1)  # KV events arrived over the request plane
    assert picked[-1].count(0) == 1, picked  # every turn went to the same worker: the other made no token


async def test_two_models_route_only_to_their_own_workers(cluster: Cluster) -> None:
    a = await cluster.worker("agg", model="model-a")
    b = await cluster.worker("agg", model="model-b")
    router = await cluster.start_router()
    assert [c.served_name for c in router.model_cards()] == ["model-a", "model-b"]
    for _ in range(3):
        assert ntokens(await run(router, req(max_tokens=3, model="model-a"), model="model-a")) == 3
    assert ntokens(await run(router, req(max_tokens=4, model="model-b"), model="model-b")) == 4
    assert a.engine.stats().total_tokens == 9 and b.engine.stats().total_tokens == 4


async def test_workers_publish_load_reports(cluster: Cluster) -> None:
    w = await cluster.worker("agg", speedup=1.0)
    router = await cluster.start_router(RouterSettings(policy="least-loaded"))
    await router.start()
    task = asyncio.create_task(run(router, req(max_tokens=200)))
    await until(lambda: (r := router.load.report(w.instance_id)) is not None and r.inflight == 1, within=3)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await until(lambda: (r := router.load.report(w.instance_id)) is not None and r.inflight == 0, within=3)


@pytest.mark.parametrize("mode", ["least-loaded", "kv"])
async def test_new_modes_serve_disaggregated_requests(cluster: Cluster, mode: str) -> None:
    await cluster.worker("prefill")
    await cluster.worker("decode")
    router = await cluster.start_router(RouterSettings(policy=mode))
    await router.start()
    assert ntokens(await run(router, req(max_tokens=7))) == 7
    await router.stop()
