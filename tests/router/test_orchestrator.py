"""The router's disaggregation paths with real mocker workers on the in-process runtime (embedded mode)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.placement import PlacementSettings
from dynamo_lite.protocol import (
    GenerateChunk,
    GenerateRequest,
    Overloaded,
    Phase,
    SamplingOptions,
    StreamError,
    encode,
)
from dynamo_lite.router.orchestrator import Router
from dynamo_lite.router.settings import RouterSettings
from dynamo_lite.runtime.config import RuntimeSettings, Timeouts
from dynamo_lite.runtime.registry import LiveView
from dynamo_lite.runtime.runtime import Runtime
from dynamo_lite.worker.worker import Worker, WorkerSettings

MODEL = "mock-model"
PROMPT = list(range(500, 540))
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # SmolLM2-135M in bf16, as the mocker reports it

_namespaces = itertools.count()


async def until(predicate, within: float = 2.0) -> None:  # noqa: ANN001
    """Poll state owned by another task or process (no event to wait on); fail after ``within`` seconds."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


class Cluster:
    """Workers and a router sharing one namespace of the process's in-memory discovery and request plane."""

    def __init__(self) -> None:
        self.ns = f"router-{next(_namespaces)}"
        self.workers: list[Worker] = []
        self.runtime: Runtime | None = None
        self.view: LiveView | None = None
        self.router: Router | None = None

    async def worker(
        self,
        mode: str,
        *,
        strategy: str = "prefill_first",
        model: str = MODEL,
        speedup: float = 0.0,
        max_inflight: int = 1024,
        timing: dict | None = None,
        placement: PlacementSettings | None = None,
    ) -> Worker:
        settings = WorkerSettings(
            role=mode,
            engine="mocker",
            disaggregation_strategy=strategy,
            max_inflight=max_inflight,
            engine_settings=EngineSettings(
                speedup_ratio=speedup, served_model_name=model, extra=timing or {}
            ),
            runtime=RuntimeSettings.embedded(namespace=self.ns),
            placement=placement or PlacementSettings(),
        )
        w = Worker(settings)
        await w.start()
        self.workers.append(w)
        if self.view is not None:
            await until(lambda: w.instance_id in self.view.instances)
        return w

    async def start_router(self, settings: RouterSettings | None = None) -> Router:
        self.runtime = await Runtime.connect(RuntimeSettings.embedded(namespace=self.ns))
        self.view = LiveView(self.runtime)
        await self.view.start()
        self.router = Router(self.runtime, self.view, settings or RouterSettings())
        return self.router

    async def stop_worker(self, w: Worker) -> None:
        await w.stop(drain_s=0)
        self.workers.remove(w)
        await until(lambda: w.instance_id not in self.view.instances)  # type: ignore[union-attr]

    async def close(self) -> None:
        if self.view:
            await self.view.stop()
        for w in self.workers:
            await w.stop(drain_s=0)
        if self.runtime:
            await self.runtime.close()


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        await c.close()


def req(
    max_tokens: int = 10, prompt: list[int] = PROMPT, model: str = MODEL, rid: str = "req-1"
) -> GenerateRequest:
    return GenerateRequest(rid, model, list(prompt), SamplingOptions(max_tokens=max_tokens))


async def run(router: Router, request: GenerateRequest, model: str = MODEL) -> list[GenerateChunk]:
    async with aclosing(router.generate(model, request)) as chunks:
        return [c async for c in chunks]


def ntokens(chunks: list[GenerateChunk]) -> int:
    return sum(len(c.token_ids) for c in chunks)


