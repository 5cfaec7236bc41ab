"""The CPU cores of one process, split between the torch engines that have work (``threads: 0``).

The embedded mode runs a prefill and a decode engine in one process, each on its own engine thread with its own
OpenMP team (``torch.set_num_threads`` is per thread). A fixed split (half the cores each) leaves half the
machine idle whenever one engine waits: a long prompt prefilled alone took twice as long as it could. Two full
teams on the same cores are worse: when both engines run, OpenMP's threads wait for each other at every barrier
(decode on 2 cores went from 35 to 200 ms/token). So the engines share: before each step an engine takes
``cores // engines with work`` threads: all of them while it works alone, its share while the other one works
too. An engine counts as working from the step after it got work until it waits for work again, so a change
reaches the other engine at its next step (one step of overlap at most).

An explicit ``threads: N`` keeps N threads for every step, as before. A worker process with one engine takes all
the cores, torch's own default.
"""

from __future__ import annotations

import threading

import torch

# torch's default team size (the physical cores it sees), read before any engine thread changes its own.
DEFAULT_CORES = torch.get_num_threads()


class CoreShare:
    """Cores shared by the engines of one process: ``threads()`` is what a working engine uses now."""

    def __init__(self, cores: int = DEFAULT_CORES) -> None:
        self.cores = max(1, cores)
        self._working = 0
        self._lock = threading.Lock()

    @property
    def working(self) -> int:
        return self._working

    def threads(self) -> int:
        """Threads for one working engine: the cores split evenly among those working (at least one)."""
        return max(1, self.cores // max(1, self._working))

    def lease(self) -> CoreLease:
        """A handle for one engine thread, idle until it says otherwise."""
        return CoreLease(self)

    def _add(self, delta: int) -> None:
        with self._lock:
            self._working += delta


class CoreLease:
    """One engine's place in a ``CoreShare``: ``step()`` before a step sets its thread count; ``idle()`` when it
    waits for work. Used by the engine thread only."""

    def __init__(self, share: CoreShare) -> None:
        self.share = share
        self._working = False
        self._threads = 0  # what this thread's team was last set to

    def step(self) -> int:
        """Count this engine as working and size the calling thread's OpenMP team for one step."""
        if not self._working:
            self._working = True
            self.share._add(1)
        threads = self.share.threads()
        if threads != self._threads:
            torch.set_num_threads(threads)
            self._threads = threads
        return threads

    def idle(self) -> None:
        """Stop counting this engine (it is about to wait for work): the others may take its cores."""
        if self._working:
            self._working = False
            self.share._add(-1)


PROCESS_CORES = CoreShare()
"""The share every ``threads: 0`` engine of this process joins."""
