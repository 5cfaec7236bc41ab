"""The decision logic on a recorded metric series: every interval's observation from a real run of the planner
(``benchmarks.planner_compare``, the 10-minute day trace on mocker workers: rate ramp to 3 req/s, then the
ISL shifting from 1000 to 3000 tokens, then night), replayed through a fresh predictor and planner with the
run's settings. The replay must make the decisions the live planner made, and they must be the right ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynamo_lite.planner.decide import DECODE, PREFILL, ROLES, Planner, PlannerSettings
from dynamo_lite.planner.predict import LoadPredictor, Method
from dynamo_lite.planner.profile import mocker_profile
from dynamo_lite.planner.scrape import Observation

RECORDING = Path(__file__).parent / "data" / "day_trace_600s_planner.jsonl"
# planner_compare's settings for that run (--max-workers 4 --max-batch-size 8, its defaults otherwise)
SETTINGS = PlannerSettings(
    ttft_s=1.5,
    itl_s=0.06,
    max_prefill=3,
    max_decode=3,
    max_total=4,
    interval_s=5.0,
    cooldown_s=30.0,
    down_stable_intervals=3,
)
# the trace's shape (benchmarks/load_trace.py day_trace over 600 s)
RAMP = (90.0, 210.0)
ISL_SHIFT = (300.0, 360.0)


@pytest.fixture(scope="module")
def replay() -> list[tuple[dict, object]]:
    planner = Planner(SETTINGS, mocker_profile(max_batch_size=8))
    predictor = LoadPredictor(window=4, method=Method.TREND)
    out = []
    for line in RECORDING.read_text().splitlines():
        rec = json.loads(line)
        obs = Observation(**rec["observed"])
        predictor.add(obs)
        current = {role: rec[role]["current"] for role in ROLES}
        out.append((rec, planner.decide(rec["t"], predictor.forecast(), current, obs)))
    return out


def test_the_replay_makes_the_live_planners_decisions(replay) -> None:
    assert len(replay) > 100
    for rec, decision in replay:
        for role in ROLES:
            assert decision.role(role).target == rec[role]["target"], (rec["t"], role)
            assert decision.correction[role] == pytest.approx(rec["correction"][role])


def test_bounds_and_budget_hold_throughout(replay) -> None:
    for _, d in replay:
        assert 1 <= d.prefill.target <= 3 and 1 <= d.decode.target <= 3
        assert d.prefill.target + d.decode.target <= 4


def test_the_rate_ramp_scales_decode_first(replay) -> None:
    ups = [(d.at, role) for _, d in replay for role in ROLES if d.role(role).direction == "up"]
    t, role = ups[0]
    assert role == DECODE  # 3 req/s x 200 tokens: the batch fills before the prefill worker does
    assert RAMP[0] <= t <= RAMP[1]


def test_the_rate_alone_never_scales_prefill(replay) -> None:
    """Short prompts at 3 req/s keep one prefill worker under 20 % busy: any prefill scale-up waits for the
    long prompts (in this recording none came: 2.5 req/s of 3000-token prompts fit one worker too)."""
    ups = [d.at for _, d in replay if d.prefill.direction == "up"]
    assert all(t >= ISL_SHIFT[0] for t in ups)


def test_quiet_brings_it_back_to_one_of_each(replay) -> None:
    last = replay[-1][1]
    assert (last.prefill.target, last.decode.target) == (1, 1)
    downs = [d for _, d in replay if d.decode.direction == "down"]
    assert downs and all("intervals in a row" in " ".join(d.decode.reasons) for d in downs)


def test_no_role_reverses_within_the_cool_down(replay) -> None:
    for role in (PREFILL, DECODE):
        changes = [(d.at, d.role(role).direction) for _, d in replay if d.role(role).direction != "hold"]
        for (t0, d0), (t1, d1) in zip(changes, changes[1:], strict=False):
            if d0 != d1:
                assert t1 - t0 >= SETTINGS.cooldown_s, (role, changes)
