"""The run loop: every interval scrape, observe, forecast, decide, apply — and log each decision with its reasons.

The frontend is scraped every interval and the observation is the difference from the previous scrape; an
interval whose frontend scrape fails is skipped (no decision on no data). Workers come from the connector's
``metrics_urls()``; one that doesn't answer (starting, draining) is left out of that interval.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path

from dynamo_lite.planner.connectors.base import Connector
from dynamo_lite.planner.decide import ROLES, Decision, Planner
from dynamo_lite.planner.metrics import PlannerMetrics
from dynamo_lite.planner.predict import LoadPredictor
from dynamo_lite.planner.scrape import Observation, Snapshot, fetch, observe

log = logging.getLogger("dynamo_lite.planner")


class PlannerLoop:
    def __init__(
        self,
        planner: Planner,
        predictor: LoadPredictor,
        connector: Connector,
        frontend_metrics_url: str,
        metrics: PlannerMetrics | None = None,
        decisions_log: str | Path | None = None,
        clock=time.monotonic,
    ) -> None:
        self.planner = planner
        self.predictor = predictor
        self.connector = connector
        self.frontend_metrics_url = frontend_metrics_url
        self.metrics = metrics or PlannerMetrics()
        self.decisions_log = Path(decisions_log) if decisions_log else None
        self.clock = clock
        self.started_at = clock()
        self._previous: Snapshot | None = None
        self._previous_at = 0.0

    def prime(self) -> None:
        """Take the first scrape: the first interval is measured from here."""
        self._previous, self._previous_at = fetch(self.frontend_metrics_url), self.clock()

    def step(self) -> Decision | None:
        """One interval: None when the frontend didn't answer."""
        now = self.clock()
        frontend = fetch(self.frontend_metrics_url)
        if frontend is None:
            self.metrics.scrape_failures.labels("frontend").inc()
            log.warning(
                "frontend metrics at %s did not answer: no decision this interval", self.frontend_metrics_url
            )
            return None
        workers = []
        for url in self.connector.metrics_urls():
            snap = fetch(url)
            if snap is None:
                self.metrics.scrape_failures.labels("worker").inc()
            else:
                workers.append(snap)
        obs = observe(frontend, self._previous, now - self._previous_at, workers)
        self._previous, self._previous_at = frontend, now
        self.predictor.add(obs)
        forecast = self.predictor.forecast()
        decision = self.planner.decide(now - self.started_at, forecast, self.connector.replicas(), obs)
        self.metrics.record(decision, obs)
        log.info("%s", decision.describe())
        for role in ROLES:
            r = decision.role(role)
            if r.target != r.current:
                self.connector.scale(role, r.target)
        try:  # after scaling: a log that can't be written (disk full, folder gone) must not stop the planner
            self._log(decision, obs)
        except OSError:
            log.exception("could not log the decision to %s", self.decisions_log)
        return decision

    def run(self, stop: threading.Event, duration_s: float = 0.0) -> None:
        """Step every interval until ``stop`` is set (or ``duration_s`` passed, when positive)."""
        interval = self.planner.settings.interval_s
        self.prime()
        deadline = self.clock() + duration_s if duration_s > 0 else float("inf")
        next_at = self.clock() + interval
        while not stop.wait(max(next_at - self.clock(), 0.0)):
            if self.clock() >= deadline:
                break
            try:
                self.step()
            except Exception:  # noqa: BLE001 — a failed scale or scrape costs one interval, not the planner
                log.exception("planner interval failed")
            next_at += interval

    def _log(self, decision: Decision, obs: Observation) -> None:
        if self.decisions_log is None:
            return
        record = {
            "t": round(decision.at, 3),
            "observed": asdict(obs),
            "forecast": asdict(decision.forecast),
            "correction": decision.correction,
            **{
                role: {
                    "current": decision.role(role).current,
                    "needed": decision.role(role).needed,
                    "target": decision.role(role).target,
                    "reasons": decision.role(role).reasons,
                }
                for role in ROLES
            },
        }
        with self.decisions_log.open("a") as f:
            f.write(json.dumps(record) + "\n")
