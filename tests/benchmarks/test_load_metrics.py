"""Metrics math: genai-perf's ITL definition, percentiles, throughput and goodput."""

from __future__ import annotations

import random

import numpy as np
import pytest

from benchmarks.load.config import parse_extra_input, parse_goodput
from benchmarks.load.metrics import Stats, meets_slos, percentile, summarize
from benchmarks.load.records import RequestRecord


def rec(index: int, start: float, chunks: list[float], end: float, tokens: int | None, **kw) -> RequestRecord:
    r = RequestRecord(index=index, start=start, end=end, status=200, completion_tokens=tokens, **kw)
    r.chunk_times = list(chunks)
    r.chunk_texts = ["x"] * len(chunks)
    return r


def test_itl_is_genai_perf_definition() -> None:
    # Sent at 10.0, first token at 10.1, body done at 10.5, 5 output tokens in 3 chunks.
    r = rec(0, 10.0, [10.1, 10.3, 10.45], 10.5, tokens=5)
    assert r.ttft == pytest.approx(0.1)
    assert r.latency == pytest.approx(0.5)
    assert r.itl == pytest.approx((0.5 - 0.1) / (5 - 1))
    assert r.chunk_gaps == pytest.approx([0.2, 0.15])


def test_itl_undefined_for_one_token_and_without_streaming() -> None:
    assert rec(0, 0.0, [0.1], 0.2, tokens=1).itl is None
    assert rec(0, 0.0, [], 0.2, tokens=8).itl is None


def test_output_tokens_prefer_usage_then_chunk_tokens() -> None:
    r = rec(0, 0.0, [0.1, 0.2], 0.3, tokens=None)
    assert r.output_tokens == 2  # one per chunk, last resort
    r.chunk_tokens = [3, 4]
    assert r.output_tokens == 7
    r.completion_tokens = 9
    assert r.output_tokens == 9


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
def test_percentiles_match_numpy(n: int) -> None:
    rng = random.Random(n)
    values = sorted(rng.uniform(0, 100) for _ in range(n))
    for p in (0, 1, 50, 90, 95, 99, 100):
        assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))
    st = Stats.of(values)
    assert st is not None
    assert st.mean == pytest.approx(float(np.mean(values)))
    assert st.std == pytest.approx(float(np.std(values)))
    assert (st.min, st.max, st.count) == (values[0], values[-1], n)


def test_stats_of_nothing() -> None:
    assert Stats.of([]) is None


def test_summary_throughput_errors_and_goodput() -> None:
    records = [
        rec(0, 0.0, [0.05, 0.10], 0.20, tokens=10),  # ttft 50 ms, itl 150/9 = 16.7 ms
        rec(1, 0.1, [0.40, 0.50], 0.60, tokens=10),  # ttft 300 ms: misses the TTFT SLO
        rec(2, 0.2, [0.25], 1.00, tokens=4),  # ttft 50 ms, itl 750/3 = 250 ms: misses the ITL SLO
        rec(3, 0.3, [], 0.40, tokens=None),
    ]
    records[3].fail("http_500", '{"error": "boom"}')
    slos = parse_goodput("ttft:100 itl:50")
    s = summarize(records, slos)
    assert s.duration_s == pytest.approx(1.0)  # first start 0.0 → last end 1.0
    assert (s.requests, s.completed, s.errors) == (4, 3, 1)
    assert s.errors_by_kind == {"http_500": 1}
    assert "boom" in s.error_samples["http_500"]
    assert s.request_throughput == pytest.approx(3.0)
    assert s.output_token_throughput == pytest.approx(24.0)  # failed requests' tokens don't count
    assert s.goodput == pytest.approx(1.0)
    assert s.metrics["time_to_first_token_ms"].p50 == pytest.approx(50.0)
    assert s.metrics["time_to_first_token_ms"].count == 3
    assert s.metrics["chunks_per_request"].mean == pytest.approx(5 / 3)
    assert s.total_chunks == 5
    assert [meets_slos(r, slos) for r in records] == [True, False, False, False]
    assert summarize(records).goodput is None


def test_request_latency_slo() -> None:
    r = rec(0, 0.0, [0.01], 2.0, tokens=2)
    assert meets_slos(r, parse_goodput("e2e:2500"))
    assert not meets_slos(r, parse_goodput("request_latency:1500"))


def test_parse_extra_inputs_and_goodput() -> None:
    assert parse_extra_input("ignore_eos:true") == ("ignore_eos", True)
    assert parse_extra_input("min_tokens:64") == ("min_tokens", 64)
    assert parse_extra_input('nvext:{"ignore_eos":true}') == ("nvext", {"ignore_eos": True})
    assert parse_extra_input("user:alice") == ("user", "alice")
    with pytest.raises(ValueError):
        parse_extra_input("novalue")
    assert parse_goodput("ttft:300, itl:50") == {"time_to_first_token": 300.0, "inter_token_latency": 50.0}
    with pytest.raises(ValueError):
        parse_goodput("tpot:5")
