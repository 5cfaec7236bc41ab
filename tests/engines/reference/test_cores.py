"""The cores of one process, shared step by step by the engines that have work (``threads: 0``)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import torch

from dynamo_lite.engines.reference.cores import CoreShare


@pytest.fixture(autouse=True)
def torch_threads_restored() -> Iterator[None]:
    """A step also sets torch's process-wide default for new threads: put it back for the other tests."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _in_thread(step: Callable[[], int]) -> tuple[int, int]:
    """``step()`` on a thread of its own, as an engine thread runs it: (its answer, that thread's team size)."""
    out: list[tuple[int, int]] = []
    t = threading.Thread(target=lambda: out.append((step(), torch.get_num_threads())))
    t.start()
    t.join()
    return out[0]


def test_an_engine_working_alone_takes_every_core_and_two_split_them() -> None:
    share = CoreShare(cores=4)
    prefill, decode = share.lease(), share.lease()
    assert share.working == 0
    assert _in_thread(prefill.step) == (4, 4)  # alone: the whole machine
    assert _in_thread(decode.step) == (2, 2)  # both working: half each
    assert _in_thread(prefill.step) == (2, 2)  # ... from the prefill engine's next step on
    assert share.working == 2
    decode.idle()
    decode.idle()  # idempotent: counted once
    assert share.working == 1
    assert _in_thread(prefill.step) == (4, 4)
    prefill.idle()
    assert share.working == 0


def test_a_share_never_gives_less_than_one_thread() -> None:
    share = CoreShare(cores=1)
    a, b, c = share.lease(), share.lease(), share.lease()
    assert [_in_thread(lease.step) for lease in (a, b, c)] == [(1, 1)] * 3
    assert CoreShare(cores=0).threads() == 1
