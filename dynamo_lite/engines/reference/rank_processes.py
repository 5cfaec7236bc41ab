"""Rank 0 starting, watching and stopping the engine's other ranks (``python -m
dynamo_lite.engines.reference.rank_worker``), one process each.

Rank 0 opens the ``TCPStore`` (127.0.0.1, a port the OS picks) the groups meet in and passes each follower its
rank, the port and the engine's config as JSON on the command line. A follower dies with its parent
(``PR_SET_PDEATHSIG``), exits when a collective finds rank 0 gone, and rank 0 watches the followers' PIDs: a rank
that dies fails the engine (``on_death``) even while it is idle. ``stop`` waits for the followers and kills,
by PID, any that did not exit.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable

import msgspec
import torch
import torch.distributed as dist

from dynamo_lite.engines.reference.config import ReferenceConfig
from dynamo_lite.engines.reference.rank_comm import RankComm, connect
from dynamo_lite.engines.reference.ranks import ParallelPlan

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.1  # how often rank 0 checks that the followers live


class RankArgs(msgspec.Struct):
    """A follower's command line (JSON)."""

    rank: int
    size: int
    port: int
    parent_pid: int
    config: ReferenceConfig


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank ``rank``'s device: the next GPUs after rank 0's on CUDA, the CPU otherwise."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


class RankProcesses:
    """Rank 0's followers (see the module docstring)."""

    def __init__(
        self, config: ReferenceConfig, plan: ParallelPlan, on_death: Callable[[int, int], None]
    ) -> None:
        self.config = config
        self.plan = plan
        self.on_death = on_death  # (rank, exit code), from the watcher thread
        self.procs: dict[int, subprocess.Popen] = {}
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self.store: dist.TCPStore | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def start(self, device: torch.device) -> tuple[RankComm, RankComm]:
        """Start ranks 1..N-1 and join them: ``(control, data)`` of rank 0."""
        timeout = self.config.rank_timeout_s
        self.store = dist.TCPStore(
            "127.0.0.1",
            0,
            self.plan.size,
            is_master=True,
            timeout=datetime.timedelta(seconds=timeout),
            wait_for_workers=False,
        )
        for rank in range(1, self.plan.size):
            args = RankArgs(rank, self.plan.size, self.store.port, os.getpid(), self.config)
            cmd = [
                sys.executable,
                "-m",
                "dynamo_lite.engines.reference.rank_worker",
                msgspec.json.encode(args),
            ]
            self.procs[rank] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)  # noqa: S603 - our own module
        log.info("torch engine: %s, followers pids %s", self.plan.describe(), self.pids)
        self._watcher = threading.Thread(target=self._watch, name="rank-watch", daemon=True)
        self._watcher.start()
        return connect(self.store, 0, self.plan.size, device, timeout)

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_INTERVAL_S):
            for rank, proc in self.procs.items():
                code = proc.poll()
                if code is not None and not self._stopping.is_set():
                    log.error("torch engine: rank %d (pid %d) exited with %s", rank, proc.pid, code)
                    self._stopping.set()
                    self.on_death(rank, code)
                    return

    def expect_exit(self) -> None:
        """From now on a follower exiting is the stop, not a death."""
        self._stopping.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait up to ``timeout_s`` for the followers to exit, then kill those left (by PID)."""
        self._stopping.set()
        for rank, proc in self.procs.items():
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("torch engine: rank %d (pid %d) did not exit; killing it", rank, proc.pid)
                proc.kill()
                proc.wait()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()