async def test_prefill_first_hands_the_kv_to_the_decode_worker(cluster: Cluster) -> None:
    prefill, decode = await cluster.worker("prefill"), await cluster.worker("decode")
    router = await cluster.start_router()
    chunks = await run(router, req(max_tokens=10))
    assert ntokens(chunks) == 10
    # The prefill's first token comes first; its KV descriptor never reaches the client.
    assert len(chunks[0].token_ids) == 1 and chunks[0].kv is None
    assert chunks[-1].finish_reason == "length"
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    # The prefill worker made exactly the first token; the decode worker imported its KV and made the rest.
    p, d = prefill.engine.stats(), decode.engine.stats()
    assert p.total_tokens == 1 and d.total_tokens == 9
    assert d.kv_transfers == 1 and d.kv_transfer_bytes == KV_BYTES_PER_TOKEN * len(PROMPT)
    # Usage: KV imported from this request's own prefill is not a cache hit; the mocker has no prefix cache.
    assert all(c.cached_tokens == 0 for c in chunks)
    # The very same tokens as one aggregated run of the same request.
    agg_engine = decode.engine
    async with aclosing(agg_engine.generate(req(max_tokens=10))) as direct:
        assert [t for c in chunks for t in c.token_ids] == [
            t for c in [x async for x in direct] for t in c.token_ids
        ]


async def test_one_token_request_never_reaches_the_decode_worker(cluster: Cluster) -> None:
    await cluster.worker("prefill")
    decode = await cluster.worker("decode")
    router = await cluster.start_router()
    chunks = await run(router, req(max_tokens=1))
    assert ntokens(chunks) == 1 and chunks[-1].finish_reason == "length"
    assert decode.engine.stats().total_tokens == 0 and decode.inflight == 0


async def test_round_robin_spreads_over_decode_workers(cluster: Cluster) -> None:
    await cluster.worker("prefill")
    d1, d2 = await cluster.worker("decode"), await cluster.worker("decode")
    router = await cluster.start_router()
    results = [await run(router, req(max_tokens=4, rid=f"r{i}")) for i in range(4)]
    assert all(ntokens(r) == 4 for r in results)
    assert (d1.engine.stats().kv_transfers, d2.engine.stats().kv_transfers) == (2, 2)


async def test_random_mode_picks_only_live_workers(cluster: Cluster) -> None:
    await cluster.worker("prefill")
    gone, live = await cluster.worker("decode"), await cluster.worker("decode")
    router = await cluster.start_router(RouterSettings(policy="random"))
    await cluster.stop_worker(gone)
    for i in range(10):
        assert ntokens(await run(router, req(max_tokens=3, rid=f"r{i}"))) == 3
    assert live.engine.stats().kv_transfers == 10


async def test_decode_first_runs_the_prefill_from_the_decode_worker(cluster: Cluster) -> None:
    prefill = await cluster.worker("prefill")
    decode = await cluster.worker("decode", strategy="decode_first")
    router = await cluster.start_router()
    chunks = await run(router, req(max_tokens=7))
    assert ntokens(chunks) == 7 and chunks[-1].finish_reason == "length"
    assert prefill.engine.stats().total_tokens == 1
    assert decode.engine.stats().kv_transfers == 1 and decode.engine.stats().total_tokens == 6


async def test_decode_first_places_prefills_by_the_router_mode_it_was_given(cluster: Cluster) -> None:
    """--router-mode least-loaded given to a decode_first worker: of two prefill workers, one busy, every
    prefill goes to the idle one (round-robin would send every other one to the busy worker)."""
    slow = {"prefill_base_s": 60.0}  # a prefill on the busy worker holds it for a minute
    busy = await cluster.worker("prefill", speedup=1.0, timing=slow)
    idle = await cluster.worker("prefill")
    decode = await cluster.worker(
        "decode", strategy="decode_first", placement=PlacementSettings(policy="least-loaded")
    )
    router = await cluster.start_router()
    assert busy.runtime is not None and busy.info is not None
    held = busy.runtime.request_plane.stream(
        busy.info.address,
        encode(GenerateRequest("hold", MODEL, PROMPT, SamplingOptions(), Phase.PREFILL)),
        first_timeout=None,
    )
    holding = asyncio.create_task(anext(held, None))
    try:
        # the decode worker's placement has the busy worker's load report
        load = decode._handler.placement.load  # type: ignore[union-attr]
        await until(lambda: (r := load.report(busy.instance_id)) is not None and r.inflight == 1, within=5)
        for i in range(4):
            async with asyncio.timeout(10):
                assert ntokens(await run(router, req(max_tokens=3, rid=f"r{i}"))) == 3
        assert idle.engine.stats().total_tokens == 4 and decode.engine.stats().kv_transfers == 4
    finally:
        holding.cancel()
        await asyncio.gather(holding, return_exceptions=True)
        await held.aclose()  # type: ignore[attr-defined]


