"""Rank 0 starting, watching and stopping the engine's other ranks (``python -m
dynamo_lite.engines.reference.rank_worker``), one process each.

Rank 0 opens the ``TCPStore`` (127.0.0.1, a port the OS picks) the groups meet in and passes each follower its
rank, the port and the engine's config as JSON on the command line. A follower dies with its parent
(``PR_SET_PDEATHSIG``), exits when a collective finds rank 0 gone, and rank 0 watches the followers' PIDs: a rank
that dies fails the engine (``on_death``) even while it is idle. ``stop`` waits for the followers and kills,
by PID, any that did not exit.

How fast rank 0 learns of a death, wherever it waits:
- joining the groups (a follower still importing torch or loading): the join runs on a helper thread while rank
  0 polls the followers' PIDs every ``WATCH_INTERVAL_S``, so a follower that dies before it joined fails the
  start at once instead of after the store's ``rank_timeout_s``;
- in a collective (a step, a KV handoff, the weight-bytes gather after loading): gloo's connection to the dead
  peer closes with its process, and the collective raises at once. NCCL notices nothing by itself (its kernels
  wait on the GPU), so the watcher aborts the data group (``ProcessGroupNCCL.abort``), which fails them;
- idle: the watcher's ``on_death`` wakes the engine thread.
"""

from __future__ import annotations

import concurrent.futures
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
from dynamo_lite.engines.reference.rank_runner import RankFailure
from dynamo_lite.engines.reference.ranks import ParallelPlan

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.05  # how often rank 0 checks that the followers live


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
        self.comms: tuple[RankComm, RankComm] | None = None  # rank 0's (control, data), once joined
        self.joined = threading.Event()  # set once every rank joined the groups

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
        self.comms = self._join(device, timeout)
        self.joined.set()
        return self.comms

    def _join(self, device: torch.device, timeout: float) -> tuple[RankComm, RankComm]:
        """``connect`` on a helper thread, watching the followers meanwhile: the groups' rendezvous waits on the
        store for every rank, and a rank that died before it joined would otherwise hold it ``timeout`` s. On a
        death the helper is left to its store timeout (a daemon thread blocked in the store, holding nothing)."""
        assert self.store is not None
        done: concurrent.futures.Future[tuple[RankComm, RankComm]] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(connect(self.store, 0, self.plan.size, device, timeout))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                done.set_exception(e)

        threading.Thread(target=run, name="rank-join", daemon=True).start()
        while True:
            try:
                return done.result(WATCH_INTERVAL_S)
            except concurrent.futures.TimeoutError:
                dead = self.dead()
                if dead is not None:
                    rank, code = dead
                    raise RankFailure(f"rank {rank} exited with code {code} before it joined") from None

    def dead(self) -> tuple[int, int] | None:
        """``(rank, exit code)`` of a follower that exited, if one did."""
        for rank, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                return rank, code
        return None

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_INTERVAL_S):
            dead = self.dead()
            if dead is not None and not self._stopping.is_set():
                rank, code = dead
                log.error("torch engine: rank %d (pid %d) exited with %s", rank, self.procs[rank].pid, code)
                self._stopping.set()
                if self.comms is not None:
                    self.comms[1].abort()  # NCCL: fail the kernels waiting for the dead rank (gloo: nothing)
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
