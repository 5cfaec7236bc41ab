"""A prefill step borrows the process's idle cores (``cores``): on ``alone_threads`` while no other engine of
the process has work, on its own ``threads`` otherwise, and never for decode rows or a short chunk."""

from __future__ import annotations

import pytest
import torch
from reference_testing import collect, request, write_tiny_hf_llama

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.reference import build_engine
from dynamo_lite.engines.reference.cores import BORROW_MIN_TOKENS, PROCESS_ENGINES, EngineActivity

transformers = pytest.importorskip("transformers")


def test_a_lease_counts_once_and_is_alone_without_other_work() -> None:
    activity = EngineActivity()
    mine, other = activity.lease(), activity.lease()
    assert mine.alone()
    mine.working()
    mine.working()
    assert activity.working == 1 and mine.alone()
    other.working()
    assert not mine.alone() and not other.alone() and activity.starts == 2
    other.idle()
    other.idle()
    assert activity.working == 1 and mine.alone()
    mine.idle()
    assert activity.working == 0


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):  # noqa: ANN001
    return write_tiny_hf_llama(tmp_path_factory.mktemp("tiny-llama-cores"))


async def test_prefill_steps_borrow_threads_only_while_alone(tiny_folder) -> None:
    engine = build_engine(
        EngineSettings(
            role="agg", model_path=str(tiny_folder), dtype="bfloat16", threads=1, alone_threads=2,
            max_num_tokens=128, max_seq_len=200,
        )
    )  # fmt: skip
    await engine.start()
    seen: list[tuple[int, int]] = []  # (prefill tokens, threads) of each step, read on the engine thread
    step = engine._step

    def spy(plan) -> None:  # noqa: ANN001
        seen.append((sum(n for _, _, n in plan.prefill), torch.get_num_threads()))
        step(plan)

    engine._step = spy
    prompt = list(range(3, 3 + BORROW_MIN_TOKENS + 36))
    try:
        await collect(engine, request(prompt, "a", max_tokens=3, ignore_eos=True))
        assert seen[0] == (len(prompt), 2)  # alone: the first try is every thread
        assert all(threads == 1 for _, threads in seen[1:])  # decode steps keep the engine's own
        other = PROCESS_ENGINES.lease()
        other.working()  # another engine of this process has work now
        try:
            seen.clear()
            await collect(engine, request(prompt, "b", max_tokens=3, ignore_eos=True))
        finally:
            other.idle()
        assert seen[0] == (len(prompt), 1)
    finally:
        await engine.stop()
