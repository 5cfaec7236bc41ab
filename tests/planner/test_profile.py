"""Profiles: the mocker's computed from its timing model, checked against the mocker engine measured."""

from __future__ import annotations

import pytest

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.mocker import MockerTiming, build_engine
from dynamo_lite.planner.profile import EngineProfile, measure_profile, mocker_profile


def test_mocker_profile_is_its_timing_model() -> None:
    t = MockerTiming()
    p = mocker_profile(t, speedup_ratio=2.0, max_batch_size=8)
    step = t.decode_base_s + t.decode_per_seq_s + 1000 * t.decode_per_kv_token_s
    assert p.prefill_seconds(1000) == pytest.approx(
        (t.prefill_base_s + 1000 * t.prefill_per_token_s + step) / 2
    )
    itl = t.decode_base_s + 4 * t.decode_per_seq_s + 4 * 2048 * t.decode_per_kv_token_s
    assert p.itl(4, 2048) == pytest.approx(itl / 2)
    assert p.itl(3, 1500) == pytest.approx(  # linear in both: interpolation is exact
        (t.decode_base_s + 3 * t.decode_per_seq_s + 3 * 1500 * t.decode_per_kv_token_s) / 2
    )


def test_max_concurrency_is_the_largest_batch_within_the_target() -> None:
    p = mocker_profile(max_batch_size=16)
    assert p.max_concurrency(2048, 1.0) == 16  # the batch limit
    c = p.max_concurrency(4096, 0.02)
    assert p.itl(c, 4096) <= 0.02 < p.itl(c + 1, 4096)
    assert p.max_concurrency(4096, 0.001) == 0


def test_save_and_load(tmp_path) -> None:
    p = mocker_profile()
    p.save(tmp_path / "p.json")
    q = EngineProfile.load(tmp_path / "p.json")
    assert q == p
    (tmp_path / "bad.json").write_text('{"version": 99}')
    with pytest.raises(ValueError, match="version-1"):
        EngineProfile.load(tmp_path / "bad.json")


async def test_the_computed_mocker_profile_predicts_the_measured_mocker() -> None:
    """Measured on the real mocker engine (real simulated time, speedup 1): within 25 % of the computed."""
    settings = EngineSettings(max_batch_size=8, max_seq_len=8192)
    settings.extra = {"enable_prefix_caching": False}
    grid = {"isls": (256, 2048), "concurrencies": (1, 8), "contexts": (512, 4096)}
    measured = await measure_profile(build_engine(settings), 8, decode_tokens=12, repeats=2, **grid)
    computed = mocker_profile(max_batch_size=8, **grid)
    for isl in grid["isls"]:
        assert measured.prefill_seconds(isl) == pytest.approx(computed.prefill_seconds(isl), rel=0.25)
    for c in grid["concurrencies"]:
        for ctx in grid["contexts"]:
            assert measured.itl(c, ctx) == pytest.approx(computed.itl(c, ctx), rel=0.25), (c, ctx)
