"""From ``/metrics`` text to one ``Observation`` of the last interval.

The frontend's counters and histograms (NVIDIA Dynamo's ``dynamo_frontend_*``) are read as differences between
two scrapes, so an observation covers exactly one adjustment interval; the workers' gauges
(``dynamo_lite_worker_*``) are read as they are at the scrape. All models are added up.
"""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

FRONTEND = "dynamo_frontend_"
WORKER = "dynamo_lite_worker_"
SCRAPE_TIMEOUT_S = 2.0


@dataclass(slots=True)
class Observation:
    """One adjustment interval, as the metrics saw it. ``None``: no sample in the interval."""

    duration_s: float
    request_rate: float = 0.0  # requests arriving per second (completed + change in in-flight)
    isl: float | None = None  # mean input tokens of the requests completed
    osl: float | None = None  # mean output tokens of the requests completed
    ttft_p90_s: float | None = None  # from the histogram's buckets: as coarse as they are
    itl_p90_s: float | None = None
    ttft_mean_s: float | None = None  # from its sum and count: exact
    itl_mean_s: float | None = None
    frontend_queued: float = 0.0  # requests waiting in the router for a worker with room
    inflight: float = 0.0
    prefill_queued: float = 0.0  # waiting for a batch slot, over all prefill workers
    decode_active: float = 0.0  # sequences in the decode batches, over all decode workers
    decode_queued: float = 0.0
    kv_usage_max: float = 0.0  # the fullest decode worker's KV cache (0..1)
    workers: dict[str, int] = field(default_factory=dict)  # role → workers that answered the scrape


@dataclass(slots=True)
class Snapshot:
    """One scrape: sample name → list of (labels, value)."""

    samples: dict[str, list[tuple[dict[str, str], float]]]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, []).append((s.labels, s.value))
        return cls(samples)

    def total(self, name: str, **match: str) -> float:
        """Sum of ``name`` over the label sets that carry ``match``."""
        return sum(
            v for labels, v in self.samples.get(name, []) if all(labels.get(k) == m for k, m in match.items())
        )

    def maximum(self, name: str) -> float:
        return max((v for _, v in self.samples.get(name, [])), default=0.0)

    def buckets(self, name: str) -> dict[float, float]:
        """Cumulative bucket counts of histogram ``name`` by upper bound, summed over label sets."""
        out: dict[float, float] = {}
        for labels, v in self.samples.get(name + "_bucket", []):
            le = float(labels["le"])
            out[le] = out.get(le, 0.0) + v
        return out


def histogram_quantile(q: float, cumulative: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear inside the bucket the rank falls in (None: no samples)."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    rank = q * cumulative[bounds[-1]]
    prev_bound, prev_count = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return prev_bound  # beyond the last finite bound: the best known lower limit
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def _delta_buckets(cur: Snapshot, prev: Snapshot | None, name: str) -> dict[float, float]:
    now = cur.buckets(name)
    before = prev.buckets(name) if prev else {}
    return {le: max(c - before.get(le, 0.0), 0.0) for le, c in now.items()}


def observe(
    frontend: Snapshot,
    previous: Snapshot | None,
    duration_s: float,
    workers: list[Snapshot],
) -> Observation:
    """The interval between ``previous`` and ``frontend`` (two scrapes of the frontend ``duration_s`` apart),
    with the workers' state now."""
    f, p = frontend, previous

    def delta(name: str) -> float:
        return max(f.total(name) - (p.total(name) if p else 0.0), 0.0)

    inflight = f.total(FRONTEND + "inflight_requests")
    completed = delta(FRONTEND + "requests_total")
    arrived = completed + inflight - (p.total(FRONTEND + "inflight_requests") if p else 0.0)
    obs = Observation(duration_s=duration_s, inflight=inflight)
    obs.request_rate = max(arrived, 0.0) / duration_s if duration_s > 0 else 0.0
    isl_n = delta(FRONTEND + "input_sequence_tokens_count")
    if isl_n:
        obs.isl = delta(FRONTEND + "input_sequence_tokens_sum") / isl_n
    osl_n = delta(FRONTEND + "output_sequence_tokens_count")
    if osl_n:
        obs.osl = delta(FRONTEND + "output_sequence_tokens_sum") / osl_n
    obs.ttft_p90_s = histogram_quantile(0.9, _delta_buckets(f, p, FRONTEND + "time_to_first_token_seconds"))
    obs.itl_p90_s = histogram_quantile(0.9, _delta_buckets(f, p, FRONTEND + "inter_token_latency_seconds"))
    ttft_n = delta(FRONTEND + "time_to_first_token_seconds_count")
    if ttft_n:
        obs.ttft_mean_s = delta(FRONTEND + "time_to_first_token_seconds_sum") / ttft_n
    itl_n = delta(FRONTEND + "inter_token_latency_seconds_count")
    if itl_n:
        obs.itl_mean_s = delta(FRONTEND + "inter_token_latency_seconds_sum") / itl_n
    obs.frontend_queued = f.total(FRONTEND + "queued_requests")
    for w in workers:
        role = "prefill" if _has_role(w, "prefill") else "decode"
        obs.workers[role] = obs.workers.get(role, 0) + 1
        if role == "prefill":
            obs.prefill_queued += w.total(WORKER + "queued_requests")
        else:
            obs.decode_active += w.total(WORKER + "active_seqs")
            obs.decode_queued += w.total(WORKER + "queued_requests")
            obs.kv_usage_max = max(obs.kv_usage_max, w.maximum(WORKER + "kv_usage"))
    return obs


def _has_role(snapshot: Snapshot, role: str) -> bool:
    return any(labels.get("role") == role for labels, _ in snapshot.samples.get(WORKER + "active_seqs", []))


def fetch(url: str, timeout: float = SCRAPE_TIMEOUT_S) -> Snapshot | None:
    """Scrape ``url`` (a /metrics URL); None when it doesn't answer (a worker starting or gone)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return Snapshot.parse(r.read().decode())
    except (OSError, ValueError):
        return None
