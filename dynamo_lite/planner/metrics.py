"""The planner's Prometheus metrics (``dynamo_lite_planner_*``): what it saw, forecast and decided, and why.

Reasons are free text in the log; here they are the bounded ``cause`` label (``decide.CAUSES``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from dynamo_lite.planner.decide import CAUSES, ROLES, Decision
from dynamo_lite.planner.scrape import Observation

PREFIX = "dynamo_lite_planner_"


class PlannerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.replicas = Gauge(
            PREFIX + "replicas",
            "Workers per role: running or starting (current), sized by the model (needed), decided (target)",
            ["role", "kind"],
            registry=r,
        )
        self.forecast = Gauge(
            PREFIX + "forecast", "The next interval's forecast load", ["quantity"], registry=r
        )
        self.observed = Gauge(
            PREFIX + "observed",
            "The last interval as scraped (latencies in seconds)",
            ["quantity"],
            registry=r,
        )
        self.correction = Gauge(
            PREFIX + "correction", "Observed ÷ profile latency applied to the profile", ["role"], registry=r
        )
        self.decisions = Counter(PREFIX + "decisions", "Decisions taken (one per interval)", registry=r)
        self.changes = Counter(
            PREFIX + "scaling",
            "Scaling actions per role and direction, by each cause that shaped the target",
            ["role", "direction", "cause"],
            registry=r,
        )
        self.causes = Gauge(
            PREFIX + "last_decision_cause",
            "1 for each cause that shaped the last decision's target, per role",
            ["role", "cause"],
            registry=r,
        )
        self.scrape_failures = Counter(
            PREFIX + "scrape_failures", "Metric endpoints that did not answer", ["target"], registry=r
        )

    def record(self, decision: Decision, obs: Observation | None) -> None:
        self.decisions.inc()
        f = decision.forecast
        self.forecast.labels("request_rate").set(f.request_rate)
        self.forecast.labels("isl").set(f.isl)
        self.forecast.labels("osl").set(f.osl)
        for role in ROLES:
            r = decision.role(role)
            self.replicas.labels(role, "current").set(r.current)
            self.replicas.labels(role, "needed").set(r.needed)
            self.replicas.labels(role, "target").set(r.target)
            self.correction.labels(role).set(decision.correction.get(role, 1.0))
            for cause in CAUSES:
                self.causes.labels(role, cause).set(1 if cause in r.causes else 0)
            if r.direction != "hold":
                for cause in sorted(r.causes):
                    self.changes.labels(role, r.direction, cause).inc()
        if obs is not None:
            for name in ("request_rate", "ttft_p90_s", "itl_p90_s", "frontend_queued", "prefill_queued"):
                value = getattr(obs, name)
                if value is not None:
                    self.observed.labels(name).set(value)
            self.observed.labels("kv_usage_max").set(obs.kv_usage_max)

    def render(self) -> bytes:
        return generate_latest(self.registry)
