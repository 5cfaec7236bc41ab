"""The decision logic on recorded metric series: every interval's observation from real runs of the planner
(``benchmarks.planner_compare``, the 10-minute day trace on mocker workers: rate ramp to 3 req/s, then the
ISL shifting from 1000 to 3000 tokens, then night), replayed through a fresh predictor and planner with the
run's settings. A replay must make the decisions its live planner made, and they must be the right ones.

Two recordings: ``before``, the planner that read a plain trend line through 4 intervals and scaled up on the
first interval that asked for it (``OLD``; it moved decode 2 ↔ 3 on Poisson noise through the peak), and
``damped``, today's defaults (a slope shrunk by two standard errors over 8 intervals, two intervals before a
scale-up; round 1 of the rerun at fff4571). ``fresh`` is ``before``'s observations through today's defaults,
each decision applied before the next: the same right moves, far fewer of them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from dynamo_lite.planner.decide import DECODE, PREFILL, ROLES, Decision, Planner, PlannerSettings
from dynamo_lite.planner.predict import LoadPredictor, Method
from dynamo_lite.planner.profile import mocker_profile
from dynamo_lite.planner.scrape import Observation

DATA = Path(__file__).parent / "data"
BEFORE, DAMPED = DATA / "day_trace_600s_planner.jsonl", DATA / "day_trace_600s_planner_damped.jsonl"
# planner_compare's settings for those runs (--max-workers 4 --max-batch-size 8, its defaults otherwise)
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
OLD = dict(settings=replace(SETTINGS, up_stable_intervals=1), window=4, significance=0.0)
# the trace's shape (benchmarks/load_trace.py day_trace over 600 s)
RAMP = (90.0, 210.0)
ISL_SHIFT = (300.0, 360.0)


def _replay(
    recording: Path, settings: PlannerSettings = SETTINGS, own_counts: bool = False, **predictor
) -> list[tuple[dict, Decision]]:
    """Each recorded interval through a fresh predictor and planner; ``own_counts``: the workers running are
    what the replay decided (else what the live run had)."""
    planner = Planner(settings, mocker_profile(max_batch_size=8))
    forecast = LoadPredictor(method=Method.TREND, **predictor)
    current = {PREFILL: 1, DECODE: 1}
    out = []
    for line in recording.read_text().splitlines():
        rec = json.loads(line)
        obs = Observation(**rec["observed"])
        forecast.add(obs)
        if not own_counts:
            current = {role: rec[role]["current"] for role in ROLES}
        decision = planner.decide(rec["t"], forecast.forecast(), dict(current), obs)
        current = {role: decision.role(role).target for role in ROLES}
        out.append((rec, decision))
    return out


def _before(own_counts: bool = False) -> list[tuple[dict, Decision]]:
    return _replay(
        BEFORE, OLD["settings"], own_counts, window=OLD["window"], significance=OLD["significance"]
    )


REPLAYS = {
    "before": _before,
    "damped": lambda: _replay(DAMPED),
    "fresh": lambda: _replay(BEFORE, own_counts=True),
}


@pytest.fixture(scope="module", params=list(REPLAYS))
def replay(request) -> list[tuple[dict, Decision]]:
    return REPLAYS[request.param]()


def _changes(replay: list[tuple[dict, Decision]], role: str) -> int:
    return sum(d.role(role).direction != "hold" for _, d in replay)


@pytest.mark.parametrize("name", ["before", "damped"])
def test_the_replay_makes_the_live_planners_decisions(name: str) -> None:
    replay = REPLAYS[name]()
    assert len(replay) > 100
    for rec, decision in replay:
        for role in ROLES:
            assert decision.role(role).target == rec[role]["target"], (rec["t"], role)
            assert decision.role(role).needed == rec[role].get("needed", decision.role(role).needed)
            assert decision.correction[role] == pytest.approx(rec["correction"][role])
        if "forecast" in rec:
            assert decision.forecast.request_rate == pytest.approx(rec["forecast"]["request_rate"])


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
    assert (last.prefill.needed, last.decode.needed) == (1, 1)
    # today's window (40 s) reads the evening's fall later than the plain line (before: 1+1 at 575 s): at
    # ``before``'s end (595 s) ``fresh`` has asked for 1 decode worker for 2 of the 3 intervals a scale-down needs
    assert last.prefill.target == 1 and (
        last.decode.target == 1 or "(2/3 intervals)" in last.decode.reasons[-1]
    )
    downs = [d for _, d in replay if d.decode.direction == "down"]
    assert downs and all("intervals in a row" in " ".join(d.decode.reasons) for d in downs)


def test_no_role_reverses_within_the_cool_down(replay) -> None:
    for role in (PREFILL, DECODE):
        changes = [(d.at, d.role(role).direction) for _, d in replay if d.role(role).direction != "hold"]
        for (t0, d0), (t1, d1) in zip(changes, changes[1:], strict=False):
            if d0 != d1:
                assert t1 - t0 >= SETTINGS.cooldown_s, (role, changes)


def test_todays_defaults_do_not_follow_the_noise() -> None:
    """Before: decode up on the ramp, then 2 → 3 → 2 five times on noise, then 3 → 1 at night (11 changes).
    Today, live and on the same observations: up on the ramp, 2 → 3 → 2 at most once with the long prompts
    (2.5 req/s of them sit near the line between 2 and 3 decode workers), down at night."""
    before = _before(own_counts=True)
    assert (_changes(before, PREFILL), _changes(before, DECODE)) == (0, 11)
    for replay in (REPLAYS["damped"](), REPLAYS["fresh"]()):
        assert _changes(replay, PREFILL) == 0 and _changes(replay, DECODE) <= 4
        ups = [d.at for _, d in replay if d.decode.direction == "up"]
        assert ups[0] <= RAMP[1]  # the ramp is still followed while it ramps
