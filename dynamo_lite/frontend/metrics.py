"""Prometheus metrics of the frontend (``dynamo_lite_frontend_*``), in a registry of the app's own."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric

PREFIX = "dynamo_lite_frontend_"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)
_ACK_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.25, 2.5, 5.0, 10.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class LoopHistogramChild:
    """One label set of a ``LoopHistogram``: a bisect and two adds per observation, no lock."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value


class LoopHistogram:
    """A histogram for the per-chunk path, updated from the event loop thread only.

    prometheus-client's ``Histogram.observe`` takes a lock per bucket and costs ~1 us; observed once per SSE
    chunk that is a noticeable share of the chunk's budget. Exposed through the registry like any histogram.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: list[str], buckets: tuple[float, ...], registry
    ) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = labelnames
        self._bounds = tuple(sorted(buckets))
        self._children: dict[tuple[str, ...], LoopHistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> LoopHistogramChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = LoopHistogramChild(self._bounds)
        return child

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*self._bounds, float("inf")), child.counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
            family.add_metric(list(values), buckets, child.sum)
        yield family


class QueuedRequests:
    """``dynamo_frontend_queued_requests{model}`` (NVIDIA Dynamo's name): requests waiting for an instance with
    room, read from the router on each scrape."""

    NAME = "dynamo_frontend_queued_requests"

    def __init__(self, source: Callable[[], dict[str, int]], registry) -> None:
        self._source = source
        registry.register(self)

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(self.NAME, "Requests waiting for a worker with room", labels=["model"])]

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.NAME, "Requests waiting for a worker with room", labels=["model"])
        for model, count in sorted(self._source().items()):
            family.add_metric([model], count)
        yield family


class ModelMetrics:
    """The metric children of one model, bound once (``labels()`` is too slow for the per-chunk path)."""

    __slots__ = ("inflight", "ttft", "itl", "output_tokens", "input_tokens", "disconnects", "duration")

    def __init__(self, m: FrontendMetrics, model: str) -> None:
        self.inflight = m.inflight.labels(model)
        self.ttft = m.ttft.labels(model)
        self.itl = m.itl.labels(model)
        self.output_tokens = m.output_tokens.labels(model)
        self.input_tokens = m.input_tokens.labels(model)
        self.disconnects = m.disconnects.labels(model)
        self.duration = m.duration.labels(model)


class FrontendMetrics:
    """All frontend metrics. ``model`` labels only ever carry served model names (bounded cardinality)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests", "Completion requests answered", ["model", "endpoint", "status"], registry=r
        )
        self.inflight = Gauge(PREFIX + "inflight_requests", "Requests being served", ["model"], registry=r)
        self.ttft = Histogram(
            PREFIX + "ttft_seconds", "Time to first token", ["model"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = LoopHistogram(
            PREFIX + "itl_seconds",
            "Inter-token latency (gap between chunks divided by the chunk's tokens; one sample per chunk)",
            ["model"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.output_tokens = Counter(PREFIX + "output_tokens", "Generated tokens", ["model"], registry=r)
        self.input_tokens = Counter(PREFIX + "input_tokens", "Prompt tokens", ["model"], registry=r)
        self.disconnects = Counter(
            PREFIX + "disconnects",
            "Clients that went away before their response was complete",
            ["model"],
            registry=r,
        )
        self.errors = Counter(
            PREFIX + "errors", "Error responses and error events, by type", ["type"], registry=r
        )
        self.duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Request duration, arrival to last byte",
            ["model"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.request_plane_ack = LoopHistogram(
            PREFIX + "request_plane_ack_seconds",
            "Request sent to a worker → its acknowledgement (or capacity refusal) seen",
            [],
            buckets=_ACK_BUCKETS,
            registry=r,
        ).labels()
        self._models: dict[str, ModelMetrics] = {}
        self._queued: QueuedRequests | None = None

    def watch_queue(self, source: Callable[[], dict[str, int]]) -> None:
        """Export ``source()`` (model → requests waiting) as the queued-requests gauge."""
        if self._queued is None:
            self._queued = QueuedRequests(source, self.registry)

    def model(self, name: str) -> ModelMetrics:
        mm = self._models.get(name)
        if mm is None:
            mm = self._models[name] = ModelMetrics(self, name)
        return mm

    def request_done(self, model: str, endpoint: str, status: int) -> None:
        self.requests.labels(model, endpoint, str(status)).inc()

    def error(self, error_type: str) -> None:
        self.errors.labels(error_type).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
