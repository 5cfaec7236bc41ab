"""CPython's cyclic garbage collector, set for a long-running server process once it has started.

Measured on the frontend (benchmarks/README.md, issue 24): with CPython's defaults a frontend at ~1000 req/s spent
~250 µs of CPU per request in the collector, a quarter of all its work. Two causes, two settings:

- Full collections walk every tracked object, and ~100k of them are the process's startup heap (modules,
  pydantic schemas, templates, clients) that will live as long as the process: ~65 ms per walk. ``gc.freeze()``
  after startup moves them to a generation that is never walked; a frozen object that later dies by refcount is
  still freed at once.
- The youngest generation is collected every 700 net container allocations — a few times per request, while
  the requests in flight hold thousands of young objects that each collection walks again and then promotes.
  A larger threshold walks them less often; garbage in cycles waits a little longer (still bounded by the
  threshold, not by time).
"""

from __future__ import annotations

import gc


def tune_for_serving(young_threshold: int) -> None:
    """Freeze the startup heap and collect the youngest generation every ``young_threshold`` allocations
    (0: leave the collector as it is). Call it once, when the process is set up and about to serve."""
    if young_threshold <= 0:
        return
    gc.collect()  # what startup left as garbage goes now, not into the frozen generation
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young_threshold, older, oldest)
