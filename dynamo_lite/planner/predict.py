"""The next interval's load from the last few observed intervals.

Request rate: a least-squares line through the last ``window`` rates, read one interval ahead (``trend``), the
last rate (``last``) or their mean (``mean``); a falling trend is never read below 0. ISL and OSL: the
request-weighted mean over the last ``shape_window`` intervals (a single interval may have few completions).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from dynamo_lite.planner.scrape import Observation


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
    """Keeps the last ``window`` observations; ``forecast()`` reads the next interval's load from them."""

    def __init__(
        self,
        window: int = 6,
        shape_window: int = 2,
        method: Method = Method.TREND,
        default_isl: float = 1024.0,
        default_osl: float = 128.0,
    ) -> None:
        self.method = method
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
            rate = max(_line_ahead(rates), 0.0)
        recent = list(self._seen)[-self.shape_window :]
        self._isl = _weighted([(o.isl, o.request_rate * o.duration_s) for o in recent], self._isl)
        self._osl = _weighted([(o.osl, o.request_rate * o.duration_s) for o in recent], self._osl)
        return LoadForecast(rate, self._isl, self._osl)


def _line_ahead(ys: list[float]) -> float:
    """The least-squares line through (0, ys[0]) … (n-1, ys[n-1]), read at n."""
    n = len(ys)
    mx, my = (n - 1) / 2, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in range(n))
    slope = sum((x - mx) * (y - my) for x, y in enumerate(ys)) / sxx
    return my + slope * (n - mx)


def _weighted(values: list[tuple[float | None, float]], fallback: float) -> float:
    pairs = [(v, max(w, 1e-9)) for v, w in values if v is not None]
    if not pairs:
        return fallback
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
