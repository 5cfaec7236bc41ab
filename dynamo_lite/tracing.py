"""OpenTelemetry tracing of requests: off unless configured the usual way (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_TRACES_EXPORTER``; ``pip install dynamo_lite[tracing]``).

One trace per request, across processes: the frontend's ``request`` span holds ``preprocess``, ``route`` (the
wait for an instance with room), ``prefill`` and ``decode`` (the router's round trips) and ``detokenize``; the
workers' ``prefill`` and ``decode`` spans (with ``kv_transfer``) are children of the router's, their context
carried in the request plane's NATS message headers (W3C ``traceparent``).

Off, every function here is a check of one global: nothing of OpenTelemetry is imported. Each process calls
``setup`` once at its edge and ``shutdown`` on the way out (spans are batched; shutdown flushes them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
_SCHEDULE_DELAY_MS = 200  # spans leave the process this long after they end (batched), unless OTEL_BSP_* says

_tracer: Any = None  # an opentelemetry Tracer while tracing is on
_provider: Any = None
_otel: Any = None  # the opentelemetry modules this uses, imported by setup()


def configured(env: Mapping[str, str]) -> bool:
    """Whether ``env`` asks for traces (OpenTelemetry's own variables)."""
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(
        exporter or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def enabled() -> bool:
    return _tracer is not None


def setup(service_name: str, env: Mapping[str, str] | None = None) -> bool:
    """Start exporting this process's spans if ``env`` (default: the environment) configures tracing; the
    resource's ``service.name`` is ``OTEL_SERVICE_NAME`` or ``service_name``. Returns whether tracing is on."""
    global _tracer, _provider, _otel
    env = os.environ if env is None else env
    if _tracer is not None or not configured(env):
        return _tracer is not None
    try:
        from opentelemetry import context, propagate, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning(
            "tracing is configured but OpenTelemetry is not installed: pip install 'dynamo_lite[tracing]'"
        )
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
        exporter: Any = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_* as usual
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    _provider = TracerProvider(resource=Resource.create(attributes))
    delay = None if env.get("OTEL_BSP_SCHEDULE_DELAY") else _SCHEDULE_DELAY_MS
    _provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=delay))
    _tracer = _provider.get_tracer("dynamo_lite")
    _otel = _Otel(context, propagate, trace)
    log.info("tracing on: %s", service_name)
    return True


def shutdown() -> None:
    """Flush and stop the exporter (spans still batched are sent)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


class _Otel:
    def __init__(self, context: Any, propagate: Any, trace: Any) -> None:
        self.context, self.propagate, self.trace = context, propagate, trace


# ---- spans ------------------------------------------------------------------------------------------------


def span(name: str, attributes: dict[str, Any] | None = None) -> contextlib.AbstractContextManager[Any]:
    """A span of the block, a child of the current one, current inside it (a no-op when tracing is off)."""
    if _tracer is None:
        return contextlib.nullcontext()
    return _tracer.start_as_current_span(name, attributes=attributes)


def start_span(
    name: str, *, start_s_ago: float = 0.0, parent: Any = None, attributes: dict[str, Any] | None = None
) -> Any:
    """A span started ``start_s_ago`` seconds ago (child of ``parent``, else of the current span), not made
    current; the caller ends it. None when tracing is off."""
    if _tracer is None:
        return None
    ctx = _otel.trace.set_span_in_context(parent) if parent is not None else None
    start = time.time_ns() - int(start_s_ago * 1e9)
    return _tracer.start_span(name, context=ctx, start_time=start, attributes=attributes)


def past_span(
    name: str,
    seconds: float,
    attributes: dict[str, Any] | None = None,
    *,
    parent: Any = None,
    ended_s_ago=0.0,
) -> None:
    """Record a span that ended ``ended_s_ago`` seconds ago and lasted ``seconds`` (child of ``parent``, else of
    the current span)."""
    if _tracer is None:
        return
    end = time.time_ns() - int(ended_s_ago * 1e9)
    ctx = _otel.trace.set_span_in_context(parent) if parent is not None else None
    s = _tracer.start_span(name, context=ctx, start_time=end - int(seconds * 1e9), attributes=attributes)
    s.end(end_time=end)


def activate(s: Any) -> Any:
    """Make span ``s`` current in this task; returns the token for ``deactivate`` (None: nothing to undo)."""
    if s is None:
        return None
    return _otel.context.attach(_otel.trace.set_span_in_context(s))


def deactivate(token: Any) -> None:
    if token is not None:
        _otel.context.detach(token)


@contextlib.contextmanager
def ended(s: Any) -> Iterator[Any]:
    """End span ``s`` (if any) when the block ends."""
    try:
        yield s
    finally:
        if s is not None:
            s.end()


# ---- context across processes -----------------------------------------------------------------------------


def headers() -> dict[str, str] | None:
    """The current span's context as message headers (``traceparent``), or None."""
    if _tracer is None:
        return None
    carrier: dict[str, str] = {}
    _otel.propagate.inject(carrier)
    return carrier or None


def attach_headers(message_headers: Mapping[str, str] | None) -> None:
    """Continue the trace of a request that came with ``message_headers``, in the task serving it (the task's
    context ends with it, so there is nothing to detach)."""
    if _tracer is None or not message_headers or TRACEPARENT not in message_headers:
        return
    _otel.context.attach(_otel.propagate.extract(dict(message_headers)))