async def test_conditional_disaggregation_skips_the_prefill_worker_for_short_prompts(
    cluster: Cluster,
) -> None:
    prefill, decode = await cluster.worker("prefill"), await cluster.worker("decode")
    router = await cluster.start_router(RouterSettings(disagg_threshold=100))
    assert ntokens(await run(router, req(max_tokens=5, prompt=PROMPT))) == 5  # 40 tokens < 100: local prefill
    assert prefill.engine.stats().total_tokens == 0 and decode.engine.stats().kv_transfers == 0
    assert ntokens(await run(router, req(max_tokens=5, prompt=list(range(300, 450))))) == 5
    assert prefill.engine.stats().total_tokens == 1 and decode.engine.stats().kv_transfers == 1


async def test_a_negative_threshold_serves_from_decode_workers_alone_as_readiness_says(
    cluster: Cluster,
) -> None:
    decode = await cluster.worker("decode")
    router = await cluster.start_router(RouterSettings(disagg_threshold=-1))
    assert router.health()["models"] == {MODEL: "ready"} and router.model_cards()
    assert (
        ntokens(await run(router, req(max_tokens=5))) == 5
    )  # prefilled locally, no 503 for a prefill worker
    prefill = await cluster.worker("prefill")
    assert ntokens(await run(router, req(max_tokens=5, rid="r2"))) == 5
    assert prefill.engine.stats().total_tokens == 0 and decode.engine.stats().kv_transfers == 0


async def test_aggregated_worker_serves_alone(cluster: Cluster) -> None:
    agg = await cluster.worker("agg")
    router = await cluster.start_router()
    assert ntokens(await run(router, req(max_tokens=6))) == 6
    assert agg.engine.stats().total_tokens == 6
    assert [card.served_name for card in router.model_cards()] == [MODEL]


async def test_missing_decode_role_is_503(cluster: Cluster) -> None:
    await cluster.worker("prefill")
    router = await cluster.start_router()
    with pytest.raises(StreamError) as err:
        await run(router, req())
    assert err.value.info.status == 503
    assert router.model_cards() == []
    assert router.health()["status"] == "unhealthy"


async def test_unknown_model_is_404(cluster: Cluster) -> None:
    await cluster.worker("prefill")
    await cluster.worker("decode")
    router = await cluster.start_router()
    with pytest.raises(StreamError) as err:
        await run(router, req(model="no-such-model"), model="no-such-model")
    assert err.value.info.status == 404 and err.value.info.code == "model_not_found"


def overloaded(w: Worker) -> float:
    """Requests ``w`` refused for capacity (its worker metrics)."""
    assert w.metrics is not None
    labels = {"model": MODEL, "role": w.settings.role, "instance": w.instance_id}
    value = w.metrics.registry.get_sample_value(
        "dynamo_lite_worker_requests_total", {**labels, "phase": w.settings.role, "status": "overloaded"}
    )
    return value or 0.0


