"""The closed-loop models of ``benchmarks.planner_profile_check`` on made-up profiles: where the answer is known
in closed form, both the simulation and the mean value analysis give it."""

from __future__ import annotations

import pytest

from benchmarks.planner_profile_check import predict_closed_loop, simulate_closed_loop
from dynamo_lite.planner.profile import EngineProfile

ISL, OSL = 256, 32


def flat(prefill_s: float, step_s: float, per_seq_s: float = 0.0) -> EngineProfile:
    """Prefill ``prefill_s`` at any ISL; a decode step ``step_s + per_seq_s`` per extra sequence."""
    return EngineProfile(
        "test",
        8,
        [128, 512],
        [prefill_s, prefill_s],
        [1, 8],
        [ISL],
        [[step_s], [step_s + 7 * per_seq_s]],
    )


def test_one_client_never_waits_and_never_overlaps() -> None:
    alone, busy = flat(0.3, 0.02), flat(0.9, 0.05)  # the busy tables must not matter: nothing overlaps
    handoff = 0.03
    want_itl = (handoff + (OSL - 2) * 0.02) / (OSL - 1)
    for model in (
        simulate_closed_loop(alone, 1, ISL, OSL, handoff, 10, (busy, busy), handoff_busy=0.2),
        predict_closed_loop(alone, 1, ISL, OSL, handoff, (busy, busy)),
    ):
        assert model.ttft_s == pytest.approx(0.3, abs=1e-3)
        assert model.itl_s == pytest.approx(want_itl, abs=1e-4)


def test_a_saturated_prefill_worker_sets_the_pace() -> None:
    """8 clients, prefill 0.3 s, decode ~0.65 s: the prefill worker is the bottleneck, so each client's cycle
    is 8 × 0.3 s and its TTFT that cycle less its decode time."""
    prof = flat(0.3, 0.02)
    handoff = 0.02
    decode_s = handoff + (OSL - 2) * 0.02
    sim = simulate_closed_loop(prof, 8, ISL, OSL, handoff, 40)
    assert sim.prefill_busy == pytest.approx(1.0, abs=0.05)
    assert sim.ttft_s == pytest.approx(8 * 0.3 - decode_s, rel=0.05)
    mva = predict_closed_loop(prof, 8, ISL, OSL, handoff)
    assert mva.prefill_busy == pytest.approx(1.0, abs=0.01)
    # MVA's half-service residual is an approximation: in a saturated loop a request arrives as a service
    # starts, so it waits a whole one
    assert mva.ttft_s == pytest.approx(8 * 0.3 - decode_s - 0.3 / 2, rel=0.05)


def test_two_clients_fall_into_step_and_overlap_fully() -> None:
    """Two clients start together: the second queues behind the first, after which each prefills while the
    other decodes — so with busy tables every prefill takes the busy time and every step the busy step."""
    alone, busy = flat(0.2, 0.02), flat(0.4, 0.03)
    sim = simulate_closed_loop(alone, 2, ISL, OSL, 0.02, 20, (busy, busy), handoff_busy=0.03)
    assert sim.ttft_s == pytest.approx(0.4, rel=0.1)
    plain = simulate_closed_loop(alone, 2, ISL, OSL, 0.02, 20)
    assert plain.ttft_s == pytest.approx(0.2, rel=0.1)
    assert sim.itl_s > plain.itl_s
