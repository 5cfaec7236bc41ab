"""CPython's cyclic garbage collector, set for a long-running server process once it has started.

Measured on the frontend (benchmarks/README.md, issue 24): with CPython's defaults a frontend at ~900 req/s spent
180-240 µs of CPU per request in the collector, a fifth of all its work. Two causes, two settings:

- Full collections walk every tracked object, and ~90k of them are the process's startup heap (modules,
  pydantic schemas, templates, clients) that will live as long as the process: ~70 ms per walk. ``gc.freeze()``
  after startup moves them to a generation that is never walked; a frozen object that later dies by refcount is
  still freed at once.
- The youngest generation is collected whenever 700 more container objects are alive than at its last
  collection. The requests in flight hold more young objects than that, so it ran every few requests (~700
  times in 4000 requests at c=64), each time walking every in-flight request's objects and promoting them,
  which in turn filled the older generations. A threshold above the in-flight working set (2 collections in
  4000 requests with 10k) leaves them to die by refcount; garbage in cycles waits longer (bounded by the
  threshold, not by time).
"""

from __future__ import annotations

import gc


def tune_for_serving(young_threshold: int) -> None:
    """Freeze the startup heap and collect the youngest generation once ``young_threshold`` more container
    objects are alive than at its last collection (0: leave the collector as it is). Call it once, when the
    process is set up and about to serve."""
    if young_threshold <= 0:
        return
    gc.collect()  # what startup left as garbage goes now, not into the frozen generation
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young_threshold, older, oldest)