async def test_requests_wait_at_the_router_until_the_decode_worker_has_room(cluster: Cluster) -> None:
    await cluster.worker("prefill")
    decode = await cluster.worker("decode", speedup=1.0, max_inflight=2)
    router = await cluster.start_router()
    runs = [asyncio.create_task(run(router, req(max_tokens=20, rid=f"r{i}"))) for i in range(5)]
    await until(lambda: router.queued_requests().get(MODEL) == 3)
    results = await asyncio.gather(*runs)
    assert [ntokens(chunks) for chunks in results] == [20] * 5
    assert router.queued_requests() == {MODEL: 0}
    assert overloaded(decode) == 0  # placed when there was room: never pushed onto a full worker
    assert decode.engine.stats().kv_transfers == 5


async def test_busy_prefill_worker_queues_the_request_rather_than_fall_back(cluster: Cluster) -> None:
    prefill = await cluster.worker("prefill", speedup=1.0, max_inflight=1, timing={"prefill_base_s": 0.2})
    decode = await cluster.worker("decode")
    router = await cluster.start_router()
    results = await asyncio.gather(*(run(router, req(max_tokens=4, rid=f"r{i}")) for i in range(3)))
    assert [ntokens(chunks) for chunks in results] == [4] * 3
    assert prefill.engine.stats().total_tokens == 3 and overloaded(prefill) == 0
    assert decode.engine.stats().kv_transfers == 3


async def test_a_started_stream_may_wait_in_the_decode_engines_queue_past_the_first_frame_timeout(
    cluster: Cluster,
) -> None:
    """The client has the prefill's token; the decode worker took the request and queues it behind its batch.
    That wait is bounded by the frontend's request timeout, not by the first-frame timeout (a 504 mid-stream)."""
    await cluster.worker("prefill")
    await cluster.worker("decode", speedup=1.0, timing={"max_batch_size": 1})
    router = await cluster.start_router(RouterSettings(timeouts=Timeouts(first_token_s=0.2)))
    results = await asyncio.gather(*(run(router, req(max_tokens=40, rid=f"r{i}")) for i in range(3)))
    assert [ntokens(chunks) for chunks in results] == [40] * 3


async def test_queue_full_is_refused_with_429_and_a_wait_past_the_limit_with_503(cluster: Cluster) -> None:
    await cluster.worker("prefill")
    await cluster.worker("decode", speedup=1.0, max_inflight=1)
    router = await cluster.start_router(
        RouterSettings(queue_depth=1, timeouts=Timeouts(queue_s=0.3, retry_after_s=2))
    )
    holder = asyncio.create_task(run(router, req(max_tokens=200, rid="holder")))  # ~2 s on the worker
    await until(lambda: router.load.local_inflight)
    waiting = asyncio.create_task(run(router, req(rid="waits")))
    await until(lambda: router.queued_requests().get(MODEL) == 1)
    refusal = router.refusal()  # what the frontend answers before reading the next request's body
    assert refusal is not None and (refusal.info.status, refusal.info.code) == (429, "queue_full")
    assert "--queue-depth 1" in refusal.info.message and refusal.retry_after_s == 2
    with pytest.raises(Overloaded) as full:
        await run(router, req(rid="one-too-many"))
    assert full.value.info.status == 429 and full.value.info.code == "queue_full"
    assert full.value.retry_after_s == 2
    with pytest.raises(Overloaded) as waited:
        await waiting
    assert waited.value.info.status == 503 and waited.value.info.code == "queue_timeout"
    assert router.queued_requests() == {MODEL: 0} and router.refusal() is None
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)
    await until(lambda: not router.load.local_inflight)  # every reservation released


async def test_a_worker_refusing_for_capacity_is_a_signal_to_requeue_not_an_error(cluster: Cluster) -> None:
    """Another frontend filled the decode worker before our router heard of it (no load report yet): the
    worker refuses before accepting, and the request waits for room instead of failing."""
    await cluster.worker("prefill")
    decode = await cluster.worker("decode", speedup=1.0, max_inflight=1)
    router = await cluster.start_router(RouterSettings(load_report_ttl_s=0.3))
    other = Router(cluster.runtime, cluster.view, RouterSettings())  # type: ignore[arg-type]
    elsewhere = asyncio.create_task(run(other, req(max_tokens=50, rid="other-frontend")))
    await until(lambda: decode.inflight == 1)
    chunks = await run(router, req(max_tokens=5, rid="ours"))
    assert ntokens(chunks) == 5 and chunks[-1].finish_reason == "length"
    assert overloaded(decode) >= 1  # it was refused at least once, and retried
    assert ntokens(await elsewhere) == 50


