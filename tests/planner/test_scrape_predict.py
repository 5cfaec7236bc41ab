"""Observations from the real metric registries of the frontend and workers, and the load predictor."""

from __future__ import annotations

import pytest

from dynamo_lite.engines.base import EngineStats
from dynamo_lite.frontend.metrics import _ITL_BUCKETS, _TTFT_BUCKETS, FrontendMetrics
from dynamo_lite.planner.predict import LoadPredictor, Method
from dynamo_lite.planner.scrape import Observation, Snapshot, histogram_quantile, observe
from dynamo_lite.worker.metrics import WorkerMetrics


def _serve(m: FrontendMetrics, n: int, isl: int, osl: int, ttft: float, itl: float) -> None:
    mm = m.model("m")
    for _ in range(n):
        m.request_done("m", "chat", 200, stream=True)
        mm.input_sequence.observe(isl)
        mm.output_sequence.observe(osl)
        mm.ttft.observe(ttft)
        mm.itl.observe(itl)


def _bucket_of(value: float, bounds: tuple[float, ...]) -> tuple[float, float]:
    upper = min(b for b in bounds if b >= value)
    return max(b for b in bounds if b < upper), upper


def _worker(role: str, stats: EngineStats) -> Snapshot:
    w = WorkerMetrics(lambda: stats, {"model": "m", "role": role, "instance": role + "1"})
    from prometheus_client import generate_latest

    return Snapshot.parse(generate_latest(w.registry).decode())


def test_an_interval_is_the_difference_of_two_scrapes() -> None:
    m = FrontendMetrics()
    m.watch_queue(lambda: {"m": 3})
    _serve(m, 10, 4000, 50, 5.0, 0.5)  # before the interval: must not count
    before = Snapshot.parse(m.render().decode())
    _serve(m, 20, 1000, 100, 0.2, 0.02)
    m.model("m").inflight.inc(4)
    after = Snapshot.parse(m.render().decode())
    workers = [
        _worker("prefill", EngineStats(queued=2)),
        _worker("decode", EngineStats(active_seqs=7, queued=1, kv_usage=0.4)),
        _worker("decode", EngineStats(active_seqs=5, kv_usage=0.7)),
    ]
    obs = observe(after, before, 10.0, workers)
    assert obs.request_rate == pytest.approx((20 + 4) / 10)
    assert obs.isl == pytest.approx(1000) and obs.osl == pytest.approx(100)
    assert _bucket_of(0.2, _TTFT_BUCKETS)[0] < obs.ttft_p90_s <= _bucket_of(0.2, _TTFT_BUCKETS)[1]
    assert _bucket_of(0.02, _ITL_BUCKETS)[0] < obs.itl_p90_s <= _bucket_of(0.02, _ITL_BUCKETS)[1]
    assert obs.ttft_mean_s == pytest.approx(0.2) and obs.itl_mean_s == pytest.approx(0.02)
    assert obs.frontend_queued == 3 and obs.inflight == 4
    assert obs.workers == {"prefill": 1, "decode": 2}
    assert obs.prefill_queued == 2 and obs.decode_active == 12 and obs.decode_queued == 1
    assert obs.kv_usage_max == pytest.approx(0.7)


def test_an_idle_interval_has_no_latency() -> None:
    m = FrontendMetrics()
    _serve(m, 5, 100, 10, 0.1, 0.01)
    snap = Snapshot.parse(m.render().decode())
    obs = observe(snap, snap, 10.0, [])
    assert obs.request_rate == 0 and obs.isl is None and obs.ttft_p90_s is None


def test_histogram_quantile_interpolates_inside_a_bucket() -> None:
    cumulative = {0.1: 0.0, 0.2: 10.0, 0.4: 20.0, float("inf"): 20.0}
    assert histogram_quantile(0.5, cumulative) == pytest.approx(0.2)
    assert histogram_quantile(0.75, cumulative) == pytest.approx(0.3)
    assert histogram_quantile(0.9, {1.0: 0.0, float("inf"): 5.0}) == 1.0  # past the last bound
    assert histogram_quantile(0.9, {1.0: 0.0}) is None


def _obs(rate: float, isl: float | None = 1000, osl: float | None = 100) -> Observation:
    return Observation(duration_s=10, request_rate=rate, isl=isl, osl=osl)


def test_trend_reads_the_line_one_interval_ahead() -> None:
    p = LoadPredictor(window=4, significance=0)
    for rate in (1, 2, 3, 4):
        p.add(_obs(rate))
    assert p.forecast().request_rate == pytest.approx(5)


def test_trend_counts_only_the_slope_that_stands_out_of_the_noise() -> None:
    # 1, 2, 3, 4 req/s over 10 s intervals: a perfect line, but Poisson alone puts ±√(2.5/10) = ±0.5 on each
    # rate, so the slope (1 ± 0.22 per interval) is read 2 standard errors smaller
    p = LoadPredictor(window=4, significance=2)
    for rate in (1, 2, 3, 4):
        p.add(_obs(rate))
    stderr = (2.5 / 10 / 5) ** 0.5
    assert p.forecast().request_rate == pytest.approx(2.5 + (1 - 2 * stderr) * 2.5)
    # a wobble around a level is read as the level
    q = LoadPredictor(window=4, significance=2)
    for rate in (3.0, 2.6, 3.2, 3.4):
        q.add(_obs(rate))
    assert q.forecast().request_rate == pytest.approx(3.05)


def test_trend_is_never_negative() -> None:
    p = LoadPredictor(window=3, significance=0)
    for rate in (0, 0, 10):
        p.add(_obs(rate))
    assert p.forecast().request_rate == pytest.approx(10 / 3 + 5 * 2)
    q = LoadPredictor(window=3, significance=0)
    for rate in (10, 2, 0):
        q.add(_obs(rate))
    assert q.forecast().request_rate == 0


def test_last_and_mean() -> None:
    for method, want in ((Method.LAST, 6), (Method.MEAN, 4)):
        p = LoadPredictor(window=3, method=method)
        for rate in (2, 4, 6):
            p.add(_obs(rate))
        assert p.forecast().request_rate == pytest.approx(want)


def test_sequence_lengths_are_request_weighted_and_survive_idle_intervals() -> None:
    p = LoadPredictor(shape_window=2, default_isl=512, default_osl=64)
    assert p.forecast() is None
    p.add(_obs(0, None, None))
    assert (p.forecast().isl, p.forecast().osl) == (512, 64)
    p.add(_obs(1, 1000, 100))
    p.add(_obs(3, 2000, 300))
    f = p.forecast()
    assert f.isl == pytest.approx(1750) and f.osl == pytest.approx(250)
    p.add(_obs(0, None, None))
    p.add(_obs(0, None, None))
    assert p.forecast().isl == pytest.approx(1750)  # kept, not reset, while nothing completes
