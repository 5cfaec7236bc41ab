"""``tune_for_serving``: the startup heap frozen, the young generation's threshold set; 0 changes nothing."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from dynamo_lite.runtime.config import RuntimeSettings
from dynamo_lite.runtime.gc_tuning import tune_for_serving


@pytest.fixture(autouse=True)
def restored_gc() -> Iterator[None]:
    """The test process's collector as it was: the tests that follow must not run on a frozen heap."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_freezes_the_startup_heap_and_raises_the_young_threshold() -> None:
    _, older, oldest = gc.get_threshold()
    startup_object = ["lives as long as the process"]  # a list: always tracked (a dict of strs is not)
    tune_for_serving(RuntimeSettings().gc_young_threshold)
    assert gc.get_threshold() == (RuntimeSettings().gc_young_threshold, older, oldest)
    assert gc.get_freeze_count() > 0
    assert not any(o is startup_object for o in gc.get_objects())  # frozen: no collection walks it
    later = ["allocated while serving"]
    assert any(o is later for o in gc.get_objects(generation=0))


def test_zero_leaves_the_collector_alone() -> None:
    threshold = gc.get_threshold()
    tune_for_serving(0)
    assert gc.get_threshold() == threshold
    assert gc.get_freeze_count() == 0