async def test_dead_but_registered_prefill_worker_is_retried_elsewhere_then_skipped(cluster: Cluster) -> None:
    dead = await cluster.worker("prefill")
    decode = await cluster.worker("decode")
    router = await cluster.start_router()
    await dead._served.stop()  # type: ignore[union-attr]  # the process is gone, its lease not yet expired
    assert ntokens(await run(router, req(max_tokens=5))) == 5  # local prefill
    assert decode.engine.stats().kv_transfers == 0
    alive = await cluster.worker("prefill")
    for i in range(2):  # whichever the policy picks first, the request lands on the live prefill worker
        assert ntokens(await run(router, req(max_tokens=5, rid=f"r{i}"))) == 5
    assert alive.engine.stats().total_tokens == 2
    assert decode.engine.stats().kv_transfers == 2


async def test_prefill_worker_stopped_mid_request_falls_back_to_local_prefill(cluster: Cluster) -> None:
    prefill = await cluster.worker("prefill", speedup=1.0, timing={"prefill_base_s": 5.0})  # a slow prefill
    decode = await cluster.worker("decode")
    router = await cluster.start_router()
    pending = asyncio.create_task(run(router, req(max_tokens=6)))
    await until(lambda: prefill.inflight == 1)
    await cluster.stop_worker(prefill)  # no drain: its in-flight prefill fails with 503
    chunks = await asyncio.wait_for(pending, 2.0)
    assert ntokens(chunks) == 6 and chunks[-1].finish_reason == "length"
    assert decode.engine.stats().kv_transfers == 0 and decode.engine.stats().total_tokens == 6


async def test_client_errors_from_the_prefill_worker_are_not_retried(cluster: Cluster) -> None:
    await cluster.worker("prefill")
    decode = await cluster.worker("decode")
    router = await cluster.start_router()
    with pytest.raises(StreamError) as err:
        await run(router, req(max_tokens=10_000))  # prompt + max_tokens beyond max_seq_len
    assert err.value.info.status == 400 and err.value.info.code == "context_length"
    assert decode.engine.stats().total_tokens == 0


async def test_model_cards_list_only_servable_models(cluster: Cluster) -> None:
    router = await cluster.start_router()
    assert router.model_cards() == []
    prefill = await cluster.worker("prefill")
    assert router.model_cards() == [] and router.known_model(MODEL)  # known, but cannot be served yet
    await cluster.worker("decode")
    assert [c.served_name for c in router.model_cards()] == [MODEL]
    assert router.health()["models"] == {MODEL: "ready"}
    await cluster.worker("agg", model="other-model")
    assert [c.served_name for c in router.model_cards()] == [MODEL, "other-model"]
    await cluster.stop_worker(prefill)
    assert [c.served_name for c in router.model_cards()] == ["other-model"]
    assert router.health()["models"][MODEL] == "missing prefill"


async def test_closing_the_stream_cancels_the_decode_request(cluster: Cluster) -> None:
    await cluster.worker("prefill")
    decode = await cluster.worker("decode", speedup=1.0)  # ~8 ms per token: a long stream
    router = await cluster.start_router()
    gen = router.generate(MODEL, req(max_tokens=2000))
    got = 0
    async for chunk in gen:
        got += len(chunk.token_ids)
        if got >= 3:
            break
    await gen.aclose()
    await until(lambda: decode.engine.stats().active_seqs == 0 and decode.inflight == 0, within=1.0)
