"""The router's view of instance load: worker load reports (fresh ones only) plus its own in-flight counts."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Collection

from dynamo_lite.protocol import LoadReport, RequestPlane, Subscription, WireError, decode
from dynamo_lite.runtime.keys import load_subject


class LoadTracker:
    """Keeps the latest ``LoadReport`` per instance and drops those older than ``ttl_s``."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._reports: dict[str, tuple[LoadReport, float]] = {}
        self.local_inflight: defaultdict[str, int] = defaultdict(
            int
        )  # what this router has sent and not seen end
        self._local_at_report: dict[str, int] = {}  # local_inflight when the instance's last report came
        self._full_until: dict[str, float] = {}  # instances that refused a request (at capacity), until then
        self._sub: Subscription | None = None
        self.on_report: Callable[[str], None] | None = None  # called with the instance id of each report

    async def start(self, plane: RequestPlane, namespace: str) -> None:
        self._sub = await plane.subscribe(load_subject(namespace), self._on_report)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    def _on_report(self, subject: str, payload: bytes) -> None:
        try:
            report = decode(payload, LoadReport)
        except WireError:
            return
        iid = report.instance_id
        self._reports[iid] = (report, time.monotonic())
        self._local_at_report[iid] = self.local_inflight.get(iid, 0)
        self._full_until.pop(iid, None)
        if self.on_report is not None:
            self.on_report(iid)

    def report(self, instance_id: str) -> LoadReport | None:
        entry = self._reports.get(instance_id)
        if entry is None:
            return None
        report, at = entry
        if time.monotonic() - at > self.ttl_s:
            del self._reports[instance_id]  # stale: the instance may be gone or wedged
            return None
        return report

    def score(self, instance_id: str) -> float:
        """Lower is less loaded: requests in flight (ours, or as reported by the worker if it says more —
        other frontends send to it too), queued requests, and KV usage as a tie-breaker."""
        local = self.local_inflight.get(instance_id, 0)
        report = self.report(instance_id)
        if report is None:
            return float(local)
        return max(local, report.inflight) + report.queued + report.kv_usage

    def others(self, instance_id: str) -> int:
        """Requests in flight on the instance that are not ours, as of its last fresh report."""
        report = self.report(instance_id)
        if report is None:
            return 0
        return max(0, report.inflight - self._local_at_report.get(instance_id, 0))

    def mark_full(self, instance_id: str) -> None:
        """The instance refused a request for capacity: full until it reports again, one of our requests on it
        ends, or a report TTL passes."""
        self._full_until[instance_id] = time.monotonic() + self.ttl_s

    def is_full(self, instance_id: str) -> bool:
        until = self._full_until.get(instance_id)
        if until is None:
            return False
        if time.monotonic() > until:
            del self._full_until[instance_id]
            return False
        return True

    def forget_gone(self, live: Collection[str]) -> None:
        """Drop what is kept of instances no longer in discovery: workers come and go (restarts, a planner
        scaling), and a long-running frontend must not keep a report per instance it ever saw. (In-flight counts
        drop themselves as their requests end.)"""
        for kept in (self._reports, self._local_at_report, self._full_until):
            for iid in [iid for iid in kept if iid not in live]:
                del kept[iid]

    def started(self, instance_id: str) -> None:
        self.local_inflight[instance_id] += 1

    def finished(self, instance_id: str) -> None:
        self._full_until.pop(instance_id, None)
        left = self.local_inflight[instance_id] - 1
        if left > 0:
            self.local_inflight[instance_id] = left
        else:
            self.local_inflight.pop(instance_id, None)
