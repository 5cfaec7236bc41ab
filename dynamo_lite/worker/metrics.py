"""Worker metrics (``dynamo_lite_worker_*``): request counters kept here, engine state read on each scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dynamo_lite.engines.base import EngineStats


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], labels: dict[str, str]) -> None:
        self._stats = stats
        self._labels = labels

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


class WorkerMetrics:
    def __init__(
        self,
        stats: Callable[[], EngineStats],
        labels: dict[str, str],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        names = list(labels)
        self._labels = labels
        self.requests = Counter(
            "dynamo_lite_worker_requests",
            "Requests handled",
            [*names, "phase", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "dynamo_lite_worker_request_duration_seconds",
            "Request duration",
            [*names, "phase"],
            registry=self.registry,
            buckets=(0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.registry.register(_EngineCollector(stats, labels))

    def observe(self, phase: str, status: str, seconds: float) -> None:
        self.requests.labels(*self._labels.values(), phase, status).inc()
        self.request_seconds.labels(*self._labels.values(), phase).observe(seconds)
