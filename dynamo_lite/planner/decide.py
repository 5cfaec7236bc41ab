"""Replica counts for the next interval: forecast + profile + targets → prefill and decode workers.

Pure code: no clock, no I/O; ``Planner.decide`` takes the time and everything it needs, and returns a
``Decision`` that says what to run and why. The sizing, per role:

- prefill — a queue in front of each worker. One request of the forecast ISL takes ``s`` seconds alone
  (profile). TTFT = s + queueing; with an M/D/1 queue the mean wait at utilization ρ is ρ·s / (2(1 − ρ)), so
  TTFT ≤ target holds up to ρ* = 2r / (1 + 2r), r = (target − s) / s (never above ``max_utilization``).
  Workers = ⌈rate · s / ρ*⌉.
- decode — a batch in each worker. The profile gives the most sequences ``c*`` one worker batches at the
  forecast context (ISL + OSL/2) with ITL within target. Little's law: rate · OSL · ITL(c*) sequences are
  decoding at once; add one standard deviation (√N) for arrivals' noise; workers = ⌈that / c*⌉.
- correction — when the observed mean latency is known and unqueued, observed ÷ profile scales the profile
  (clamped to ``correction_range``), as NVIDIA Dynamo's planner does: the profile may be off for this host.
  Means, from the histograms' sums and counts, are exact; their p90s are only as fine as the buckets.
- reaction — whatever the model says, a role whose latency p90 is over target with work waiting (or a decode
  pool with its KV nearly full) gets one more worker, unless it changed within the cool-down.

Then the bounds (``--min``/``--max`` per role), the cool-down (a role never reverses direction within
``cooldown_s`` of its last change; it scales down only after ``down_stable_intervals`` intervals in a row asked
for less, and then to the most any of them asked for), the same for the way up (``up_stable_intervals`` in a
row, then the least any of them asked for: one noisy forecast must not buy a worker) unless the role is already
overloaded — its latency p90 over target, work waiting for it, or (decode) its batches or KV cache full: then
at once — and the budget (``max_total`` workers; a hard limit, shared in proportion to what each role asked for).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dynamo_lite.planner.predict import LoadForecast
from dynamo_lite.planner.profile import EngineProfile
from dynamo_lite.planner.scrape import Observation

PREFILL, DECODE = "prefill", "decode"
ROLES = (PREFILL, DECODE)
# What can shape a role's target (a bounded set: the metrics' ``cause`` label)
CAUSES = ("model", "latency", "kv_usage", "min", "max", "cooldown", "hysteresis", "budget")


@dataclass(slots=True, frozen=True)
class PlannerSettings:
    """Targets, bounds and damping of the planner (``python -m dynamo_lite.planner`` flags)."""

    ttft_s: float = 1.5  # TTFT target (p90)
    itl_s: float = 0.06  # ITL target (p90)
    min_prefill: int = 1
    max_prefill: int = 4
    min_decode: int = 1
    max_decode: int = 4
    max_total: int = 8  # budget: prefill + decode workers
    interval_s: float = 10.0  # adjustment interval
    cooldown_s: float = 60.0  # no reversal of a role's direction within this long of its last change
    down_stable_intervals: int = 3  # intervals in a row that must ask for fewer before a scale-down
    up_stable_intervals: int = 2  # … for more before a scale-up, unless the role is overloaded already
    max_utilization: float = 0.9  # prefill: the busiest a worker is planned to be
    kv_usage_high: float = 0.9  # decode: a KV cache this full asks for one more worker
    correction_range: tuple[float, float] = (0.5, 3.0)

    def bounds(self, role: str) -> tuple[int, int]:
        return (self.min_prefill, self.max_prefill) if role == PREFILL else (self.min_decode, self.max_decode)

    def check(self) -> None:
        """Raise ValueError on settings that can't be honoured together."""
        for role in ROLES:
            low, high = self.bounds(role)
            if not 0 <= low <= high:
                raise ValueError(f"{role}: need 0 <= min ({low}) <= max ({high})")
        if self.min_prefill + self.min_decode > self.max_total:
            raise ValueError(f"the minimums ({self.min_prefill} + {self.min_decode}) exceed the budget")
        if self.ttft_s <= 0 or self.itl_s <= 0 or self.interval_s <= 0:
            raise ValueError("targets and the interval must be positive")


@dataclass(slots=True)
class RoleDecision:
    """One role's part of a decision: workers now, what the model asked for, what to run, and why."""

    role: str
    current: int
    needed: int  # the sizing's answer, before bounds, cool-down and budget
    target: int
    reasons: list[str] = field(default_factory=list)
    causes: set[str] = field(default_factory=set)  # what shaped ``target``, one of CAUSES each

    def because(self, cause: str, reason: str) -> None:
        self.causes.add(cause)
        self.reasons.append(reason)

    @property
    def direction(self) -> str:
        return "up" if self.target > self.current else "down" if self.target < self.current else "hold"


