"""``SeqSlots``: the llamacpp engine's slots as llama.cpp sequence ids, with prefix caching — which slot a prompt
gets, how much of it is reused, and what llama.cpp is told to drop or share (a fake library records it)."""

from __future__ import annotations

import pytest

from dynamo_lite.engines.llamacpp.engine import SeqSlots
from dynamo_lite.engines.reference.kv_cache import NoFreeSlot


class FakeLib:
    """Records ``drop(seq, keep)`` and ``share(src, dst, n)`` as llama.cpp's memory calls would be made."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def drop(self, seq: int, keep: int = 0) -> None:
        self.calls.append(("drop", seq, keep))

    def share(self, src: int, dst: int, n: int) -> None:
        self.calls.append(("share", src, dst, n))


def slots(n: int = 3, prefix_caching: bool = True) -> tuple[SeqSlots, FakeLib]:
    lib = FakeLib()
    return SeqSlots(lib, n, 64, prefix_caching), lib  # type: ignore[arg-type]


SYSTEM = [1, 2, 3, 4]


def test_without_prefix_caching_a_freed_slot_is_dropped_and_nothing_is_reused() -> None:
    s, lib = slots(prefix_caching=False)
    slot, reused = s.allocate_for([*SYSTEM, 9])
    s.free(slot, [*SYSTEM, 9])
    assert lib.calls == [("drop", slot, 0)]
    assert s.allocate_for([*SYSTEM, 9]) == (slot, 0)


def test_a_prompt_sharing_a_prefix_gets_an_empty_slot_and_shares_the_held_cells() -> None:
    s, lib = slots()
    first, _ = s.allocate_for([*SYSTEM, 5, 6])
    s.free(first, [*SYSTEM, 5, 6, 7])  # prompt + a generated token
    assert lib.calls == [("drop", first, 7)]  # nothing past what was computed
    lib.calls.clear()
    second, reused = s.allocate_for([*SYSTEM, 8, 8])
    assert second != first and reused == len(SYSTEM)
    assert lib.calls == [("share", first, second, len(SYSTEM))]  # the held slot keeps its whole KV
    assert s.free_slots == 2


def test_the_last_prompt_token_is_always_computed() -> None:
    s, lib = slots()
    slot, _ = s.allocate_for([*SYSTEM, 5])
    s.free(slot, [*SYSTEM, 5, 6, 7])
    again, reused = s.allocate_for([*SYSTEM, 5])
    assert reused == len(SYSTEM)  # its logits are needed: never the whole prompt
    assert lib.calls[-1] == ("share", slot, again, len(SYSTEM))


def test_without_an_empty_slot_the_one_freed_longest_ago_is_evicted() -> None:
    s, lib = slots(n=2)
    a, _ = s.allocate_for([7, 7, 7])
    b, _ = s.allocate_for([8, 8, 8])
    s.free(a, [7, 7, 7])
    s.free(b, [8, 8, 8])
    lib.calls.clear()
    c, reused = s.allocate_for([8, 8, 9])  # shares b's prefix, so takes a (freed first), which is dropped
    assert (c, reused) == (a, 2)
    assert lib.calls == [("drop", a, 0), ("share", b, a, 2)]


def test_when_the_holding_slot_is_the_only_free_one_it_is_cut_to_the_prefix() -> None:
    s, lib = slots(n=1)
    a, _ = s.allocate_for([*SYSTEM, 5, 6])
    s.free(a, [*SYSTEM, 5, 6])
    lib.calls.clear()
    assert s.allocate_for([*SYSTEM, 9, 9]) == (a, len(SYSTEM))
    assert lib.calls == [("drop", a, len(SYSTEM))]


def test_allocate_without_tokens_reuses_nothing_and_drops_what_its_slot_held() -> None:
    s, lib = slots(n=1)
    a, _ = s.allocate_for([*SYSTEM, 5])
    s.free(a, [*SYSTEM, 5])
    lib.calls.clear()
    assert s.allocate() == a  # e.g. a prompt scored for its logprobs, or a KV about to be imported
    assert lib.calls == [("drop", a, 0)]


def test_slots_run_out_and_double_frees_are_refused() -> None:
    s, _ = slots(n=1)
    a = s.allocate()
    with pytest.raises(NoFreeSlot):
        s.allocate()
    s.free(a, [1, 2])
    with pytest.raises(ValueError):
        s.free(a, [1, 2])


def test_free_slots_hold_at_most_max_held_tokens_the_oldest_dropped_first() -> None:
    lib = FakeLib()
    s = SeqSlots(lib, 4, 64, prefix_caching=True, max_held=6)  # type: ignore[arg-type]
    a, b, c = s.allocate(), s.allocate(), s.allocate()
    s.free(a, [1, 1, 1])
    s.free(b, [2, 2, 2])
    lib.calls.clear()
    s.free(c, [3, 3, 3])  # 9 held: a, freed first, goes
    assert lib.calls == [("drop", c, 3), ("drop", a, 0)]
    assert s.allocate_for([1, 1, 1, 9])[1] == 0 and s.allocate_for([2, 2, 9])[1] == 2
    lib.calls.clear()
    d = s.allocate()
    s.free(d, list(range(10)))  # longer than the budget alone: its first 6 tokens
    assert ("drop", d, 6) in lib.calls
