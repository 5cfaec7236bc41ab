"""Metrics from request records: per-metric statistics, throughput, goodput (genai-perf's definitions).

- TTFT: request sent → first chunk carrying output text.
- ITL (per request): (e2e latency − TTFT) / (output tokens − 1).
- Inter-chunk gap: time between consecutive text chunks, pooled over all requests.
- Throughput: completed requests (output tokens) / (last end − first start) of the measured requests.
- Goodput: completed requests per second that met every SLO given.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .records import RequestRecord


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0–100) with linear interpolation between ranks (numpy's default)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = (len(sorted_values) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = rank - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


@dataclass(slots=True)
class Stats:
    count: int
    mean: float
    std: float
    min: float
    max: float
    p50: float
    p90: float
    p95: float
    p99: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats | None:
        data = sorted(values)
        if not data:
            return None
        n = len(data)
        mean = math.fsum(data) / n
        var = math.fsum((x - mean) ** 2 for x in data) / n
        return cls(
            count=n,
            mean=mean,
            std=math.sqrt(var),
            min=data[0],
            max=data[-1],
            p50=percentile(data, 50),
            p90=percentile(data, 90),
            p95=percentile(data, 95),
            p99=percentile(data, 99),
        )


@dataclass(slots=True)
class CpuUsage:
    """CPU seconds over the measured window; ``percent`` is of one core."""

    seconds: float
    percent: float


@dataclass(slots=True)
class Summary:
    duration_s: float
    requests: int  # measured requests sent
    completed: int
    errors: int
    request_throughput: float  # completed requests per second
    output_token_throughput: float  # output tokens of completed requests per second
    goodput: float | None  # requests per second meeting every SLO (None without SLOs)
    total_output_tokens: int
    total_chunks: int
    connections_opened: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    error_samples: dict[str, str] = field(default_factory=dict)  # first error text per kind
    metrics: dict[str, Stats] = field(default_factory=dict)  # name -> stats; *_ms in milliseconds
    client_cpu: CpuUsage | None = None
    client_cpu_us_per_request: float | None = None
    client_cpu_us_per_chunk: float | None = None
    server_cpu: dict[int, CpuUsage | None] = field(default_factory=dict)  # pid -> usage (None: gone)


def meets_slos(rec: RequestRecord, slos: dict[str, float]) -> bool:
    """Whether a completed request met every SLO (milliseconds, genai-perf names)."""
    if not rec.ok:
        return False
    for name, limit_ms in slos.items():
        if name == "time_to_first_token":
            value = rec.ttft
        elif name == "inter_token_latency":
            value = rec.itl
        elif name == "request_latency":
            value = rec.latency
        else:
            raise ValueError(f"unknown SLO {name!r}")
        if value is None or value * 1000.0 > limit_ms:
            return False
    return True


def request_metrics(records: Sequence[RequestRecord]) -> dict[str, Stats]:
    """Statistics of each per-request metric over the completed requests."""
    ok = [r for r in records if r.ok]
    ms = 1000.0
    series: dict[str, list[float]] = {
        "time_to_first_token_ms": [r.ttft * ms for r in ok if r.ttft is not None],
        "time_to_first_response_ms": [
            (r.first_response - r.start) * ms for r in ok if r.first_response is not None and r.chunk_times
        ],
        "inter_token_latency_ms": [r.itl * ms for r in ok if r.itl is not None],
        "inter_chunk_gap_ms": [g * ms for r in ok for g in r.chunk_gaps],
        "request_latency_ms": [r.latency * ms for r in ok],
        "input_sequence_length": [
            float(r.prompt_tokens if r.prompt_tokens is not None else r.input_tokens) for r in ok
        ],
        "output_sequence_length": [float(r.output_tokens) for r in ok],
        "chunks_per_request": [float(len(r.chunk_times)) for r in ok if r.chunk_times],
        "events_per_request": [float(r.events) for r in ok if r.events],
        "tokens_per_chunk": [float(n) for r in ok if r.chunk_times for n in r.chunk_tokens or ()],
        "output_token_throughput_per_request": [
            r.output_tokens / r.latency for r in ok if r.latency > 0 and r.output_tokens
        ],
        "client_queue_delay_ms": [r.queue_delay * ms for r in records if r.queue_delay is not None],
    }
    out: dict[str, Stats] = {}
    for name, values in series.items():
        stats = Stats.of(values)
        if stats is not None:
            out[name] = stats
    return out


def summarize(records: Sequence[RequestRecord], slos: dict[str, float] | None = None) -> Summary:
    """Throughput, errors and per-request statistics of the measured ``records``."""
    ok = [r for r in records if r.ok]
    if records:
        duration = max(r.end for r in records) - min(r.start for r in records)
    else:
        duration = 0.0
    kinds = Counter(r.error_kind for r in records if r.error_kind is not None)
    samples: dict[str, str] = {}
    for r in records:
        if r.error_kind is not None and r.error_kind not in samples:
            samples[r.error_kind] = r.error or ""
    tokens = sum(r.output_tokens for r in ok)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    goodput = per_s(sum(1 for r in ok if meets_slos(r, slos))) if slos else None
    return Summary(
        duration_s=duration,
        requests=len(records),
        completed=len(ok),
        errors=len(records) - len(ok),
        request_throughput=per_s(len(ok)),
        output_token_throughput=per_s(tokens),
        goodput=goodput,
        total_output_tokens=tokens,
        total_chunks=sum(len(r.chunk_times) for r in records),
        errors_by_kind=dict(sorted(kinds.items())),
        error_samples=samples,
        metrics=request_metrics(records),
    )
