"""The in-process router: picks instances per role and runs the disaggregation.

prefill_first (default): prefill worker (context-only, max_tokens=1) → first token + KV descriptor → decode
worker continues from it. decode_first: the decode worker is asked directly and runs the prefill itself.
Conditional: prompts shorter than ``disagg_threshold`` go straight to a decode worker, which prefills locally.
If the prefill worker fails, the decode worker prefills locally (the request still completes).

Every instance is reserved before it is asked (``admission.py``): a request no instance has room for waits here,
in a bounded queue per model. The decode instance is reserved first, so that a request whose first token was
sent never finds its decode worker full; a worker that refuses anyway (``InstanceBusy``) is retried elsewhere or
requeued.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass

from dynamo_lite.model_files import cache_root
from dynamo_lite.protocol import (
    ErrorInfo,
    GenerateChunk,
    GenerateRequest,
    InstanceBusy,
    InstanceInfo,
    KvDescriptor,
    KvRelease,
    ModelCard,
    Overloaded,
    Phase,
    Role,
    StreamError,
    decode,
    encode,
)
from dynamo_lite.router.admission import Admission
from dynamo_lite.router.kv_index import KvIndex
from dynamo_lite.router.load import LoadTracker
from dynamo_lite.router.policies import Policy, make_policy
from dynamo_lite.runtime.card_files import CardFileCache
from dynamo_lite.runtime.registry import LiveView
from dynamo_lite.runtime.runtime import Runtime

log = logging.getLogger(__name__)

PREFILL, DECODE, AGG = Role.PREFILL, Role.DECODE, Role.AGGREGATED


async def _best_effort(release: Awaitable[object]) -> None:
    try:
        await release
    except Exception as e:  # noqa: BLE001 — the holder's timeout frees the KV anyway
        log.debug("releasing unpulled KV failed: %s", e)


@dataclass(slots=True)
class RouterSettings:
    policy: str = "round-robin"  # --router-mode: round-robin | random | least-loaded | kv
    disagg_threshold: int = 0  # prompts shorter than this skip the prefill worker (0: always disaggregate)
    first_frame_timeout_s: float = 60.0
    prefill_retries: int = 1  # another prefill worker after a failure, before falling back to local prefill
    migration_limit: int = 0  # times a request may move to another worker when its worker dies mid-stream
    kv_block_size: int = 32  # tokens per hashed block in kv mode (match the engines' block size)
    kv_load_weight: float = 4.0  # kv mode: one unit of load costs as much as this many uncached blocks
    kv_approx_ttl_s: float = 120.0  # kv mode without engine events: how long a routed prefix counts as cached
    load_report_ttl_s: float = 2.0  # load reports older than this are ignored
    # The queue of requests waiting for an instance with room, per model. Sized for the seed's benchmark (4096
    # concurrent streams against one prefill and one decode worker of max_inflight 1024: 3072 wait).
    queue_depth: int = 4096  # more waiting requests: 429 + Retry-After
    queue_timeout_s: float = 300.0  # waited longer: 503 + Retry-After (the wait counts in TTFT)
    retry_after_s: int = 1


class Router:
    """Implements the frontend's ``Backend``: model cards, health, and ``generate``."""

    def __init__(self, runtime: Runtime, view: LiveView, settings: RouterSettings) -> None:
        self.runtime = runtime
        self.view = view
        self.settings = settings
        self.load = LoadTracker(settings.load_report_ttl_s)
        self.kv_index = KvIndex(settings.kv_approx_ttl_s)
        # kv mode: the prefill (or aggregated) pick follows the cache; the decode pick follows load.
        decode_policy = "least-loaded" if settings.policy == "kv" else settings.policy
        self._policies: dict[Role, Policy] = {
            role: make_policy(
                decode_policy if role == DECODE else settings.policy,
                self.load,
                self.kv_index,
                settings.kv_block_size,
                settings.kv_load_weight,
            )
            for role in (PREFILL, DECODE, AGG)
        }
        self.admission = Admission(
            view,
            self.load,
            self._policies,
            queue_depth=settings.queue_depth,
            queue_timeout_s=settings.queue_timeout_s,
            retry_after_s=settings.retry_after_s,
        )
        self.load.on_report = self.admission.instance_reported
        view.on_change.append(self.admission.instances_changed)
        self._subscribed = False
        self._background: set[asyncio.Task] = set()
        # Model files published with the cards, for the frontend's preprocessors (distributed discovery only).
        self.card_files: CardFileCache | None = None
        if runtime.settings.etcd_endpoints:
            rs = runtime.settings
            self.card_files = CardFileCache(
                runtime.discovery, rs.root, rs.namespace, cache_root() / "card_files"
            )

    async def start(self) -> None:
        """Subscribe to worker load reports (room for queued requests, least-loaded and kv policies) and, in
        kv mode, to KV cache events."""
        if self._subscribed:
            return
        ns = self.runtime.settings.namespace
        await self.load.start(self.runtime.request_plane, ns)
        if self.settings.policy == "kv":
            await self.kv_index.start(self.runtime.request_plane, ns)
            self.view.on_change.append(self._forget_gone_instances)
        self._subscribed = True

    async def stop(self) -> None:
        if self._subscribed:
            await self.load.stop()
            if self.settings.policy == "kv":
                await self.kv_index.stop()

    def queued_requests(self) -> dict[str, int]:
        """Requests waiting for an instance with room, per model (the frontend's queued-requests gauge)."""
        return self.admission.queued()

    def _forget_gone_instances(self) -> None:
        for iid in self.kv_index.instances():
            if iid not in self.view.instances:
                self.kv_index.remove_instance(iid)

    # ---- what is servable ---------------------------------------------------------------------------------
    def _roles_missing(self, model: str) -> list[Role]:
        """Roles a request for ``model`` needs that have no live instance."""
        if self.view.instances_of(AGG, model):
            return []
        missing = [r for r in (PREFILL, DECODE) if not self.view.instances_of(r, model)]
        decoders = self.view.instances_of(DECODE, model)
        if decoders and PREFILL in missing and self.settings.disagg_threshold < 0:
            missing.remove(PREFILL)  # decode-only serving was asked for explicitly
        return missing

    def model_cards(self) -> list[ModelCard]:
        out: list[ModelCard] = []
        for model, per_instance in sorted(self.view.cards.items()):
            if per_instance and not self._roles_missing(model):
                out.append(next(iter(per_instance.values())))
        return out

    def known_model(self, model: str) -> bool:
        return bool(self.view.cards.get(model))

    def model_card(self, model: str) -> ModelCard | None:
        """The card of ``model`` if any live instance registered it (servable or not: missing roles → 503)."""
        per_instance = self.view.cards.get(model)
        return next(iter(per_instance.values())) if per_instance else None

    def health(self) -> dict:
        by_role: dict[str, list[str]] = {role.value: [] for role in (PREFILL, DECODE, AGG)}
        for info in self.view.instances.values():
            by_role.setdefault(Role(info.role).value, []).append(info.instance_id)
        models = {
            m: ("ready" if not self._roles_missing(m) else f"missing {','.join(self._roles_missing(m))}")
            for m in self.view.cards
        }
        healthy = any(v == "ready" for v in models.values())
        return {"status": "healthy" if healthy else "unhealthy", "instances": by_role, "models": models}

    # ---- placing --------------------------------------------------------------------------------------------
    async def _stream(self, instance: InstanceInfo, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream ``request`` on ``instance`` (placed by the caller, who releases it).

        A stream whose client already has tokens (``generated_ids``) may wait in the worker's engine queue
        for its next one as long as the request may take (the frontend's bound), not ``first_frame_timeout_s``.
        """
        first_timeout = None if request.generated_ids else self.settings.first_frame_timeout_s
        payloads = self.runtime.request_plane.stream(
            instance.address, encode(request), first_timeout=first_timeout
        )
        async with aclosing(payloads):
            async for payload in payloads:
                yield decode(payload, GenerateChunk)

    # ---- the request's path ---------------------------------------------------------------------------------
    async def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        if not self.known_model(model):
            raise StreamError(ErrorInfo(404, f"model {model!r} not found", "model_not_found"))
        if self.view.instances_of(AGG, model):
            async with aclosing(self._continue(AGG, model, request, None)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        # The decode instance first: waiting for room happens before the prefill (so it counts in TTFT), and a
        # request whose first token went out never finds its decode worker full.
        decoder = await self.admission.place(DECODE, model, request)
        handed_over = False
        try:
            first = None
            if decoder.disaggregation_strategy == "decode_first":
                # The decode worker runs the prefill on a prefill worker itself.
                request = GenerateRequest(
                    request.request_id,
                    model,
                    request.token_ids,
                    request.sampling,
                    Phase.DECODE,
                    remote_prefill=True,
                )
            elif len(request.token_ids) >= self.settings.disagg_threshold:
                async with aclosing(self.prefill(model, request)) as chunks:
                    async for chunk in chunks:
                        first = chunk
                if first is not None:
                    if first.finish_reason is not None:
                        yield GenerateChunk(first.token_ids, first.finish_reason, None, first.cached_tokens)
                        return
                    try:
                        yield GenerateChunk(first.token_ids, None, None, first.cached_tokens)
                    except BaseException:
                        self._release_unpulled(
                            first.kv
                        )  # the client left before any decode worker saw the KV
                        raise
            handed_over = True  # _continue releases the decode instance from here
            async with aclosing(self._continue(DECODE, model, request, first, decoder)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            if not handed_over:
                self.admission.release(decoder)

    async def _continue(
        self,
        role: Role,
        model: str,
        request: GenerateRequest,
        first: GenerateChunk | None,
        instance: InstanceInfo | None = None,
    ) -> AsyncIterator[GenerateChunk]:
        """Generate on a ``role`` worker after ``first`` (the prefill's result, if any); if the worker dies
        mid-stream, continue on another one from the prompt plus every token already sent (up to
        ``migration_limit`` times). The client sees one uninterrupted stream.

        ``instance``, if given, was placed for this request; this releases it. A worker at capacity
        (``InstanceBusy``) did nothing: the request is placed again, where there is room."""
        generated = list(first.token_ids) if first else []
        kv = first.kv if first else None
        cached = first.cached_tokens if first else None
        phase = Phase.DECODE if (role == DECODE or generated) else Phase.AGGREGATED
        tried: set[str] = set()
        migrations = 0
        while True:
            if instance is None:
                # Once the client has bytes of its answer, wait for room rather than fail its stream.
                instance = await self.admission.place(role, model, request, tried, bounded=not generated)
            ask = GenerateRequest(
                request.request_id,
                model,
                request.token_ids,
                request.sampling,
                phase,
                kv=kv,
                generated_ids=list(generated),
                remote_prefill=request.remote_prefill and not generated,
            )
            started = busy = False
            try:
                async with aclosing(self._stream(instance, ask)) as chunks:
                    async for chunk in chunks:
                        started = True
                        generated.extend(chunk.token_ids)
                        if cached is not None:
                            # Imported KV was computed for this request, not reused: only the prefill's
                            # prefix-cache hits count as cached prompt tokens.
                            chunk.cached_tokens = cached
                        yield chunk
                return
            except InstanceBusy:
                busy = True  # nothing ran there: placed again below (the KV, if any, is still held for us)
            except StreamError as e:
                if not started:
                    self._release_unpulled(kv)
                if not e.retryable or migrations >= self.settings.migration_limit:
                    raise
                migrations += 1
                log.warning(
                    "request %s: %s worker %s failed (%s); migrating with %d tokens (%d/%d)",
                    request.request_id,
                    role,
                    instance.instance_id,
                    e,
                    len(generated),
                    migrations,
                    self.settings.migration_limit,
                )
                tried.add(instance.instance_id)
                kv, phase = None, Phase.DECODE  # the new worker recomputes prompt + tokens
            except BaseException:
                if not started:
                    self._release_unpulled(kv)
                raise
            finally:
                self.admission.release(instance, refused=busy)
            instance = None

    def _release_unpulled(self, kv: KvDescriptor | None) -> None:
        """Free KV that no decode worker will pull now, instead of leaving it to the lease."""
        if kv is None:
            return
        if kv.release_subject:  # KV a library holds (TensorRT-LLM): its worker aborts the context request
            release = self.runtime.request_plane.publish(
                kv.release_subject, encode(KvRelease(kv.transfer_id))
            )
        elif kv.engine == "torch" and kv.port:
            from dynamo_lite.kv.importer import release_kv

            release = release_kv(kv)
        else:
            return
        task = asyncio.get_running_loop().create_task(_best_effort(release))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def prefill(self, model: str, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Run the context-only phase on a prefill worker; yields its one result chunk.

        Yields nothing if every try failed with a worker fault: the decode worker then prefills locally.
        Client errors (4xx) propagate.
        """
        ask = GenerateRequest(request.request_id, model, request.token_ids, request.sampling, Phase.PREFILL)
        tried: set[str] = set()
        while True:
            try:
                prefill = await self.admission.place(PREFILL, model, request, tried)
            except Overloaded:
                raise
            except StreamError:  # no prefill worker left to try
                if not tried and not self.view.instances_of(PREFILL, model):
                    raise
                return
            busy = False
            try:
                async with aclosing(self._stream(prefill, ask)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                return
            except InstanceBusy:
                busy = True  # nothing ran there: placed again, where there is room
                continue
            except StreamError as e:
                if e.info.status < 500:
                    raise
                tried.add(prefill.instance_id)
                retry = len(tried) <= self.settings.prefill_retries
                log.warning(
                    "prefill on %s failed (%s); %s",
                    prefill.instance_id,
                    e,
                    "retrying" if retry else "decode prefills locally",
                )
                if not retry:
                    return
            finally:
                self.admission.release(prefill, refused=busy)
