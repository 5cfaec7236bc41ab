"""Continuous batching bookkeeping (no model): admission into slots, the per-step token budget, chunked
prefill next to decoding sequences, and stop conditions."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch

from dynamo_lite.engines.base import TokenStream
from dynamo_lite.engines.reference.kv_cache import KvCache
from dynamo_lite.engines.reference.sampling import Sampler
from dynamo_lite.engines.reference.scheduler import Scheduler, SeqState, Sequence, stop_reason, suppressed_ids
from dynamo_lite.protocol import Phase, SamplingOptions

EOS = frozenset({2})
LOOP: list[asyncio.AbstractEventLoop] = []


@pytest.fixture(autouse=True, scope="module")
def loop() -> Iterator[None]:
    LOOP.append(asyncio.new_event_loop())  # the streams need one; nothing is pushed into them here
    yield
    LOOP.pop().close()


def seq(prompt_len: int, rid: str = "r", **opts: object) -> Sequence:
    sampling = SamplingOptions(temperature=0.0, **opts)
    return Sequence(
        request_id=rid,
        phase=Phase.AGGREGATED,
        tokens=list(range(10, 10 + prompt_len)),
        prompt_len=prompt_len,
        sampling=sampling,
        sampler=Sampler(sampling, torch.device("cpu")),
        stream=TokenStream(LOOP[0]),
    )


def scheduler(slots: int = 4, budget: int = 64) -> Scheduler:
    return Scheduler(KvCache(1, 1, 4, slots, 4096, torch.float32, torch.device("cpu")), max_num_tokens=budget)


def feed(plan) -> None:  # noqa: ANN001 - what the engine does after a step: count fed tokens, append samples
    for s in plan.decode:
        s.num_computed += 1
    for s, _, n in plan.prefill:
        s.num_computed += n
    for s in plan.sample:
        s.tokens.append(7)
        s.num_generated += 1


def test_long_prompt_is_chunked_while_others_keep_decoding() -> None:
    sched = scheduler(budget=64)
    short, long = seq(10, "short"), seq(1000, "long")
    sched.add(short)
    sched.admit()
    feed(sched.plan())  # short prefilled, first token sampled
    sched.add(long)
    assert sched.admit() == [long]
    steps = 0
    while long.num_computed < 1000:
        plan = sched.plan()
        assert plan.num_tokens <= 64
        assert short in plan.decode and short in plan.sample  # one token for the short stream every step
        assert plan.prefill == [(long, long.num_computed, min(63, 1000 - long.num_computed))]
        assert (long in plan.sample) == (long.num_computed + plan.prefill[0][2] == 1000)
        feed(plan)
        steps += 1
    assert steps == 16 and long.num_generated == 1 and short.num_generated == 17


def test_admission_waits_for_a_free_slot_and_frees_on_remove() -> None:
    sched = scheduler(slots=2)
    a, b, c = seq(4, "a"), seq(4, "b"), seq(4, "c")
    for s in (a, b, c):
        sched.add(s)
    assert sched.admit() == [a, b] and c.state is SeqState.WAITING
    sched.remove(a)
    assert a.state is SeqState.DONE and a.slot == -1
    assert sched.admit() == [c] and c.slot == 0  # the lowest free slot
    sched.remove(c)
    sched.remove(c)  # idempotent
    assert sched.cache.free_slots == 1


def test_decode_rows_come_first_in_slot_order() -> None:
    sched = scheduler(slots=3)
    seqs = [seq(3, str(i)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    sched.admit()
    feed(sched.plan())
    plan = sched.plan()
    assert [s.slot for s in plan.decode] == [0, 1, 2] and plan.sample_rows == [0, 1, 2]


def test_stop_conditions() -> None:
    s = seq(3, max_tokens=4, min_tokens=2, stop_token_ids=[9])
    s.num_generated = 1
    assert suppressed_ids(s, EOS) == [9, 2]  # too early to stop
    assert stop_reason(s, 2, EOS, 4096) is None
    s.num_generated = 2
    assert suppressed_ids(s, EOS) is None
    assert stop_reason(s, 2, EOS, 4096) == "stop"
    assert stop_reason(s, 9, EOS, 4096) == "stop"
    assert stop_reason(s, 5, EOS, 4096) is None
    s.num_generated = 4
    assert stop_reason(s, 5, EOS, 4096) == "length"
    ignoring = seq(3, max_tokens=10, ignore_eos=True)
    ignoring.num_generated = 1
    assert stop_reason(ignoring, 2, EOS, 4096) is None
    assert stop_reason(ignoring, 5, EOS, max_seq_len=3) == "length"  # the context is full
