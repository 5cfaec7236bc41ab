"""A worker: one engine behind one request-plane endpoint, registered under its lease.

start: engine up → connect runtime → serve the endpoint → register (instance + model card) → metrics.
stop (SIGTERM): deregister first (routers stop picking us), finish in-flight requests within the grace period,
cancel the rest, stop the engine.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from dynamo_lite import tracing
from dynamo_lite.engines import build_engine, default_engine
from dynamo_lite.engines.base import Engine, EngineSettings, HoldsKvForDecode, StreamPacing
from dynamo_lite.model_files import default_reasoning_parser, default_tool_call_parser
from dynamo_lite.placement.settings import PlacementSettings
from dynamo_lite.protocol import (
    DisaggregationStrategy,
    GenerateRequest,
    IncompatibleWire,
    InstanceInfo,
    KvDescriptor,
    KvEvent,
    KvRelease,
    LoadReport,
    ModelCard,
    Phase,
    Role,
    Served,
    Subscription,
    WireError,
    decode,
    encode,
)
from dynamo_lite.runtime import keys
from dynamo_lite.runtime.card_files import publish_card_files
from dynamo_lite.runtime.config import RuntimeSettings
from dynamo_lite.runtime.nats_fast_path import export_read_path
from dynamo_lite.runtime.registry import deregister, register
from dynamo_lite.runtime.runtime import Runtime
from dynamo_lite.timing import worker_timing
from dynamo_lite.worker.handlers import RequestHandler, handler_for
from dynamo_lite.worker.metrics import WorkerMetrics, component_name

log = logging.getLogger(__name__)

_PHASE_OF_ROLE = {Role.PREFILL: Phase.PREFILL, Role.DECODE: Phase.DECODE, Role.AGGREGATED: Phase.AGGREGATED}


@dataclass(slots=True)
class WorkerSettings:
    """Every knob of a worker process, with its default, in one place (``python -m dynamo_lite.worker`` flags;
    engine flags in ``engine_settings``; discovery, request plane and timeouts — ``drain_s`` — in ``runtime``;
    the placement of prefills under decode_first in ``placement``)."""

    role: Role = Role.AGGREGATED  # --mode
    # "": TensorRT-LLM where it imports and a GPU is present, else torch (engines.default_engine, logged)
    engine: str = ""
    # decode workers: who runs the prefill handoff (decode_first: this worker, placing prefills as ``placement``)
    disaggregation_strategy: DisaggregationStrategy = DisaggregationStrategy.PREFILL_FIRST
    endpoint: str = "generate"
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # None: no metrics server; 0: any free port
    advertise_host: str = ""
    # Requests taken at once (engine batch + its queue); more are refused before being accepted (the router
    # waits for room at the frontend, or places them elsewhere).
    max_inflight: int = 1024
    load_report_interval_s: float = 0.5
    kv_event_interval_s: float = 0.05  # pending KV cache events (kv router) are published at least this often
    # Tokens produced within this long after a chunk went out travel together in the next one (0: a chunk per
    # engine step). Under load the interval grows so that this worker sends at most max_messages_per_s chunks.
    stream_interval_s: float = 0.005
    max_messages_per_s: float = 20_000.0
    # One token per message, whatever the interval, the load or the engine's steps (a client sees exactly one
    # token per SSE event; costs a message per token everywhere). TensorRT-LLM: one message per output.
    stream_per_token: bool = False
    # Output parsers the frontend applies to this model ("" = the model's default: harmony for gpt-oss)
    reasoning_parser: str = ""
    tool_call_parser: str = ""
    engine_settings: EngineSettings = field(default_factory=EngineSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    # decode_first: how this worker picks prefill workers (the router's flags: --router-mode, --queue-depth, ...)
    placement: PlacementSettings = field(default_factory=PlacementSettings)


class Worker:
    def __init__(self, settings: WorkerSettings, engine: Engine | None = None) -> None:
        if settings.role not in _PHASE_OF_ROLE:
            raise ValueError(f"--mode must be prefill, decode or agg, not {settings.role!r}")
        settings.role = settings.engine_settings.role = Role(settings.role)
        self.settings = settings
        if engine is None:
            settings.engine = settings.engine or default_engine()
            engine = build_engine(settings.engine, settings.engine_settings)
        self.engine = engine
        self.engine.pacing = StreamPacing(settings.stream_interval_s, settings.stream_per_token)
        self.runtime: Runtime | None = None
        self.info: InstanceInfo | None = None
        self.card: ModelCard | None = None
        self.metrics: WorkerMetrics | None = None
        self.metrics_port = 0
        self._served: Served | None = None
        self._handler: RequestHandler | None = None
        self._metrics_server = None
        self.inflight = 0
        self._reporter: asyncio.Task[None] | None = None
        self._release_sub: Subscription | None = None
        self._background: set[asyncio.Task[None]] = set()
        # (KvEventKind, block hashes) appended by the engine (any thread), published by the reporter task
        self._kv_events: deque[tuple[int, list[int]]] = deque()

    @property
    def instance_id(self) -> str:
        return self.runtime.instance_id if self.runtime else ""

    def model_card(self) -> ModelCard:
        files = self.engine.model_files
        special = files.special_tokens
        served = self.settings.engine_settings.served_model_name or files.default_served_name
        return ModelCard(
            served_name=served,
            model_path=str(self.settings.engine_settings.model_path or files.folder),
            tokenizer_path=str(files.tokenizer_json),
            chat_template=files.chat_template,
            context_length=min(files.context_length, self.settings.engine_settings.max_seq_len or 1 << 30),
            role=self.settings.role,
            eos_token_ids=files.eos_token_ids,
            bos_token=special.get("bos_token", ""),
            eos_token=special.get("eos_token", ""),
            vocab_size=files.vocab_size,
            model_type=files.model_type,
            reasoning_parser=self.settings.reasoning_parser or default_reasoning_parser(files.model_type),
            tool_call_parser=self.settings.tool_call_parser or default_tool_call_parser(files.model_type),
        )

    async def start(self) -> None:
        s = self.settings
        await self.engine.start()
        self.runtime = await Runtime.connect(s.runtime, name=f"dynamo_lite-{s.role}")
        self.card = self.model_card()
        labels = {"model": self.card.served_name, "role": s.role.value, "instance": self.runtime.instance_id}
        component = {
            "dynamo_namespace": s.runtime.namespace,
            "dynamo_component": component_name(s.role.value),
            "dynamo_endpoint": s.endpoint,
            "model": self.card.served_name,
        }
        self.metrics = WorkerMetrics(self.engine.stats, labels, component=component)
        export_read_path(self.metrics.registry, self.runtime.request_plane)
        if s.metrics_port is not None:
            from prometheus_client import start_http_server

            self._metrics_server, _ = start_http_server(s.metrics_port, s.metrics_host, self.metrics.registry)
            self.metrics_port = self._metrics_server.server_port
        self._handler = handler_for(s.role, s.disaggregation_strategy, s.placement, self.engine, self.runtime)
        await self._handler.start()
        address = keys.request_address(s.runtime.namespace, s.role, s.endpoint, self.runtime.instance_id)
        phase_name, metrics = _PHASE_OF_ROLE[s.role].name.lower(), self.metrics
        self._served = await self.runtime.request_plane.serve(
            address,
            self.handle,
            max_inflight=s.max_inflight,
            on_refused=lambda: metrics.observe(phase_name, "overloaded", 0.0),
        )
        self.info = InstanceInfo(
            instance_id=self.runtime.instance_id,
            namespace=s.runtime.namespace,
            role=s.role,
            endpoint=s.endpoint,
            address=address,
            model=self.card.served_name,
            host=s.advertise_host or socket.gethostname(),
            metrics_port=self.metrics_port,
            disaggregation_strategy=s.disaggregation_strategy,
            max_inflight=s.max_inflight,
        )
        if s.runtime.etcd_endpoints:  # other hosts' frontends read the model's files from discovery
            files = self.engine.model_files
            self.card.files = await publish_card_files(
                self.runtime.discovery, s.runtime.root, s.runtime.namespace, files.folder
            )
        await register(self.runtime, self.info, self.card)
        self._reporter = asyncio.create_task(self._report_load(), name="load-reports")
        if isinstance(self.engine, HoldsKvForDecode):
            await self._serve_kv_releases(self.engine)
        self.engine.on_kv_event = self._kv_events.append
        log.info(
            "worker %s (%s, %s) serving %s at %s",
            self.runtime.instance_id,
            s.role,
            s.engine,
            self.card.served_name,
            address,
        )

    async def _serve_kv_releases(self, engine: HoldsKvForDecode) -> None:
        """KV that a library holds (TensorRT-LLM): routers tell us when nobody will pull it; we tell other
        prefill workers the same when our decode recomputes instead of pulling."""
        assert self.runtime is not None
        ns, iid, plane = self.settings.runtime.namespace, self.runtime.instance_id, self.runtime.request_plane

        def on_release(subject: str, payload: bytes) -> None:
            try:
                engine.release_kv(decode(payload, KvRelease).transfer_id)
            except WireError as e:
                log.warning("ignoring malformed KV release on %s: %s", subject, e)

        def release_remote(kv: KvDescriptor) -> None:
            task = asyncio.get_running_loop().create_task(
                plane.publish(kv.release_subject, encode(KvRelease(kv.transfer_id)))
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        self._release_sub = await plane.subscribe(keys.kv_release_prefix(ns, iid), on_release)
        engine.kv_release_subject = keys.kv_release_subject(ns, iid)
        engine.on_kv_unused = release_remote

    async def _report_load(self) -> None:
        """Publish a ``LoadReport`` (and pending KV cache events) for the routers, periodically."""
        assert self.runtime is not None
        plane, ns, iid = self.runtime.request_plane, self.settings.runtime.namespace, self.runtime.instance_id
        load_at, events_at = keys.load_subject(ns, iid), keys.kv_events_subject(ns, iid)
        interval = self.settings.load_report_interval_s
        next_report = 0.0
        loop = asyncio.get_running_loop()
        while True:
            # Bound the messages per second this worker sends: many active streams → more tokens per chunk.
            self.engine.pacing.adapt(self.inflight, self.settings.max_messages_per_s)
            try:
                while self._kv_events:
                    kind, hashes = self._kv_events.popleft()
                    await plane.publish(events_at, encode(KvEvent(iid, kind, hashes)))
                if loop.time() >= next_report:
                    s = self.engine.stats()
                    report = LoadReport(
                        iid,
                        s.active_seqs,
                        s.queued,
                        s.kv_usage,
                        self.inflight,
                        self.settings.engine_settings.max_batch_size,
                    )
                    await plane.publish(load_at, encode(report))
                    next_report = loop.time() + interval
            except Exception as e:  # noqa: BLE001 — the request plane is reconnecting: report later
                log.debug("load report failed: %s", e)
            await asyncio.sleep(min(interval, self.settings.kv_event_interval_s))

    async def handle(self, payload: bytes) -> AsyncIterator[bytes]:
        """The endpoint: one ``GenerateRequest`` in, ``GenerateChunk``s out."""
        request = decode(payload, GenerateRequest)
        if (unknown := request.unrecognized()) is not None:
            raise IncompatibleWire(
                f"worker {self.instance_id} does not know the request's {unknown} (upgrade it)"
            )
        phase_name = request.phase.name.lower()
        assert self._handler is not None and self.metrics is not None
        metrics = self.metrics
        metrics.request_bytes.inc(len(payload))
        metrics.component_inflight.inc()
        self.inflight += 1  # the request plane keeps this within max_inflight
        started = time.monotonic()
        status = "cancelled"
        sent = 0
        timing = worker_timing(self.instance_id)  # sent on the first chunk; the KV pull adds to it
        try:
            with tracing.span(
                phase_name, {"instance.id": self.instance_id, "prompt.tokens": len(request.token_ids)}
            ):
                async with aclosing(self._handler.generate(request)) as chunks:
                    async for chunk in chunks:
                        if timing is not None:
                            timing.first_chunk_ms = round((time.monotonic() - started) * 1000.0, 3)
                            chunk.timing, timing = timing, None
                        data = encode(chunk)
                        sent += len(data)
                        yield data
            status = "ok"
        except Exception:
            status = "error"
            raise
        finally:
            self.inflight -= 1
            elapsed = time.monotonic() - started
            metrics.component_inflight.dec()
            metrics.response_bytes.inc(sent)
            metrics.observe(phase_name, status, elapsed)
            metrics.component_done(status, elapsed)

    async def stop(self, drain_s: float | None = None) -> None:
        """Deregister, drain in-flight work for up to ``drain_s``, then shut everything down."""
        drain = self.settings.runtime.timeouts.drain_s if drain_s is None else drain_s
        if self.runtime and self.info and self.card:
            try:
                await asyncio.wait_for(
                    deregister(self.runtime, self.info, self.card),
                    self.settings.runtime.timeouts.deregister_s,
                )
            except Exception as e:  # noqa: BLE001 — discovery down: our lease expires by itself
                log.warning("deregister failed: %s", e)
        if self._served:
            await self._served.stop(drain)
        if self._reporter:
            self._reporter.cancel()
        if self._release_sub is not None:
            try:
                await self._release_sub.unsubscribe()
            except Exception as e:  # noqa: BLE001 — the request plane is going away anyway
                log.debug("unsubscribing KV releases failed: %s", e)
        if self._handler is not None:
            await self._handler.stop()
        await self.engine.stop()
        if self.runtime:
            await self.runtime.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
