"""Which torch engines of this process have work, so that a prefill step can borrow an idle engine's cores.

``serve`` runs a prefill and a decode engine in one process, one thread each on a 2-core machine (each engine
thread has its own OpenMP team: ``torch.set_num_threads`` is per thread). While the decode engine has nothing to
run its core idles. Measured on this 2-core box (SmolLM2 bf16, ``benchmarks/README.md``, issue 29): a 1000-token
prefill 742-900 ms on one thread, 435-514 on two; a 64-token one 1.4x faster on two.

So an engine with ``alone_threads`` runs a prefill step (no decode rows, at least ``BORROW_MIN_TOKENS`` prompt
tokens) on up to that many threads while no other engine of the process has work. ``StepThreads`` keeps the
engine's own threads unless borrowing is measured clearly faster per prompt token, so a box whose other core is
taken by another tenant falls back. Decode steps never borrow: lending every core to whichever engine worked
alone (commit 88ef1a4, reverted) made c=1 inter-token latency worse on a busy box, and letting decode steps of 4+
rows borrow (8 streams: 444-473 tok/s on two threads, 320 on one) left served c=8 where it was and the long
prompts after it prefilling slower on two threads than on one. An engine that gets work during a borrowed step
shares the cores with it until that step ends (one prefill chunk at most); such a step's time is not what the
threads cost alone, and is not counted.
"""

from __future__ import annotations

import threading

BORROW_MIN_TOKENS = 64  # shorter prefill steps keep the engine's own threads: too little work to split


class EngineActivity:
    """The torch engines of one process, and how many of them have work now."""

    def __init__(self) -> None:
        self._working = 0
        self._starts = 0  # times an engine went from idle to working
        self._lock = threading.Lock()

    @property
    def working(self) -> int:
        return self._working

    @property
    def starts(self) -> int:
        return self._starts

    def lease(self) -> ActivityLease:
        """A handle for one engine thread, counted as idle until it says otherwise."""
        return ActivityLease(self)

    def _add(self, delta: int) -> None:
        with self._lock:
            self._working += delta
            self._starts += delta > 0


class ActivityLease:
    """One engine's place in an ``EngineActivity``: ``working()`` before a step, ``idle()`` before it waits for
    work. Used by the engine thread only."""

    def __init__(self, activity: EngineActivity) -> None:
        self.activity = activity
        self._working = False

    def working(self) -> None:
        if not self._working:
            self._working = True
            self.activity._add(1)

    def idle(self) -> None:
        if self._working:
            self._working = False
            self.activity._add(-1)

    def alone(self) -> bool:
        """No other engine of the process has work (this one may)."""
        return self.activity.working - self._working <= 0


PROCESS_ENGINES = EngineActivity()
"""The activity every CPU torch engine of this process reports to."""
