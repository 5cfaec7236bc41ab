"""The decision logic on synthetic metric series: each interval's observation goes through the predictor and
the planner, and the decision is applied at once (as a connector with instant workers would)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from dynamo_lite.planner.decide import DECODE, PREFILL, Decision, Planner, PlannerSettings
from dynamo_lite.planner.predict import LoadForecast, LoadPredictor, Method
from dynamo_lite.planner.profile import mocker_profile
from dynamo_lite.planner.scrape import Observation

PROFILE = mocker_profile()  # the mocker at speedup 1: ISL 3000 prefills in ~160 ms, 16 sequences per batch
SETTINGS = PlannerSettings(interval_s=10, cooldown_s=60, down_stable_intervals=3, max_total=8)


@dataclass
class Run:
    decisions: list[Decision]
    counts: list[tuple[int, int]]  # (prefill, decode) after each interval


def run_series(
    loads: list[tuple[float, float, float]],
    settings: PlannerSettings = SETTINGS,
    start: tuple[int, int] = (1, 1),
    observe=None,  # (interval, current) -> Observation fields to override
) -> Run:
    """Feed (rate, ISL, OSL) intervals to a predictor and a planner, applying each decision."""
    planner = Planner(settings, PROFILE)
    predictor = LoadPredictor(window=4, method=Method.LAST)
    current = {PREFILL: start[0], DECODE: start[1]}
    run = Run([], [])
    for i, (rate, isl, osl) in enumerate(loads):
        obs = Observation(duration_s=settings.interval_s, request_rate=rate, isl=isl, osl=osl)
        if observe is not None:
            obs = replace(obs, **observe(i, current))
        predictor.add(obs)
        decision = planner.decide(i * settings.interval_s, predictor.forecast(), dict(current), obs)
        current = {PREFILL: decision.prefill.target, DECODE: decision.decode.target}
        run.decisions.append(decision)
        run.counts.append((current[PREFILL], current[DECODE]))
    return run


def test_longer_prompts_scale_prefill_not_decode() -> None:
    run = run_series([(12, 500, 20)] * 3 + [(12, 3000, 20)] * 5)
    assert run.counts[2] == (1, 1)
    assert run.counts[-1] == (3, 1)  # 12 req/s x 162 ms / 90 % busy = 2.2 → 3 prefill workers
    assert run.counts[3] == (1, 1)  # the first interval that asks for more only counts (1/2)
    first_up = run.decisions[4].prefill
    assert first_up.direction == "up" and "req/s" in first_up.reasons[0]
    assert "2 intervals in a row" in first_up.reasons[-1]


def test_longer_answers_scale_decode_not_prefill() -> None:
    run = run_series([(4, 200, 50)] * 3 + [(4, 200, 500)] * 4)
    assert run.counts[2] == (1, 1)
    assert run.counts[-1] == (1, 3)  # 4 req/s x 500 tokens x 15 ms ITL = 30 decoding, 16 per worker, + sqrt
    assert run.decisions[4].decode.direction == "up"


def test_rate_rise_scales_both_and_quiet_scales_down_after_the_stable_intervals() -> None:
    busy, quiet = (20, 2000, 200), (0.5, 2000, 200)
    run = run_series([busy] * 8 + [quiet] * 12)
    high = run.counts[7]
    assert high[0] > 1 and high[1] > 1
    # quiet starts at interval 8; the cool-down since the last scale-up (interval 0) has passed, and the
    # down-scale needs 3 intervals in a row asking for fewer
    assert run.counts[8] == high and run.counts[9] == high
    assert run.counts[10] == (1, 1)
    assert "3 intervals in a row" in run.decisions[10].prefill.reasons[-1]
    assert run.counts[-1] == (1, 1)


def test_bounds_are_honoured() -> None:
    settings = replace(SETTINGS, min_prefill=2, max_prefill=3, min_decode=2, max_decode=2, max_total=8)
    run = run_series([(0, 1000, 100)] * 2 + [(50, 3000, 500)] * 4, settings=settings, start=(2, 2))
    assert run.counts[0] == (2, 2)
    assert run.counts[-1] == (3, 2)
    assert "max 3" in run.decisions[-1].prefill.reasons
    assert "max 2" in run.decisions[-1].decode.reasons


def test_budget_is_shared_and_never_exceeded() -> None:
    settings = replace(SETTINGS, max_prefill=8, max_decode=8, max_total=5)
    run = run_series([(40, 3000, 300)] * 5, settings=settings)
    for p, d in run.counts:
        assert p + d <= 5 and p >= 1 and d >= 1
    last = run.decisions[-1]
    assert sum(run.counts[-1]) == 5
    assert any("budget 5" in r for r in last.prefill.reasons + last.decode.reasons)


def test_minimums_over_budget_are_refused() -> None:
    with pytest.raises(ValueError, match="budget"):
        Planner(replace(SETTINGS, min_prefill=3, min_decode=3, max_total=5), PROFILE)


@pytest.mark.parametrize("period", [1, 3, 4, 6])
def test_no_flapping_within_the_cool_down(period: int) -> None:
    """Load alternating between busy and quiet every ``period`` intervals: no role reverses direction within
    the cool-down of its last change."""
    busy, quiet = (20, 3000, 300), (0.2, 3000, 300)
    loads = [(busy if (i // period) % 2 == 0 else quiet) for i in range(40)]
    run = run_series(loads)
    for role in (PREFILL, DECODE):
        changes = [(d.at, d.role(role).direction) for d in run.decisions if d.role(role).direction != "hold"]
        if period < SETTINGS.up_stable_intervals:  # busy for fewer intervals than a scale-up must last
            assert not changes, (role, changes)
            continue
        assert changes, role
        reversals = [(t0, t1) for (t0, d0), (t1, d1) in zip(changes, changes[1:], strict=False) if d0 != d1]
        assert all(t1 - t0 >= SETTINGS.cooldown_s for t0, t1 in reversals), (role, changes)
        if period >= 3:  # slow enough alternation is followed, down and up again
            assert len(reversals) >= 2, (role, changes)


def test_slow_ttft_with_a_queue_adds_a_prefill_worker_the_model_did_not_ask_for() -> None:
    def slow(i: int, current: dict) -> dict:
        return {"ttft_p90_s": 2.5, "prefill_queued": 4.0} if i >= 2 else {}

    run = run_series([(1, 500, 50)] * 3, observe=slow)
    assert run.counts[1] == (1, 1)
    d = run.decisions[2].prefill
    assert d.needed == 1 and d.target == 2
    assert any("TTFT p90 2500 ms" in r for r in d.reasons)


def test_slow_ttft_without_a_queue_is_a_profile_correction_not_a_reaction() -> None:
    # 300 ms observed where the profile says 36 ms: the correction saturates at 3x, the model sizes with it
    def slow(i: int, current: dict) -> dict:
        return {"ttft_mean_s": 0.3}

    run = run_series([(8, 500, 20)] * 4, observe=slow)
    assert run.decisions[-1].correction[PREFILL] == pytest.approx(3.0)
    assert run.counts[-1][0] == 1  # 8 x 36 ms x 3 / 90 % = 0.96


def test_itl_over_target_adds_decode_and_respects_cool_down() -> None:
    def slow(i: int, current: dict) -> dict:
        return {"itl_p90_s": 0.09, "decode_queued": 1.0}

    run = run_series([(1, 200, 50)] * 8, observe=slow)
    ups = [d.at for d in run.decisions if d.decode.direction == "up"]
    assert ups[0] == 0
    assert all(b - a >= SETTINGS.cooldown_s for a, b in zip(ups, ups[1:], strict=False))


def test_decision_describes_itself() -> None:
    planner = Planner(replace(SETTINGS, up_stable_intervals=1), PROFILE)
    d = planner.decide(0.0, LoadForecast(12, 3000, 20), {PREFILL: 1, DECODE: 1})
    text = d.describe()
    assert "prefill 1→3" in text and "decode 1→1" in text and "12.00 req/s" in text
