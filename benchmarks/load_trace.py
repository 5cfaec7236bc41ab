"""Replay a time-varying load trace against an OpenAI-compatible frontend: request rate, ISL and OSL change
over time (the shape of a day compressed to minutes).

A trace is a list of points ``{t, rate, isl, osl}`` (seconds from the start, requests/s, tokens), linear in
between; ``day_trace`` makes one: a quiet night, a morning ramp to the peak, and prompts growing longer from
midday (an ISL shift). Arrivals are Poisson at the trace's rate (thinning), each request a streamed
``/v1/completions`` with exactly ISL prompt token ids and ``max_tokens`` OSL (``ignore_eos``).

    python -m benchmarks.load_trace --url http://127.0.0.1:8000 --model smol-mock --duration-s 150 \\
        --peak-rate 4 --ttft-ms 1500 --itl-ms 60 --output trace.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from bisect import bisect_right
from dataclasses import asdict, dataclass, field

import httpx


@dataclass(slots=True, frozen=True)
class TracePoint:
    t: float  # seconds from the start
    rate: float  # requests per second
    isl: int
    osl: int


@dataclass(slots=True)
class Trace:
    points: list[TracePoint]

    @property
    def duration_s(self) -> float:
        return self.points[-1].t

    def at(self, t: float) -> TracePoint:
        """The trace at ``t``, linear between its points."""
        ts = [p.t for p in self.points]
        i = min(max(bisect_right(ts, t), 1), len(ts) - 1)
        a, b = self.points[i - 1], self.points[i]
        w = min(max((t - a.t) / (b.t - a.t), 0.0), 1.0) if b.t > a.t else 1.0
        return TracePoint(
            t,
            a.rate + (b.rate - a.rate) * w,
            round(a.isl + (b.isl - a.isl) * w),
            round(a.osl + (b.osl - a.osl) * w),
        )

    def arrivals(self, seed: int = 0) -> list[TracePoint]:
        """Poisson arrival times at the trace's rate (thinning), each with the ISL/OSL of its moment."""
        rng = random.Random(seed)
        peak = max(p.rate for p in self.points)
        out, t = [], 0.0
        while peak > 0:
            t += rng.expovariate(peak)
            if t >= self.duration_s:
                break
            here = self.at(t)
            if rng.random() < here.rate / peak:
                out.append(here)
        return out


def day_trace(
    duration_s: float,
    peak_rate: float,
    night_rate: float,
    isl: tuple[int, int] = (1000, 3000),
    osl: int = 200,
) -> Trace:
    """A day in ``duration_s``: night (low), morning ramp, peak, an ISL shift from short to long prompts in the
    afternoon while the rate eases, evening back to low."""
    d = duration_s
    shape = [  # (fraction of the day, fraction of the peak rate, long prompts 0..1)
        (0.00, 0.0, 0.0),
        (0.15, 0.0, 0.0),
        (0.35, 1.0, 0.0),
        (0.50, 1.0, 0.0),
        (0.60, 0.8, 1.0),
        (0.80, 0.8, 1.0),
        (1.00, 0.0, 1.0),
    ]
    return Trace(
        [
            TracePoint(
                f * d, night_rate + (peak_rate - night_rate) * r, round(isl[0] + (isl[1] - isl[0]) * s), osl
            )
            for f, r, s in shape
        ]
    )


@dataclass(slots=True)
class RequestResult:
    sent_at: float  # trace time
    isl: int
    osl: int
    status: int = 0
    tokens: int = 0
    ttft_s: float | None = None
    itl_s: float | None = None  # this request's mean inter-token latency
    error: str = ""

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.tokens == self.osl and not self.error


@dataclass(slots=True)
class TraceResult:
    results: list[RequestResult]
    ttft_s: float
    itl_s: float
    duration_s: float
    notes: dict = field(default_factory=dict)

    def good(self, r: RequestResult) -> bool:
        return (
            r.complete and r.ttft_s is not None and r.ttft_s <= self.ttft_s and (r.itl_s or 0) <= self.itl_s
        )

    def summary(self) -> dict:
        done = [r for r in self.results if r.complete]
        return {
            "requests": len(self.results),
            "complete": len(done),
            "failed": len(self.results) - len(done),
            "good": sum(1 for r in self.results if self.good(r)),
            "ttft_p90_s": _p90([r.ttft_s for r in done if r.ttft_s is not None]),
            "itl_p90_s": _p90([r.itl_s for r in done if r.itl_s is not None]),
        }


def _p90(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(math.ceil(0.9 * len(values)) - 1, len(values) - 1)]


async def _one(
    client: httpx.AsyncClient, url: str, model: str, point: TracePoint, serial: int
) -> RequestResult:
    rng = random.Random(serial)
    prompt = [rng.randrange(1000, 30000) for _ in range(point.isl)]  # distinct: no prefix-cache hits
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": point.osl,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    res = RequestResult(point.t, point.isl, point.osl)
    started = time.perf_counter()
    first = last = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            res.status = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("error"):
                    res.error = str(chunk["error"])[:200]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    last = time.perf_counter()
                    first = first or last
                if chunk.get("usage"):
                    res.tokens = chunk["usage"].get("completion_tokens", 0)
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
    if first is not None:
        res.ttft_s = first - started
        if res.tokens > 1 and last is not None:
            res.itl_s = (last - first) / (res.tokens - 1)
    return res


async def replay(
    trace: Trace, url: str, model: str, ttft_s: float, itl_s: float, seed: int = 0, timeout_s: float = 120.0
) -> TraceResult:
    """Send the trace's arrivals on time (open loop) and wait for every answer."""
    arrivals = trace.arrivals(seed)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for serial, point in enumerate(arrivals):
            delay = point.t - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(
                asyncio.create_task(_one(client, url.rstrip("/"), model, point, serial + seed * 1_000_003))
            )
        results = list(await asyncio.gather(*tasks))
    return TraceResult(results, ttft_s, itl_s, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load_trace", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--trace", default=None, help="JSON list of {t, rate, isl, osl}; default: day_trace")
    p.add_argument("--duration-s", type=float, default=150.0)
    p.add_argument("--peak-rate", type=float, default=4.0)
    p.add_argument("--night-rate", type=float, default=0.5)
    p.add_argument("--isl", default="1000,3000", help="short,long prompt tokens (the ISL shift)")
    p.add_argument("--osl", type=int, default=200)
    p.add_argument("--ttft-ms", type=float, default=1500)
    p.add_argument("--itl-ms", type=float, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write every request's result here (JSON)")
    args = p.parse_args(argv)
    if args.trace:
        with open(args.trace) as f:
            trace = Trace([TracePoint(**pt) for pt in json.load(f)])
    else:
        lo, hi = (int(x) for x in args.isl.split(","))
        trace = day_trace(args.duration_s, args.peak_rate, args.night_rate, (lo, hi), args.osl)
    result = asyncio.run(
        replay(trace, args.url, args.model, args.ttft_ms / 1000, args.itl_ms / 1000, args.seed)
    )
    print(json.dumps(result.summary(), indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"summary": result.summary(), "results": [asdict(r) for r in result.results]}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
