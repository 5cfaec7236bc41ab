"""Which torch engines of this process have work, so that a step can borrow an idle engine's cores.

``serve`` runs a prefill and a decode engine in one process, one thread each on a 2-core machine (each engine
thread has its own OpenMP team: ``torch.set_num_threads`` is per thread). While one engine has nothing to run
its core idles. Measured on this 2-core box (SmolLM2 bf16, ``benchmarks/README.md``, issue 29): a 1000-token
prefill 742-900 ms on one thread, 435-514 on two; 8 decode streams 320 tok/s on one thread, 444-473 on two.

So an engine with ``alone_threads`` runs a step on up to that many threads while no other engine of the process
has work, if the step is big enough to split: at least ``BORROW_MIN_TOKENS`` tokens, or a decode-only step of at
least ``BORROW_MIN_ROWS`` rows. ``StepThreads`` picks all of them or one less by measured time per token, so a
box whose other core is taken by another tenant falls back. Single-row decode keeps the engine's own threads:
lending every core to whichever engine worked alone, single rows included (commit 88ef1a4, reverted), made c=1
inter-token latency worse. An engine that gets work during another's borrowed step shares the cores with it
until that step ends (one decode step, or one prefill chunk, at most); such a step's time is not what the
threads cost alone, and is not counted (a 2-thread prefill chunk overlapped by decode steps measured slower
than one thread, and the long prompts after it kept one thread).
"""

from __future__ import annotations

import threading

# A step with fewer tokens borrows only as a decode-only step of BORROW_MIN_ROWS rows or more. Quiet box, SmolLM2
# bf16, 2 threads against 1: 64-token prefill 1.4x, 4 decode streams 1.15-1.25x, 8 streams 1.4-1.5x; one row
# 1.2x but a single stream's latency is what a busy box hurts most (commit 88ef1a4), and it already beats vLLM's.
BORROW_MIN_TOKENS = 64
BORROW_MIN_ROWS = 4


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