@dataclass(slots=True)
class Decision:
    at: float
    forecast: LoadForecast
    prefill: RoleDecision
    decode: RoleDecision
    correction: dict[str, float] = field(default_factory=dict)

    def role(self, role: str) -> RoleDecision:
        return self.prefill if role == PREFILL else self.decode

    @property
    def changed(self) -> bool:
        return self.prefill.direction != "hold" or self.decode.direction != "hold"

    def describe(self) -> str:
        f = self.forecast
        parts = [f"forecast {f.request_rate:.2f} req/s ISL {f.isl:.0f} OSL {f.osl:.0f}"]
        for r in (self.prefill, self.decode):
            parts.append(f"{r.role} {r.current}→{r.target} ({'; '.join(r.reasons)})")
        return " | ".join(parts)


@dataclass(slots=True)
class _RoleState:
    last_change_at: float = -math.inf
    last_direction: str = "hold"
    down_streak: list[int] = field(default_factory=list)  # what each interval in a row below current asked
    up_streak: list[int] = field(default_factory=list)  # … above current asked


class Planner:
    """Decides replica counts interval by interval; keeps only the cool-down state and the corrections."""

    def __init__(self, settings: PlannerSettings, profile: EngineProfile) -> None:
        settings.check()
        self.settings = settings
        self.profile = profile
        self.correction = {PREFILL: 1.0, DECODE: 1.0}
        self._state = {role: _RoleState() for role in ROLES}

    def decide(
        self, now: float, forecast: LoadForecast, current: dict[str, int], obs: Observation | None = None
    ) -> Decision:
        """What to run next interval, given the forecast, the workers running (or starting) per role, and the
        last interval's observation (for corrections and reactions; None: model only)."""
        if obs is not None:
            self._update_correction(obs, current)
        p = self._size_prefill(forecast, current[PREFILL])
        d = self._size_decode(forecast, current[DECODE])
        overloaded = {PREFILL: False, DECODE: False}
        if obs is not None:
            self._react(p, d, obs, now)
            overloaded = self._overloaded(obs)
        for r in (p, d):
            self._bound(r)
            self._damp(r, now, overloaded[r.role])
        self._budget(p, d)
        for r in (p, d):
            st = self._state[r.role]
            if r.direction != "hold":
                st.last_change_at, st.last_direction = now, r.direction
                st.down_streak.clear()
                st.up_streak.clear()
        return Decision(now, forecast, p, d, dict(self.correction))

    # -- sizing ---------------------------------------------------------------------------------------------

    def _size_prefill(self, f: LoadForecast, current: int) -> RoleDecision:
        s = self.profile.prefill_seconds(f.isl) * self.correction[PREFILL]
        target = self.settings.ttft_s
        if s >= target:
            rho = self.settings.max_utilization
            why = f"one ISL-{f.isl:.0f} prefill takes {s * 1000:.0f} ms > TTFT target: sized for throughput"
        else:
            r = (target - s) / s
            rho = min(self.settings.max_utilization, 2 * r / (1 + 2 * r))
            why = f"prefill {s * 1000:.0f} ms/request, ≤{rho:.0%} busy holds TTFT {target * 1000:.0f} ms"
        needed = math.ceil(f.request_rate * s / rho - 1e-9)
        return RoleDecision(
            PREFILL, current, needed, needed, [f"{f.request_rate:.2f} req/s × {why} → {needed}"], {"model"}
        )

    def _size_decode(self, f: LoadForecast, current: int) -> RoleDecision:
        context = f.isl + f.osl / 2
        itl_target = self.settings.itl_s / self.correction[DECODE]
        c_max = self.profile.max_concurrency(context, itl_target)
        if c_max == 0:
            c_max = 1
            why = f"ITL target unreachable at context {context:.0f} even alone: 1 sequence per worker"
        else:
            why = f"≤{c_max} sequences/worker at context {context:.0f} hold ITL {self.settings.itl_s * 1000:.0f} ms"
        decoding = f.request_rate * f.osl * self.profile.itl(c_max, context) * self.correction[DECODE]
        needed = math.ceil((decoding + math.sqrt(decoding)) / c_max - 1e-9)
        return RoleDecision(
            DECODE, current, needed, needed, [f"{decoding:.1f} decoding, {why} → {needed}"], {"model"}
        )

    def _update_correction(self, obs: Observation, current: dict[str, int]) -> None:
        """observed ÷ profile mean latency, where the observation is free of queueing (smoothed, clamped)."""
        low, high = self.settings.correction_range
        unqueued = obs.frontend_queued == 0 and obs.prefill_queued == 0
        if obs.ttft_mean_s is not None and obs.isl is not None and unqueued:
            ratio = obs.ttft_mean_s / self.profile.prefill_seconds(obs.isl)
            self.correction[PREFILL] = min(max(0.5 * self.correction[PREFILL] + 0.5 * ratio, low), high)
        workers = obs.workers.get(DECODE) or current[DECODE]
        if obs.itl_mean_s is not None and obs.isl is not None and workers and obs.decode_queued == 0:
            batch = max(obs.decode_active / workers, 1.0)
            ratio = obs.itl_mean_s / self.profile.itl(batch, obs.isl + (obs.osl or 0) / 2)
            self.correction[DECODE] = min(max(0.5 * self.correction[DECODE] + 0.5 * ratio, low), high)

    def _react(self, p: RoleDecision, d: RoleDecision, obs: Observation, now: float) -> None:
        s = self.settings
        cooled = {role: now - self._state[role].last_change_at >= s.cooldown_s for role in ROLES}
        waiting = obs.prefill_queued + obs.frontend_queued
        if obs.ttft_p90_s is not None and obs.ttft_p90_s > s.ttft_s and waiting > 0 and cooled[PREFILL]:
            if p.target <= p.current:
                p.target = p.current + 1
                p.because(
                    "latency",
                    f"TTFT p90 {obs.ttft_p90_s * 1000:.0f} ms > target with {waiting:.0f} waiting: +1",
                )
        if cooled[DECODE] and d.target <= d.current:
            if obs.itl_p90_s is not None and obs.itl_p90_s > s.itl_s:
                d.target = d.current + 1
                d.because("latency", f"ITL p90 {obs.itl_p90_s * 1000:.0f} ms > target: +1")
            elif obs.kv_usage_max > s.kv_usage_high:
                d.target = d.current + 1
                d.because("kv_usage", f"KV cache {obs.kv_usage_max:.0%} full: +1")

    def _overloaded(self, obs: Observation) -> dict[str, bool]:
        """Per role: is it short of workers now (not only by forecast)? Such a role scales up at once."""
        s = self.settings
        decoders = obs.workers.get(DECODE, 0)
        # the router's queue waits for a worker with room of either role: it counts for both
        return {
            PREFILL: obs.prefill_queued + obs.frontend_queued > 0
            or (obs.ttft_p90_s is not None and obs.ttft_p90_s > s.ttft_s),
            DECODE: obs.decode_queued + obs.frontend_queued > 0
            or (decoders > 0 and obs.decode_active >= decoders * self.profile.max_batch_size)  # batches full
            or obs.kv_usage_max > s.kv_usage_high
            or (obs.itl_p90_s is not None and obs.itl_p90_s > s.itl_s),
        }

    # -- limits ---------------------------------------------------------------------------------------------

    def _bound(self, r: RoleDecision) -> None:
        low, high = self.settings.bounds(r.role)
        if r.target < low:
            r.target = low
            r.because("min", f"min {low}")
        elif r.target > high:
            r.target = high
            r.because("max", f"max {high}")

    def _damp(self, r: RoleDecision, now: float, overloaded: bool) -> None:
        """Cool-down and hysteresis both ways (a scale-up without it when the role is overloaded)."""
        s, st = self.settings, self._state[r.role]
        since = now - st.last_change_at
        if r.target > r.current:
            st.down_streak.clear()
            st.up_streak.append(r.target)  # counted through a cool-down: demand that lasts is real
            if st.last_direction == "down" and since < s.cooldown_s:
                r.because("cooldown", f"cool-down: scaled down {since:.0f}s ago, holding {r.current}")
                r.target = r.current
            elif overloaded or len(st.up_streak) >= s.up_stable_intervals:
                if not overloaded and s.up_stable_intervals > 1:
                    r.target = min(st.up_streak[-s.up_stable_intervals :])
                    r.because("hysteresis", f"asked for more {s.up_stable_intervals} intervals in a row")
            else:
                r.because(
                    "hysteresis",
                    f"asks for {r.target} ({len(st.up_streak)}/{s.up_stable_intervals} intervals), holding",
                )
                r.target = r.current
            return
        st.up_streak.clear()
        if r.target < r.current:
            if st.last_direction == "up" and since < s.cooldown_s:
                r.because("cooldown", f"cool-down: scaled up {since:.0f}s ago, holding {r.current}")
                r.target = r.current
                st.down_streak.clear()
                return
            st.down_streak.append(r.target)
            if len(st.down_streak) < s.down_stable_intervals:
                r.because(
                    "hysteresis",
                    f"asks for {r.target} ({len(st.down_streak)}/{s.down_stable_intervals} intervals), holding",
                )
                r.target = r.current
            else:
                r.target = max(st.down_streak[-s.down_stable_intervals :])
                r.because("hysteresis", f"asked for fewer {s.down_stable_intervals} intervals in a row")
        else:
            st.down_streak.clear()

    def _budget(self, p: RoleDecision, d: RoleDecision) -> None:
        s = self.settings
        if p.target + d.target <= s.max_total:
            return
        want_p, want_d = p.target, d.target
        share = round(s.max_total * want_p / (want_p + want_d))
        p.target = min(max(share, s.min_prefill), want_p, s.max_total - s.min_decode)
        d.target = min(want_d, s.max_total - p.target)
        p.target = min(want_p, s.max_total - d.target)  # give back what decode could not use
        for r, want in ((p, want_p), (d, want_d)):
            if r.target < want:
                r.because("budget", f"budget {s.max_total}: {want} → {r.target}")
