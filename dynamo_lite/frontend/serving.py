"""A prepared request (``prepare.py``) answered: the backend's stream under the request's deadlines, handed to
the response writer (``writer.py``); failures become an error response or the stream's error event; metrics,
trace and access log at the end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from dynamo_lite import tracing
from dynamo_lite.frontend.access_log import access_logger, log_access
from dynamo_lite.frontend.backend import Backend
from dynamo_lite.frontend.choices import Choices, MergedStreams, choice_requests
from dynamo_lite.frontend.errors import as_openai_error
from dynamo_lite.frontend.metrics import FrontendMetrics
from dynamo_lite.frontend.prepared import PreparedRequest, StreamFormat
from dynamo_lite.frontend.settings import FrontendSettings
from dynamo_lite.frontend.sse import JSON_HEADERS, Exchange, WatchedResponse
from dynamo_lite.frontend.writer import Reply, write_response
from dynamo_lite.timing import RequestTiming

logger = logging.getLogger(__name__)


class CompletionService:
    """Answers prepared requests: the backend's stream under the request's deadlines, written by the response
    writer; metrics, trace and access log at the end."""

    def __init__(self, backend: Backend, settings: FrontendSettings, metrics: FrontendMetrics) -> None:
        self._backend = backend
        self._settings = settings
        self._metrics = metrics
        self.active = 0  # requests between accepted and their last byte (the in-flight bound counts these)

    def response(self, p: PreparedRequest, request_id: str) -> WatchedResponse:
        rid = (b"x-request-id", request_id.encode())

        async def produce(ex: Exchange) -> None:
            self.active += 1
            try:
                await self._serve(p, ex, rid)
            finally:
                self.active -= 1

        return WatchedResponse(produce)

    async def _serve(self, p: PreparedRequest, ex: Exchange, rid: tuple[bytes, bytes]) -> None:
        """Run ``p`` on the backend under its deadlines and answer it, streamed or whole; failures become an
        error response (before the first byte) or the stream's error event (after)."""
        choices = Choices(p)
        mm = self._metrics.model(p.model)
        settings = self._settings
        start = asyncio.get_running_loop().time() - (time.perf_counter() - p.arrival)
        mm.inflight.inc()
        mm.input_sequence.observe(len(p.request.token_ids))
        status = 200
        stream: Any = None
        ttft_s = None
        # The router adds its part (instances, queue, prefill, decode) to the task's RequestTiming: the access
        # log names the instances, nvext.extra_fields returns the rest.
        rt = RequestTiming(p.received or p.arrival, preprocessed=p.arrival)
        rt.bind()
        root = _request_span(p)
        token = tracing.activate(root)
        try:
            first_deadline = start + min(settings.timeouts.first_token_s, settings.timeouts.request_s)
            async with asyncio.timeout_at(first_deadline) as t:
                if p.n > 1:
                    requests = choice_requests(p.request, p.n)
                    stream = MergedStreams([self._backend.generate(p.model, r) for r in requests])
                else:
                    stream = self._backend.generate(p.model, p.request)
                first = await anext(stream, None)
                t.reschedule(start + settings.timeouts.request_s)
                first_at = time.perf_counter()
                ttft_s = first_at - p.arrival
                mm.ttft.observe(ttft_s)
                rt.first_token = first_at
                await write_response(Reply(p, ex, rid, choices, rt, mm.itl), stream, first)
                if root is not None:  # the output loop: detokenizing, stop strings, writing
                    tracing.past_span("detokenize", time.perf_counter() - first_at, parent=root)
        except asyncio.CancelledError:
            status = 499 if ex.disconnected else 503
            raise
        except Exception as exc:
            status = await self._report_failure(exc, ex, rid, choices.items[0].fmt)
        finally:
            await self._close_stream(stream, backend_finished=choices.backend_finished)
            tracing.deactivate(token)
            if root is not None:
                root.set_attribute("http.status_code", status)
                root.set_attribute("completion.tokens", choices.completion_tokens)
                root.end()
            self._done(p, mm, choices, status, ex)
            if access_logger.isEnabledFor(logging.INFO):  # its fields cost a few µs a request to gather
                log_access(
                    request_id=p.request.request_id,
                    endpoint=p.endpoint,
                    model=p.model,
                    status=499 if ex.disconnected else status,
                    prompt_tokens=len(p.request.token_ids),
                    completion_tokens=choices.completion_tokens,
                    cached_tokens=choices.cached_tokens,
                    ttft_s=ttft_s,
                    duration_s=time.perf_counter() - p.arrival,
                    finish_reason=choices.finish_reason,
                    instances=rt.instances(),
                )

    async def _report_failure(
        self, exc: Exception, ex: Exchange, rid: tuple[bytes, bytes], stream: StreamFormat | None
    ) -> int:
        """Tell the client in OpenAI's shape — an error event if the stream already started, else an error
        response — and return the status. Bounded: a client that stopped reading must not keep us alive."""
        err = as_openai_error(exc)
        self._metrics.error(err.type)
        try:
            async with asyncio.timeout(self._settings.timeouts.send_error_s):
                if ex.started and stream is not None:  # its last event says what failed
                    await ex.end(stream.error(err.body()))
                else:
                    await ex.respond(err.status, [*JSON_HEADERS, rid, *err.header_pairs()], err.body())
        except Exception:
            pass
        return err.status

    async def _close_stream(self, stream: Any, *, backend_finished: bool) -> None:
        """Close the backend stream. After its final chunk a well-behaved stream simply ends: drain it rather
        than close it, so the backend doesn't see a cancellation. Anything else is closed (= cancelled)."""
        if stream is None:
            return
        try:
            async with asyncio.timeout(self._settings.timeouts.stream_close_s):
                if backend_finished:
                    try:
                        await stream.__anext__()
                    except StopAsyncIteration:
                        return
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
        except Exception as e:
            logger.warning("closing the backend stream failed: %r", e)

    def _done(self, p: PreparedRequest, mm: Any, choices: Choices, status: int, ex: Exchange) -> None:
        mm.inflight.dec()
        mm.output_tokens.inc(choices.completion_tokens)
        mm.output_sequence.observe(choices.completion_tokens)
        mm.duration.observe(time.perf_counter() - p.arrival)
        if ex.disconnected:
            self._metrics.disconnects.inc()
        self._metrics.request_done(p.model, p.endpoint, status, p.stream)


def _request_span(p: PreparedRequest) -> Any:
    """The trace's root span for ``p`` (from its arrival) with its ``preprocess`` child; None when tracing is
    off."""
    received = p.received or p.arrival
    now = time.perf_counter()
    root = tracing.start_span(
        "request",
        start_s_ago=now - received,
        attributes={"request.id": p.request.request_id, "model": p.model, "endpoint": p.endpoint},
    )
    if root is not None:
        tracing.past_span(
            "preprocess",
            p.arrival - received,
            {"prompt.tokens": len(p.request.token_ids)},
            parent=root,
            ended_s_ago=now - p.arrival,
        )
    return root
