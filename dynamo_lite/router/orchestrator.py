"""The in-process router: picks instances per role and runs the disaggregation.

prefill_first (default): the prefill → decode handoff (``placement/handoff.py``) on a prefill worker, then a
decode worker.
decode_first: the decode worker is asked directly and runs the same handoff itself.
Conditional: prompts shorter than ``disagg_threshold`` go straight to a decode worker, which prefills locally
(a negative threshold: always). If the prefill worker fails, the decode worker prefills locally (the request
still completes).

Every instance is reserved before it is asked (``placement/admission.py``): a request no instance has room for
waits here, in a bounded queue per model. The decode instance is reserved first, so that a request whose first token was
sent never finds its decode worker full; a worker that refuses anyway (``InstanceBusy``) is retried elsewhere or
requeued. A worker that fails in a way the request plane calls ``retryable`` (lost, unreachable) mid-stream is
replaced by another (``migration_limit``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from dynamo_lite import timing, tracing
from dynamo_lite.model_files import cache_root
from dynamo_lite.placement import Placement
from dynamo_lite.placement.handoff import PLANE_RETRIES, stream_chunks
from dynamo_lite.protocol import (
    DisaggregationStrategy,
    ErrorInfo,
    GenerateChunk,
    GenerateRequest,
    InstanceBusy,
    InstanceInfo,
    InstanceUnavailable,
    ModelCard,
    Overloaded,
    Phase,
    RequestPlaneDown,
    Role,
    StreamError,
)
from dynamo_lite.router.settings import RouterSettings
from dynamo_lite.runtime.card_files import CardFileCache
from dynamo_lite.runtime.registry import LiveView
from dynamo_lite.runtime.runtime import Runtime

log = logging.getLogger(__name__)

PREFILL, DECODE, AGG = Role.PREFILL, Role.DECODE, Role.AGGREGATED


class Router:
    """Implements the frontend's ``Backend``: model cards, health, and ``generate``."""

    def __init__(self, runtime: Runtime, view: LiveView, settings: RouterSettings) -> None:
        self.runtime = runtime
        self.view = view
        self.settings = settings
        self.placement = Placement(view, runtime.request_plane, runtime.settings.namespace, settings)
        self.load = self.placement.load
        self.kv_index = self.placement.kv_index
        self.admission = self.placement.admission
        self.handoff = self.placement.handoff
        # Model files published with the cards, for the frontend's preprocessors (distributed discovery only).
        self.card_files: CardFileCache | None = None
        if runtime.settings.etcd_endpoints:
            rs = runtime.settings
            self.card_files = CardFileCache(
                runtime.discovery, rs.root, rs.namespace, cache_root() / "card_files"
            )

    async def start(self) -> None:
        """Subscribe to worker load reports (and, in kv mode, KV cache events)."""
        await self.placement.start()

    async def stop(self) -> None:
        await self.placement.stop()

    def refusal(self) -> Overloaded | None:
        """The refusal every request would get now (each served model's queue is full): the frontend answers
        it before reading a body."""
        return self.admission.refusal(list(self.view.cards))

    def queued_requests(self) -> dict[str, int]:
        """Requests waiting for an instance with room, per model (the frontend's queued-requests gauge)."""
        return self.admission.queued()

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

    # ---- the request's path ---------------------------------------------------------------------------------
    def _disaggregate(self, request: GenerateRequest) -> bool:
        threshold = self.settings.disagg_threshold
        return threshold >= 0 and len(request.token_ids) >= threshold

    async def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        if not self.known_model(model):
            raise StreamError(ErrorInfo(404, f"model {model!r} not found", "model_not_found"))
        if self.view.instances_of(AGG, model):
            async with aclosing(self._continue(AGG, model, request, [])) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        # The decode instance first: waiting for room happens before the prefill (so it counts in TTFT), and a
        # request whose first token went out never finds its decode worker full.
        with timing.routing(DECODE):
            placed = [await self.admission.place(DECODE, model, request)]

        def on_decoder(continued: GenerateRequest) -> AsyncIterator[GenerateChunk]:
            return self._continue(DECODE, model, continued, placed)

        try:
            if not self._disaggregate(request):
                chunks = on_decoder(request)  # the decode worker prefills locally
            elif placed[0].disaggregation_strategy == DisaggregationStrategy.DECODE_FIRST:
                # The decode worker runs the prefill on a prefill worker itself.
                ask = GenerateRequest(
                    request.request_id,
                    model,
                    request.token_ids,
                    request.sampling,
                    Phase.DECODE,
                    remote_prefill=True,
                )
                chunks = on_decoder(ask)
            else:
                chunks = self.handoff.run(model, request, on_decoder)
            async with aclosing(chunks):
                async for chunk in chunks:
                    yield chunk
        finally:
            for instance in placed:  # still ours: the decode never started
                self.admission.release(instance)

    async def _continue(
        self, role: Role, model: str, request: GenerateRequest, placed: list[InstanceInfo]
    ) -> AsyncIterator[GenerateChunk]:
        """Generate on a ``role`` worker, continuing ``request`` (its ``kv`` and ``generated_ids``, if any);
        if the worker dies mid-stream, continue on another one from the prompt plus every token already sent
        (up to ``migration_limit`` times). The client sees one uninterrupted stream.

        An instance in ``placed`` was reserved for this request: this takes it over (and releases it). A worker
        at capacity (``InstanceBusy``) or one that never got the request (``InstanceUnavailable``) did nothing:
        the request is placed again, where there is room (on another worker, for the latter)."""
        instance = placed.pop() if placed else None
        generated = list(request.generated_ids)
        kv = request.kv
        phase = Phase.DECODE if (role == DECODE or generated) else Phase.AGGREGATED
        tried: set[str] = set()
        migrations = plane_failures = unreached = 0
        rt = timing.current()
        while True:
            if instance is None:
                # Once the client has bytes of its answer, wait for room rather than fail its stream.
                with timing.routing(role):
                    instance = await self.admission.place(role, model, request, tried, bounded=not generated)
            if rt is not None:
                rt.placed(role == PREFILL, instance.instance_id)
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
                chunks = stream_chunks(
                    self.runtime.request_plane, instance, ask, self.settings.timeouts.first_token_s
                )
                if rt is not None:
                    rt.decode_sent_now()
                with tracing.span(phase.name.lower(), {"instance.id": instance.instance_id}):
                    async with aclosing(chunks):
                        async for chunk in chunks:
                            started = True
                            generated.extend(chunk.token_ids)
                            if rt is not None:
                                rt.decode_chunk(
                                    instance.instance_id, chunk.timing, chunk.finish_reason is not None
                                )
                            yield chunk
                return
            except InstanceBusy:
                busy = True  # nothing ran there: placed again below (the KV, if any, is still held for us)
            except StreamError as e:
                if e.plane_failed and not started and plane_failures < PLANE_RETRIES:
                    # NATS went down, not the worker, and the client has nothing yet: placed again once the
                    # plane is back (admission waits for it), the same worker as good as any; the KV, if the
                    # request may have reached the worker, recomputed.
                    plane_failures += 1
                    log.warning(
                        "request %s: request plane failed (%s); placing it again", request.request_id, e
                    )
                    if kv is not None and not isinstance(e, RequestPlaneDown):
                        self.handoff.release(kv)
                        kv, phase = None, Phase.DECODE
                    continue
                if isinstance(e, InstanceUnavailable) and not started and unreached < PLANE_RETRIES:
                    # Nothing ran there: nobody serves it (a worker that deregistered as we picked it — a
                    # scale-down) or the request was lost on the way. Placed again on another worker, not a
                    # migration; the KV, if any, was not pulled and is still held for us.
                    unreached += 1
                    tried.add(instance.instance_id)
                    log.warning(
                        "request %s: %s worker %s did not take it (%s); placing it again",
                        request.request_id,
                        role,
                        instance.instance_id,
                        e,
                    )
                    continue
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
                if not e.plane_failed:  # a stream the plane broke may continue on the same worker
                    tried.add(instance.instance_id)
                if not started:
                    self.handoff.release(kv)  # the next worker recomputes: nobody will pull it
                kv, phase = None, Phase.DECODE
            finally:
                self.admission.release(instance, refused=busy)
                instance = None
