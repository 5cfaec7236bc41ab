"""A worker in-process (embedded runtime): metrics, overload, draining stop."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.protocol import (
    GenerateChunk,
    GenerateRequest,
    InstanceBusy,
    Phase,
    SamplingOptions,
    StreamError,
    decode,
    encode,
)
from dynamo_lite.router.orchestrator import Router
from dynamo_lite.router.settings import RouterSettings
from dynamo_lite.runtime import keys
from dynamo_lite.runtime.config import RuntimeSettings
from dynamo_lite.runtime.registry import LiveView
from dynamo_lite.runtime.runtime import Runtime
from dynamo_lite.worker.worker import Worker, WorkerSettings

MODEL = "mock-model"
_namespaces = itertools.count()


def worker_settings(ns: str, mode: str, *, speedup: float = 0.0, max_inflight: int = 1024) -> WorkerSettings:
    return WorkerSettings(
        role=mode,
        engine="mocker",
        max_inflight=max_inflight,
        engine_settings=EngineSettings(speedup_ratio=speedup, served_model_name=MODEL),
        runtime=RuntimeSettings.embedded(namespace=ns),
    )


@pytest.fixture
async def started() -> AsyncIterator[list[Worker]]:
    """Workers a test starts; stopped afterwards."""
    workers: list[Worker] = []
    yield workers
    for w in workers:
        await w.stop(drain_s=0)


async def start(workers: list[Worker], mode: str, **kw: float) -> Worker:
    w = Worker(worker_settings(f"worker-{next(_namespaces)}", mode, **kw))  # type: ignore[arg-type]
    await w.start()
    workers.append(w)
    return w


def request(max_tokens: int = 5, phase: Phase = Phase.DECODE) -> GenerateRequest:
    return GenerateRequest("r", MODEL, list(range(600, 632)), SamplingOptions(max_tokens=max_tokens), phase)


def open_stream(w: Worker, req: GenerateRequest) -> AsyncIterator[bytes]:
    assert w.runtime is not None and w.info is not None
    return w.runtime.request_plane.stream(w.info.address, encode(req), first_timeout=5.0)


async def collect(w: Worker, req: GenerateRequest) -> list[GenerateChunk]:
    async with aclosing(open_stream(w, req)) as stream:
        return [decode(p, GenerateChunk) async for p in stream]


def requests_total(w: Worker, phase: str, status: str) -> float:
    assert w.metrics is not None and w.card is not None
    labels = {
        "model": MODEL,
        "role": w.settings.role,
        "instance": w.instance_id,
        "phase": phase,
        "status": status,
    }
    return w.metrics.registry.get_sample_value("dynamo_lite_worker_requests_total", labels) or 0.0


async def test_registers_instance_and_model_card(started: list[Worker]) -> None:
    w = await start(started, "decode")
    assert w.runtime is not None and w.info is not None
    root, ns = w.runtime.settings.root, w.runtime.settings.namespace
    found = {e.key for e in await w.runtime.discovery.get_prefix(keys.namespace_prefix(root, ns))}
    assert found == {
        keys.instance_key(root, ns, "decode", "generate", w.instance_id),
        keys.model_key(root, ns, MODEL, w.instance_id),
    }
    assert w.info.model == MODEL and w.info.role == "decode"
    assert w.card is not None and w.card.role == "decode" and w.card.eos_token_ids == [2]
    assert w.card.tokenizer_path.endswith("tokenizer.json") and w.card.chat_template


def test_the_worker_paces_its_engine_from_its_settings() -> None:
    settings = worker_settings("pacing", "decode")
    settings.stream_interval_s = 0.02
    w = Worker(settings)
    assert w.engine.pacing.base_s == w.engine.pacing.interval_s == 0.02


async def test_metrics_count_requests_by_phase(started: list[Worker]) -> None:
    ns = f"worker-{next(_namespaces)}"
    p = Worker(worker_settings(ns, "prefill"))
    d = Worker(worker_settings(ns, "decode"))
    for w in (p, d):
        await w.start()
        started.append(w)
    rt = await Runtime.connect(RuntimeSettings.embedded(namespace=ns))
    view = LiveView(rt)
    await view.start()
    try:
        router = Router(rt, view, RouterSettings())
        async with aclosing(router.generate(MODEL, request(max_tokens=6, phase=Phase.AGGREGATED))) as chunks:
            assert sum([len(c.token_ids) async for c in chunks]) == 6
    finally:
        await view.stop()
        await rt.close()
    assert requests_total(p, "prefill", "ok") == 1 and requests_total(p, "decode", "ok") == 0
    assert requests_total(d, "decode", "ok") == 1 and requests_total(d, "prefill", "ok") == 0
    assert d.metrics is not None
    labels = {"model": MODEL, "role": "decode", "instance": d.instance_id}
    sample = d.metrics.registry.get_sample_value
    assert sample("dynamo_lite_worker_generated_tokens_total", labels) == 5
    assert sample("dynamo_lite_worker_kv_transfers_total", labels) == 1
    assert sample("dynamo_lite_worker_active_seqs", labels) == 0
    assert sample("dynamo_lite_worker_request_duration_seconds_count", {**labels, "phase": "decode"}) == 1


async def test_max_inflight_refuses_before_accepting_with_instance_busy(started: list[Worker]) -> None:
    w = await start(started, "decode", speedup=1.0, max_inflight=1)
    assert w.info is not None and w.info.max_inflight == 1  # the router learns the capacity from discovery
    busy = open_stream(w, request(max_tokens=2000))
    await asyncio.wait_for(busy.__anext__(), 2.0)
    with pytest.raises(InstanceBusy):  # a capacity signal, not a client error: nothing ran
        await collect(w, request())
    assert w.engine.stats().queued == 0 and w.inflight == 1
    assert requests_total(w, "decode", "overloaded") == 1
    await busy.aclose()
    assert requests_total(w, "decode", "cancelled") == 1
    assert w.inflight == 0
    assert len(await collect(w, request(max_tokens=3))) >= 1  # a slot is free again


async def test_stop_deregisters_first_and_drains_in_flight_work(started: list[Worker]) -> None:
    w = await start(started, "decode", speedup=1.0)  # ~8 ms per token
    assert w.runtime is not None and w.info is not None
    rt = w.runtime
    key = keys.instance_key(rt.settings.root, rt.settings.namespace, "decode", "generate", w.instance_id)
    stream = open_stream(w, request(max_tokens=40))
    got = len(decode(await asyncio.wait_for(stream.__anext__(), 2.0), GenerateChunk).token_ids)
    stopping = asyncio.create_task(w.stop(drain_s=10.0))
    await asyncio.sleep(0.05)
    assert not [e for e in await rt.discovery.get_prefix(key)]  # routers stop picking it at once
    assert not stopping.done()  # still draining
    async with aclosing(stream):
        async for payload in stream:
            got += len(decode(payload, GenerateChunk).token_ids)
    assert got == 40  # the in-flight request finished
    await asyncio.wait_for(stopping, 2.0)
    started.remove(w)
    with pytest.raises(StreamError) as err:
        await collect(w, request())
    assert err.value.info.status == 503


async def test_stop_after_the_drain_timeout_fails_in_flight_work_instead_of_hanging(
    started: list[Worker],
) -> None:
    w = await start(started, "decode", speedup=1.0)
    stream = open_stream(w, request(max_tokens=2000))  # ~16 s of work
    await asyncio.wait_for(stream.__anext__(), 2.0)
    await asyncio.wait_for(w.stop(drain_s=0.2), 3.0)
    started.remove(w)
    with pytest.raises(StreamError) as err:
        async with aclosing(stream):
            async with asyncio.timeout(2.0):
                async for _ in stream:
                    pass
    assert err.value.info.status == 503
