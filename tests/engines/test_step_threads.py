"""``StepThreads``: the faster of all cores or one less, as measured, followed when the load changes."""

from __future__ import annotations

from dynamo_lite.engines.step_threads import MAX_INTERVAL, StepThreads


def run(chooser: StepThreads, seconds: dict[int, float], steps: int, rows: int = 1) -> list[int]:
    """``steps`` steps where a step on ``n`` threads takes ``seconds[n]``; the threads each step got."""
    used = []
    for _ in range(steps):
        n = chooser.choose(rows)
        chooser.record(rows, n, seconds[n])
        used.append(n)
    return used


def test_one_thread_is_fixed() -> None:
    chooser = StepThreads(1)
    assert run(chooser, {1: 0.01}, 10) == [1] * 10


def test_not_adaptive_always_takes_every_thread() -> None:
    chooser = StepThreads(4, adaptive=False)
    assert run(chooser, {4: 0.05, 3: 0.01}, 50) == [4] * 50


def test_picks_the_faster_and_tries_the_other_ever_less_often() -> None:
    chooser = StepThreads(2)
    used = run(chooser, {2: 0.030, 1: 0.010}, 2000)  # a busy box: one thread is faster
    assert used[:2] == [2, 1]  # each candidate timed once, then the faster
    trials = [i for i, n in enumerate(used) if n == 2][1:]
    assert len(trials) <= 8  # 16, 32, ... 512 steps apart
    assert all(b - a <= MAX_INTERVAL for a, b in zip(trials, trials[1:], strict=False))
    assert trials[-1] - trials[-2] == MAX_INTERVAL


def test_follows_a_change_of_load() -> None:
    chooser = StepThreads(2)
    run(chooser, {2: 0.030, 1: 0.010}, 3000)  # busy: settles on 1 thread
    used = run(chooser, {2: 0.008, 1: 0.012}, MAX_INTERVAL + 8)  # quiet again
    assert used[-1] == 2  # found within one backed-off interval
    assert run(chooser, {2: 0.008, 1: 0.012}, 40).count(2) >= 39


def test_buckets_by_rows() -> None:
    chooser = StepThreads(2)
    run(chooser, {2: 0.030, 1: 0.010}, 100, rows=1)  # single rows: 1 thread faster
    run(chooser, {2: 0.010, 1: 0.030}, 100, rows=8)  # 8 rows: 2 threads faster
    assert chooser.choose(1) == 1
    assert chooser.choose(8) == 2


def test_all_cores_unless_one_less_is_clearly_faster() -> None:
    chooser = StepThreads(2)
    used = run(chooser, {2: 0.0070, 1: 0.0065}, 200)  # a quiet box, one row: within the margin
    assert used[2:].count(2) >= len(used[2:]) - 8  # only the trials ran on one thread


def test_borrowed_cores_only_when_clearly_faster() -> None:
    chooser = StepThreads(2, favor_fewer=True)
    used = run(chooser, {2: 0.0065, 1: 0.0070}, 200)  # 2 threads a little faster: within the margin
    assert used[2:].count(1) >= len(used[2:]) - 8  # only the trials borrowed
    chooser = StepThreads(2, favor_fewer=True)
    used = run(chooser, {2: 0.30, 1: 0.45}, 200)  # a long prefill on a quiet box
    assert used[2:].count(2) >= len(used[2:]) - 8
