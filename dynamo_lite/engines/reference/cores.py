"""Which torch engines of this process have work, so that a prefill step can borrow an idle engine's cores.

``serve`` runs a prefill and a decode engine in one process, one thread each on a 2-core machine (each engine
thread has its own OpenMP team: ``torch.set_num_threads`` is per thread). While the decode engine has nothing to
run its core idles, and a long prompt prefills on half the machine: SmolLM2 bf16, 1000 tokens, 742-900 ms on
one thread against 435-514 on two (``benchmarks/README.md``, issue 29).

So an engine with ``alone_threads`` runs a prefill step (no decode rows, at least ``BORROW_MIN_TOKENS`` prompt
tokens) on up to that many threads while no other engine of the process has work; ``StepThreads`` picks all of
them or one less by measured time per token, so a box whose other core is taken by another tenant falls back to
the engine's own ``threads``. Only prefill borrows: a decode step of a few rows gains little from a second thread
and pays a barrier per op, and lending every core to whichever engine worked alone (decode included; commit
88ef1a4, reverted) made c=1 inter-token latency worse. A decode engine that gets work during a borrowed step
shares the cores with it until that step ends (one prefill chunk at most).
"""

from __future__ import annotations

import threading

BORROW_MIN_TOKENS = 64  # shorter prefill steps keep the engine's own threads: too little work to split


class EngineActivity:
    """The torch engines of one process, and how many of them have work now."""

    def __init__(self) -> None:
        self._working = 0
        self._lock = threading.Lock()

    @property
    def working(self) -> int:
        return self._working

    def lease(self) -> ActivityLease:
        """A handle for one engine thread, counted as idle until it says otherwise."""
        return ActivityLease(self)

    def _add(self, delta: int) -> None:
        with self._lock:
            self._working += delta


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
