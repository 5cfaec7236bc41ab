"""The prefill → decode handoff, in one place: the router runs it for prefill_first, a decode worker for
decode_first (``dynamo_lite.worker.handlers``); each gets it from ``placement.build_placement``.

1. The prompt goes to a prefill worker as a context-only request (``Phase.PREFILL``); its one chunk is the first
   token and a ``KvDescriptor`` (where the prompt's KV is held). A worker fault there is retried on another
   prefill worker (``prefill_retries``), then given up: the decode side prefills locally. Client errors (4xx)
   and a full queue (``Overloaded``) end the request.
2. The first token goes out at once; then the decode continues from the KV (``Phase.DECODE``, ``kv``,
   ``generated_ids``) and pulls it straight from the prefill worker.
3. KV that no decode worker will pull is released now, not when its lease runs out: when the client leaves
   before a decode started on it, and when a decode ends before its first chunk (failed, cancelled, closed) —
   except a capacity refusal (``InstanceBusy``: nothing ran there, the KV waits for the next instance).

Usage counts only the prefill's prefix-cache hits as cached prompt tokens: the imported KV was computed for this
very request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

import msgspec

from dynamo_lite import timing, tracing
from dynamo_lite.placement.admission import Admission
from dynamo_lite.protocol import (
    EngineKind,
    GenerateChunk,
    GenerateRequest,
    IncompatibleWire,
    InstanceBusy,
    InstanceInfo,
    KvDescriptor,
    KvRelease,
    Overloaded,
    Phase,
    RequestPlane,
    Role,
    StreamError,
    WireError,
    decode,
    encode,
)

log = logging.getLogger(__name__)

PLANE_RETRIES = 3  # a request not yet started is placed again this often after the request plane failed

Decode = Callable[[GenerateRequest], AsyncIterator[GenerateChunk]]
"""Runs a request on the decode side (a decode worker over the request plane, or this worker's engine)."""


async def stream_chunks(
    plane: RequestPlane, instance: InstanceInfo, request: GenerateRequest, first_token_s: float | None
) -> AsyncIterator[GenerateChunk]:
    """``request`` on ``instance``, as chunks.

    A request whose client already has tokens (``generated_ids``) may wait in the worker's engine queue for its
    next one as long as the request may take (the frontend's bound), not ``first_token_s``.
    """
    first_timeout = None if request.generated_ids else first_token_s
    payloads = plane.stream(instance.address, encode(request), first_timeout=first_timeout)
    async with aclosing(payloads):
        async for payload in payloads:
            try:
                chunk = decode(payload, GenerateChunk)
            except WireError as e:
                raise IncompatibleWire(f"unreadable reply from {instance.instance_id}: {e}") from e
            yield chunk


class PrefillHandoff:
    """Runs the prefill on a prefill worker and hands its KV to the decode side (see the module docstring)."""

    def __init__(
        self,
        plane: RequestPlane,
        admission: Admission,
        *,
        first_token_s: float | None,
        prefill_retries: int,
    ) -> None:
        self.plane = plane
        self.admission = admission
        self.first_token_s = first_token_s
        self.prefill_retries = prefill_retries
        self._background: set[asyncio.Task[None]] = set()

    async def run(self, model: str, request: GenerateRequest, decode: Decode) -> AsyncIterator[GenerateChunk]:
        """Prefill ``request`` on a prefill worker, then ``decode`` it from there: the first token as soon as it
        is there, then the decode's chunks. Without a prefill result ``decode`` gets ``request`` as it is
        (a local prefill)."""
        first = await self.prefill(model, request)
        if first is None:
            async with aclosing(decode(request)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        if first.finish_reason is not None:  # ended on its first token
            yield GenerateChunk(
                first.token_ids,
                first.finish_reason,
                cached_tokens=first.cached_tokens,
                logprobs=first.logprobs,
                prompt_logprobs=first.prompt_logprobs,
            )
            return
        try:
            # the first token's logprobs, when asked for, come from the prefill
            yield GenerateChunk(
                first.token_ids,
                cached_tokens=first.cached_tokens,
                logprobs=first.logprobs,
                prompt_logprobs=first.prompt_logprobs,
            )
        except BaseException:
            self.release(first.kv)  # the client left before a decode saw the KV
            raise
        continued = GenerateRequest(
            request.request_id,
            model,
            request.token_ids,
            # the prompt was scored by the prefill: the decode side never scores it again (on a recompute)
            msgspec.structs.replace(request.sampling, prompt_logprobs=None),
            Phase.DECODE,
            kv=first.kv,
            generated_ids=list(first.token_ids),
        )
        async with aclosing(self.decode_from(first.kv, decode(continued))) as chunks:
            async for chunk in chunks:
                chunk.cached_tokens = first.cached_tokens
                yield chunk

    async def decode_from(
        self, kv: KvDescriptor | None, chunks: AsyncIterator[GenerateChunk]
    ) -> AsyncIterator[GenerateChunk]:
        """``chunks`` of a decode started on ``kv``; if they end before the first one, nobody pulled the KV."""
        started = keep = False
        try:
            async with aclosing(chunks):
                async for chunk in chunks:
                    started = True
                    yield chunk
        except InstanceBusy:
            keep = True  # refused before anything ran: the KV waits for the next instance
            raise
        finally:
            if not started and not keep:
                self.release(kv)

    async def prefill(self, model: str, request: GenerateRequest) -> GenerateChunk | None:
        """The context-only phase on a prefill worker: its one result chunk (the first token and the KV, or a
        request that ended on that token). None if every try failed with a worker fault."""
        ask = GenerateRequest(request.request_id, model, request.token_ids, request.sampling, Phase.PREFILL)
        tried: set[str] = set()
        plane_failures = 0
        rt = timing.current()
        while True:
            try:
                with timing.routing(Role.PREFILL):
                    instance = await self.admission.place(Role.PREFILL, model, request, tried)
            except Overloaded:
                raise
            except StreamError:  # no prefill worker left to try
                if not tried and not self.admission.view.instances_of(Role.PREFILL, model):
                    raise
                return None
            if rt is not None:
                rt.placed(True, instance.instance_id)
            busy = False
            result: GenerateChunk | None = None
            sent = time.perf_counter()
            try:
                with tracing.span("prefill", {"instance.id": instance.instance_id}):
                    async with aclosing(
                        stream_chunks(self.plane, instance, ask, self.first_token_s)
                    ) as chunks:
                        async for chunk in chunks:
                            result = chunk
                if rt is not None and result is not None:
                    rt.prefilled(instance.instance_id, result.timing, time.perf_counter() - sent)
                return result
            except InstanceBusy:
                busy = True  # nothing ran there: placed again, where there is room
                continue
            except StreamError as e:
                if e.info.status < 500:
                    raise
                if e.plane_failed and plane_failures < PLANE_RETRIES:
                    plane_failures += 1  # NATS, not the worker: placed again once the plane is back
                    log.warning(
                        "prefill on %s: request plane failed (%s); placing it again", instance.instance_id, e
                    )
                    continue
                tried.add(instance.instance_id)
                retry = len(tried) <= self.prefill_retries
                log.warning(
                    "prefill on %s failed (%s); %s",
                    instance.instance_id,
                    e,
                    "retrying" if retry else "decode prefills locally",
                )
                if not retry:
                    return None
            finally:
                self.admission.release(instance, refused=busy)

    def release(self, kv: KvDescriptor | None) -> None:
        """Free KV that no decode worker will pull now, instead of leaving it to the lease (best effort)."""
        if kv is None:
            return
        if kv.release_subject:  # KV a library holds (TensorRT-LLM): its worker aborts the context request
            release: Awaitable[object] = self.plane.publish(
                kv.release_subject, encode(KvRelease(kv.transfer_id))
            )
        elif kv.engine in (EngineKind.TORCH, EngineKind.LLAMACPP) and kv.port:
            from dynamo_lite.kv.importer import release_kv

            release = release_kv(kv)
        else:
            return
        task = asyncio.get_running_loop().create_task(_best_effort(release))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _best_effort(release: Awaitable[object]) -> None:
    try:
        await release
    except Exception as e:  # noqa: BLE001 — the holder's lease frees the KV anyway
        log.debug("releasing unpulled KV failed: %s", e)
