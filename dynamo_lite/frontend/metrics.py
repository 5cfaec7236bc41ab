"""Prometheus metrics of the frontend, in a registry of the app's own.

The request metrics carry NVIDIA Dynamo's names and labels (``dynamo_frontend_*``, facts with their source in
``dynamo_metric_facts.yaml``), so Dynamo's Grafana dashboards and alerts work on dynamo_lite unchanged; what
Dynamo has no name for stays ``dynamo_lite_frontend_*``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric

DYNAMO = "dynamo_frontend_"  # Dynamo's names (lib/runtime/src/metrics/prometheus_names.rs)
PREFIX = "dynamo_lite_frontend_"  # ours, where Dynamo has none
CONTENT_TYPE = CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from dynamo_lite.frontend.sibling_metrics import SiblingMetrics


def log_buckets(low: float, high: float, count: int) -> tuple[float, ...]:
    """0, then ``count - 1`` log-spaced bounds from ``low`` to ``high`` at two significant figures: the shape
    of Dynamo's ``generate_log_buckets`` (lib/llm/src/http/service/metrics.rs)."""
    n = count - 1
    if n <= 1:
        return (0.0, high)[: max(count, 0)]
    bounds = {float(f"{low * (high / low) ** (i / (n - 1)):.2g}") for i in range(n)}
    return (0.0, *sorted(bounds))


# Dynamo's defaults (min, max, count), metrics.rs
_TTFT_BUCKETS = log_buckets(0.001, 480.0, 18)
_ITL_BUCKETS = log_buckets(0.001, 2.0, 13)
_DURATION_BUCKETS = log_buckets(1.0, 512.0, 10)
_ISL_BUCKETS = log_buckets(50.0, 128000.0, 12)
_OSL_BUCKETS = log_buckets(50.0, 32000.0, 10)
_ACK_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.25, 2.5, 5.0, 10.0)

# Dynamo's label values: endpoint (our route → its name), request_type, status, error_type
ENDPOINT_LABEL = {"chat": "chat_completions", "completions": "completions", "responses": "responses"}
STREAM, UNARY = "stream", "unary"
SUCCESS, ERROR = "success", "error"


def error_type(status: int) -> str:
    """Dynamo's ``error_type`` label for an HTTP status ("" for success)."""
    if status < 400:
        return ""
    if status == 404:
        return "not_found"
    if status == 499:
        return "cancelled"
    if status in (429, 503):
        return "overload"
    if status == 501:
        return "not_implemented"
    if status < 500:
        return "validation"
    return "internal"


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
    """``dynamo_frontend_queued_requests{model}``: requests waiting for an instance with room, read from the
    router on each scrape."""

    NAME = DYNAMO + "queued_requests"

    def __init__(
        self, source: Callable[[], dict[str, int]], served: Callable[[], Iterable[str]], registry
    ) -> None:
        self._source = source
        self._served = served  # models that had requests: shown at 0 when none waits, as Dynamo's gauge
        registry.register(self)

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(self.NAME, "Requests waiting for a worker with room", labels=["model"])]

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.NAME, "Requests waiting for a worker with room", labels=["model"])
        waiting = self._source()
        for model in sorted({*waiting, *self._served()}):
            family.add_metric([model], waiting.get(model, 0))
        yield family


class ModelMetrics:
    """The metric children of one model, bound once (``labels()`` is too slow for the per-chunk path)."""

    __slots__ = ("inflight", "ttft", "itl", "output_tokens", "input_sequence", "output_sequence", "duration")

    def __init__(self, m: FrontendMetrics, model: str) -> None:
        self.inflight = m.inflight.labels(model)
        self.ttft = m.ttft.labels(model)
        self.itl = m.itl.labels(model)
        self.output_tokens = m.output_tokens.labels(model)
        self.input_sequence = m.input_sequence.labels(model)
        self.output_sequence = m.output_sequence.labels(model)
        self.duration = m.duration.labels(model)


class FrontendMetrics:
    """All frontend metrics. ``model`` labels only ever carry served model names (bounded cardinality)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            DYNAMO + "requests",
            "Total number of LLM requests processed",
            ["model", "endpoint", "request_type", "status", "error_type"],
            registry=r,
        )
        self.inflight = Gauge(
            DYNAMO + "inflight_requests", "Number of inflight requests", ["model"], registry=r
        )
        self.ttft = Histogram(
            DYNAMO + "time_to_first_token_seconds",
            "Time to first token in seconds",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = LoopHistogram(
            DYNAMO + "inter_token_latency_seconds",
            "Inter-token latency in seconds (gap between chunks divided by the chunk's tokens; one sample per chunk)",
            ["model"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.output_tokens = Counter(
            DYNAMO + "output_tokens", "Total number of output tokens generated", ["model"], registry=r
        )
        self.input_sequence = Histogram(
            DYNAMO + "input_sequence_tokens",
            "Input sequence length in tokens",
            ["model"],
            buckets=_ISL_BUCKETS,
            registry=r,
        )
        self.output_sequence = Histogram(
            DYNAMO + "output_sequence_tokens",
            "Output sequence length in tokens",
            ["model"],
            buckets=_OSL_BUCKETS,
            registry=r,
        )
        # A gauge that only goes up, as Dynamo's (prometheus_names.rs: "gauge, not counter").
        self.disconnects = Gauge(
            DYNAMO + "disconnected_clients", "Number of disconnected clients", registry=r
        )
        self.duration = Histogram(
            DYNAMO + "request_duration_seconds",
            "Duration of LLM requests",
            ["model"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            PREFIX + "errors", "Error responses and error events, by type", ["type"], registry=r
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
        # Set in a process of a frontend with several (``--workers``): /metrics then adds up all of them.
        self.siblings: SiblingMetrics | None = None

    def watch_queue(self, source: Callable[[], dict[str, int]]) -> None:
        """Export ``source()`` (model → requests waiting) as the queued-requests gauge."""
        if self._queued is None:
            self._queued = QueuedRequests(source, lambda: [m for m in self._models if m], self.registry)

    def model(self, name: str) -> ModelMetrics:
        mm = self._models.get(name)
        if mm is None:
            mm = self._models[name] = ModelMetrics(self, name)
        return mm

    def request_done(self, model: str, endpoint: str, status: int, stream: bool = False) -> None:
        """Count one answered request: ``endpoint`` is our route (CHAT, COMPLETIONS, RESPONSES), ``status`` the
        HTTP status it got (499: the client left)."""
        self.requests.labels(
            model,
            ENDPOINT_LABEL.get(endpoint, endpoint),
            STREAM if stream else UNARY,
            SUCCESS if status < 400 else ERROR,
            error_type(status),
        ).inc()

    def error(self, error_type: str) -> None:
        self.errors.labels(error_type).inc()

    def render(self) -> bytes:
        """This process's metrics."""
        return generate_latest(self.registry)

    async def exposition(self) -> bytes:
        """What /metrics answers: the whole frontend's metrics, over all its processes when it has several."""
        return await self.siblings.render() if self.siblings is not None else self.render()
