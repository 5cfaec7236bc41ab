"""``dynamo_lite.tracing``: configured by OpenTelemetry's own variables, a no-op otherwise."""

from __future__ import annotations

from dynamo_lite import tracing


def test_configured_by_the_usual_variables():
    assert not tracing.configured({})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"})
    assert tracing.configured({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.configured({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"})


def test_off_everything_is_a_no_op():
    assert not tracing.setup("x", env={})
    assert not tracing.enabled() and tracing.headers() is None
    with tracing.span("s") as s:
        assert s is None
    assert tracing.start_span("s") is None and tracing.activate(None) is None
    tracing.past_span("p", 0.1)
    tracing.attach_headers({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
