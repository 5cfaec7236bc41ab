"""The load trace of benchmarks/load_trace.py: its day shape and its Poisson arrivals."""

from __future__ import annotations

import pytest

from benchmarks.load_trace import RequestResult, Trace, TracePoint, TraceResult, day_trace


def test_the_trace_is_linear_between_its_points() -> None:
    t = Trace([TracePoint(0, 0, 100, 10), TracePoint(10, 4, 300, 30)])
    mid = t.at(5)
    assert (mid.rate, mid.isl, mid.osl) == (2, 200, 20)
    assert t.at(20).rate == 4 and t.at(-1).rate == 0


def test_a_day_ramps_to_the_peak_then_shifts_to_long_prompts() -> None:
    day = day_trace(100, peak_rate=5, night_rate=0.5, isl=(1000, 3000), osl=200)
    assert day.duration_s == 100
    assert day.at(5).rate == pytest.approx(0.5) and day.at(5).isl == 1000  # night
    assert day.at(40).rate == pytest.approx(5) and day.at(40).isl == 1000  # peak, short prompts
    assert day.at(70).isl == 3000 and day.at(70).rate < 5  # afternoon: long prompts
    assert day.at(99).rate < 1


def test_arrivals_follow_the_rate_and_repeat_with_the_seed() -> None:
    t = Trace([TracePoint(0, 2, 100, 10), TracePoint(100, 2, 100, 10), TracePoint(200, 8, 100, 10)])
    arrivals = t.arrivals(seed=1)
    assert arrivals == t.arrivals(seed=1) and arrivals != t.arrivals(seed=2)
    first = sum(1 for a in arrivals if a.t < 100)
    last = sum(1 for a in arrivals if a.t >= 150)
    assert 150 < first < 250  # 200 expected
    assert 280 < last < 420  # 50 s at 5..8 req/s: 325 expected
    assert all(a.t < 200 for a in arrivals)


def test_goodput_needs_both_targets_and_a_complete_answer() -> None:
    ok = RequestResult(0, 10, 5, status=200, tokens=5, ttft_s=0.5, itl_s=0.02)
    slow_first = RequestResult(0, 10, 5, status=200, tokens=5, ttft_s=2.0, itl_s=0.02)
    slow_tokens = RequestResult(0, 10, 5, status=200, tokens=5, ttft_s=0.5, itl_s=0.1)
    cut = RequestResult(0, 10, 5, status=200, tokens=3, ttft_s=0.5, itl_s=0.02)
    r = TraceResult([ok, slow_first, slow_tokens, cut], ttft_s=1.5, itl_s=0.06, duration_s=1)
    s = r.summary()
    assert (s["requests"], s["complete"], s["failed"], s["good"]) == (4, 3, 1, 1)
