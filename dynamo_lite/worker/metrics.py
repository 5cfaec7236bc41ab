"""Worker metrics: NVIDIA Dynamo's component metrics (``dynamo_component_*``, with the names and labels its
dashboards query; the facts are in ``dynamo_lite/frontend/dynamo_metric_facts.yaml``) and our own
(``dynamo_lite_worker_*``). Request counters are kept here, engine state is read on each scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dynamo_lite.engines.base import EngineStats

COMPONENT = "dynamo_component_"
# Dynamo's label names for a component's metrics (prometheus_names.rs, ``labels``)
COMPONENT_LABELS = ("dynamo_namespace", "dynamo_component", "dynamo_endpoint", "model")
_DURATION_BUCKETS = (0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def component_name(role: str) -> str:
    """Dynamo's ``dynamo_component`` value for a worker of ``role``: its dashboards select prefill workers by
    "prefill" and decode (and aggregated) workers by "backend"."""
    return "prefill" if role == "prefill" else "backend"


class _EngineCollector(Collector):
    def __init__(
        self, stats: Callable[[], EngineStats], labels: dict[str, str], component: dict[str, str]
    ) -> None:
        self._stats = stats
        self._labels = labels
        self._component = component

    def collect(self) -> Iterator:
        s = self._stats()
        names, values = list(self._labels), list(self._labels.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"dynamo_lite_worker_{name}", doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"dynamo_lite_worker_{name}", doc, labels=names)
            c.add_metric(values, value)
            return c

        yield gauge("active_seqs", "Sequences in the running batch", s.active_seqs)
        yield gauge("queued_requests", "Requests waiting for a batch slot", s.queued)
        yield gauge("kv_bytes_held", "KV bytes held for transfer to a decode worker", s.kv_bytes_held)
        yield gauge("kv_usage", "Fraction of the KV cache in use", s.kv_usage)
        yield gauge("batch_size", "Sequences in the last engine step", s.last_batch_size)
        yield counter("generated_tokens", "Tokens generated", s.total_tokens)
        yield counter("kv_transfers", "KV transfers imported", s.kv_transfers)
        yield counter("kv_transfer_bytes", "KV bytes imported", s.kv_transfer_bytes)
        yield counter("kv_transfer_seconds", "Time spent importing KV", s.kv_transfer_seconds)
        yield counter("kv_recomputes", "Prefills recomputed locally after a failed KV pull", s.kv_recomputes)

        # Dynamo's KV stats (kvstats in prometheus_names.rs); its usage "percent" is a fraction (0.0-1.0) too.
        cnames, cvalues = list(self._component), list(self._component.values())
        usage = GaugeMetricFamily(
            COMPONENT + "gpu_cache_usage_percent", "KV cache usage (0.0-1.0)", labels=cnames
        )
        usage.add_metric(cvalues, s.kv_usage)
        yield usage
        if s.kv_total_blocks:
            blocks = GaugeMetricFamily(
                COMPONENT + "total_blocks", "KV cache blocks of the worker", labels=cnames
            )
            blocks.add_metric(cvalues, s.kv_total_blocks)
            yield blocks


class WorkerMetrics:
    """``labels``: our labels (model, role, instance); ``component``: Dynamo's (``COMPONENT_LABELS``), for the
    ``dynamo_component_*`` metrics (default: derived from ``labels``, namespace "dynamo")."""

    def __init__(
        self,
        stats: Callable[[], EngineStats],
        labels: dict[str, str],
        registry: CollectorRegistry | None = None,
        component: dict[str, str] | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        names = list(labels)
        self._labels = labels
        if component is None:
            component = {
                "dynamo_namespace": "dynamo",
                "dynamo_component": component_name(labels.get("role", "")),
                "dynamo_endpoint": "generate",
                "model": labels.get("model", ""),
            }
        self._component = component
        cnames = list(component)
        r = self.registry
        self.requests = Counter(
            "dynamo_lite_worker_requests", "Requests handled", [*names, "phase", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "dynamo_lite_worker_request_duration_seconds",
            "Request duration",
            [*names, "phase"],
            registry=r,
            buckets=_DURATION_BUCKETS,
        )
        self.registry.register(_EngineCollector(stats, labels, component))
        # Dynamo's work-handler metrics (work_handler in prometheus_names.rs), bound to this worker's labels.
        cv = list(component.values())
        self.component_requests = Counter(
            COMPONENT + "requests", "Total number of requests processed", cnames, registry=r
        ).labels(*cv)
        self.component_duration = Histogram(
            COMPONENT + "request_duration_seconds",
            "Time spent processing requests",
            cnames,
            registry=r,
            buckets=_DURATION_BUCKETS,
        ).labels(*cv)
        self.component_inflight = Gauge(
            COMPONENT + "inflight_requests", "Requests being processed", cnames, registry=r
        ).labels(*cv)
        self.request_bytes = Counter(
            COMPONENT + "request_bytes", "Bytes received in requests", cnames, registry=r
        ).labels(*cv)
        self.response_bytes = Counter(
            COMPONENT + "response_bytes", "Bytes sent in responses", cnames, registry=r
        ).labels(*cv)
        self._component_errors = Counter(
            COMPONENT + "errors", "Errors in request processing", [*cnames, "error_type"], registry=r
        )

    def observe(self, phase: str, status: str, seconds: float) -> None:
        self.requests.labels(*self._labels.values(), phase, status).inc()
        self.request_seconds.labels(*self._labels.values(), phase).observe(seconds)

    def component_done(self, status: str, seconds: float) -> None:
        """One request through the endpoint, as Dynamo's work handler counts it (``status``: ok, error,
        cancelled)."""
        self.component_requests.inc()
        self.component_duration.observe(seconds)
        if status == "error":
            self._component_errors.labels(*self._component.values(), "generate").inc()
