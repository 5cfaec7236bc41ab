"""How many threads an engine step gets, chosen by measuring steps rather than assumed: each ``llama_decode``
of the llamacpp engine, and the torch engine's prefill steps on cores another engine left idle (``cores``).

ggml runs a step's graph on N threads that meet at a barrier after every op (hundreds a step). With N = the
cores and one core taken by anything else — our own event loop, the other worker of ``serve``, another tenant —
every barrier waits for the descheduled thread to get a core back, and the step stalls: on 2 cores beside one
busy process, llama.cpp itself (2 threads) decoded SmolLM2 at 22-24 ms/token where 1 thread took 7-14, and 8
streams at 74-78 tok/s where 1 thread gave 144-164. On a quiet box N threads win (8 streams: ~240 tok/s vs ~150).
So each step size has two candidates, every core or one core less, and the faster by recent measurement runs
(one less only when it is clearly faster, ``MARGIN``).

Measurement: an exponential average of a step's seconds per (rows bucket, threads) for the candidate in
use; the other one is timed again (its average replaced by that step's time) now and then, at an interval that
doubles while it keeps losing (up to ``MAX_INTERVAL`` steps), so a box that stays busy or quiet pays for very few
trial steps, and one that changes is followed within an interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALPHA = 0.3  # weight of the newest step in the average: a few steps follow a change of load
MIN_INTERVAL = 16  # steps of a bucket between trials of the other candidate, at first ...
MAX_INTERVAL = 512  # ... doubling while it loses, up to this
# One core less must be faster by this fraction to be chosen: on a quiet box a single decode row took about as
# long on 1 thread as on 2 (within ~10 %, in noise), and flipping between them cost ~1 ms/token on average.
MARGIN = 0.15


@dataclass(slots=True)
class _Bucket:
    seconds: dict[int, float] = field(default_factory=dict)  # threads -> average step seconds
    best: int = 0
    interval: int = MIN_INTERVAL
    until_trial: int = MIN_INTERVAL
    trial: int = 0  # the candidate being timed this step (0: none)


class StepThreads:
    """``choose(rows)`` before a step, ``record(rows, threads, seconds)`` after it. Not thread-safe: the engine
    thread alone calls it."""

    def __init__(self, max_threads: int, adaptive: bool = True, favor_fewer: bool = False) -> None:
        self.candidates = (max_threads, max_threads - 1) if adaptive and max_threads > 1 else (max_threads,)
        # The candidate that runs unless the other is clearly faster (``MARGIN``): every thread, or, for cores
        # borrowed from another engine (``engines/reference/cores.py``), one less.
        self.favored = self.candidates[-1] if favor_fewer else self.candidates[0]
        self._buckets: dict[int, _Bucket] = {}

    def choose(self, rows: int) -> int:
        if len(self.candidates) == 1:
            return self.candidates[0]
        b = self._buckets.setdefault(rows.bit_length(), _Bucket())
        untimed = [n for n in self.candidates if n not in b.seconds]
        if untimed:
            b.trial = untimed[0]
            return b.trial
        b.until_trial -= 1
        if b.until_trial <= 0:
            b.trial = next(n for n in self.candidates if n != b.best)
            return b.trial
        return b.best

    def record(self, rows: int, threads: int, seconds: float) -> None:
        if len(self.candidates) == 1:
            return
        b = self._buckets[rows.bit_length()]
        old = b.seconds.get(threads)
        # A trial's time replaces that candidate's average, which is as old as its last trial.
        fresh = old is None or threads == b.trial
        b.seconds[threads] = seconds if fresh else old + ALPHA * (seconds - old)
        if len(b.seconds) < len(self.candidates):
            return
        favored = self.favored
        best = min(b.seconds, key=b.seconds.__getitem__)
        if b.seconds[best] > (1 - MARGIN) * b.seconds[favored]:
            best = favored
        if b.trial:  # a trial step: back off while the incumbent holds, start over when it lost
            b.interval = min(MAX_INTERVAL, b.interval * 2) if best == b.best else MIN_INTERVAL
            b.until_trial = b.interval
            b.trial = 0
        b.best = best
