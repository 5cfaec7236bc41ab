"""The next interval's load from the last few observed intervals.

Request rate: ``trend`` (the default) is a least-squares line through the last ``window`` rates, read one
interval ahead — but its slope counts only by how far it stands out of the noise: the slope's standard error
comes from the rates' scatter (at least Poisson's: an interval of Δt seconds at λ req/s reads λ ± √(λ/Δt)),
and the slope is shrunk toward 0 by ``significance`` standard errors. A steady rate then reads as the window's
mean (a line through a few noisy intervals would point wherever the last arrivals happened to fall: at ~15
arrivals an interval, ±25 %), while a real ramp, whose slope stands out, is still read ahead. ``last`` is the
last rate, ``mean`` the window's mean; a falling trend is never read below 0. ISL and OSL: the request-weighted
mean over the last ``shape_window`` intervals (a single interval may have few completions).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from dynamo_lite.planner.scrape import Observation

DEFAULT_WINDOW = 8  # intervals
DEFAULT_SIGNIFICANCE = 2.0  # standard errors


class Method(StrEnum):
    TREND = "trend"
    LAST = "last"
    MEAN = "mean"


@dataclass(slots=True, frozen=True)
class LoadForecast:
    """The load the next interval is expected to bring."""

    request_rate: float  # requests per second
    isl: float  # mean input tokens
    osl: float  # mean output tokens


class LoadPredictor:
    """Keeps the last ``window`` observations; ``forecast()`` reads the next interval's load from them.

    ``significance``: trend only — standard errors the slope is shrunk by (0: the plain least-squares line).
    """

    def __init__(
        self,
        window: int = DEFAULT_WINDOW,
        shape_window: int = 2,
        method: Method = Method.TREND,
        significance: float = DEFAULT_SIGNIFICANCE,
        default_isl: float = 1024.0,
        default_osl: float = 128.0,
    ) -> None:
        self.method = method
        self.significance = max(significance, 0.0)
        self.shape_window = max(shape_window, 1)
        self._seen: deque[Observation] = deque(maxlen=max(window, 1))
        self._isl, self._osl = default_isl, default_osl  # until a request completes

    def add(self, obs: Observation) -> None:
        self._seen.append(obs)

    def forecast(self) -> LoadForecast | None:
        """None before the first observation."""
        if not self._seen:
            return None
        rates = [o.request_rate for o in self._seen]
        if self.method is Method.LAST or len(rates) == 1:
            rate = rates[-1]
        elif self.method is Method.MEAN:
            rate = sum(rates) / len(rates)
        else:
            duration = sum(o.duration_s for o in self._seen) / len(self._seen)
            rate = max(_line_ahead(rates, duration, self.significance), 0.0)
        recent = list(self._seen)[-self.shape_window :]
        self._isl = _weighted([(o.isl, o.request_rate * o.duration_s) for o in recent], self._isl)
        self._osl = _weighted([(o.osl, o.request_rate * o.duration_s) for o in recent], self._osl)
        return LoadForecast(rate, self._isl, self._osl)


def _line_ahead(ys: list[float], duration_s: float, significance: float) -> float:
    """The least-squares line through (0, ys[0]) … (n-1, ys[n-1]), read at n, its slope shrunk toward 0 by
    ``significance`` standard errors (rates of intervals ``duration_s`` long)."""
    n = len(ys)
    mx, my = (n - 1) / 2, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in range(n))
    slope = sum((x - mx) * (y - my) for x, y in enumerate(ys)) / sxx
    if significance > 0:
        residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in enumerate(ys)) / (n - 2) if n > 2 else 0.0
        poisson = my / duration_s if duration_s > 0 else 0.0
        stderr = math.sqrt(max(residual, poisson) / sxx)
        slope = math.copysign(max(abs(slope) - significance * stderr, 0.0), slope)
    return my + slope * (n - mx)


def _weighted(values: list[tuple[float | None, float]], fallback: float) -> float:
    pairs = [(v, max(w, 1e-9)) for v, w in values if v is not None]
    if not pairs:
        return fallback
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
