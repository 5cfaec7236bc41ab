"""CPU time of processes over a window: other processes from /proc/PID/stat, this one from process_time()."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .metrics import CpuUsage

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (all its threads), or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime: fields 14 and 15 of stat(5)


class CpuWindow:
    """CPU used by this process and by ``pids`` between ``start()`` and ``stop()``."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = list(pids)
        self._wall0 = 0.0
        self._self0 = 0.0
        self._pids0: dict[int, float | None] = {}
        self.client: CpuUsage | None = None
        self.servers: dict[int, CpuUsage | None] = {}

    def start(self) -> None:
        self._pids0 = {pid: process_cpu_seconds(pid) for pid in self.pids}
        self._self0 = time.process_time()
        self._wall0 = time.perf_counter()

    def stop(self) -> None:
        wall = time.perf_counter() - self._wall0
        own = time.process_time() - self._self0
        self.client = CpuUsage(own, 100.0 * own / wall if wall > 0 else 0.0)
        for pid, before in self._pids0.items():
            after = process_cpu_seconds(pid)
            if before is None or after is None:
                self.servers[pid] = None
            else:
                used = after - before
                self.servers[pid] = CpuUsage(used, 100.0 * used / wall if wall > 0 else 0.0)
