"""Worker processes on this host: ``python -m dynamo_lite.worker --mode ROLE`` with given arguments.

Scale-up starts processes (each with its own loopback metrics port); scale-down sends SIGTERM to the newest
ones, and the worker drains as it does on any SIGTERM (deregisters first so routers stop picking it, finishes
in-flight requests within its ``--drain-timeout``, then exits). A draining process that outlives
``kill_after_s`` is killed. Every process is kept by PID; ``worker_seconds()`` is the time they ran, start-up
and drain included.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LocalWorker:
    role: str
    popen: subprocess.Popen
    metrics_port: int
    started_at: float
    draining_since: float | None = None
    ended_at: float | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def seconds(self, now: float) -> float:
        return (self.ended_at if self.ended_at is not None else now) - self.started_at


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalConnector:
    """``args[role]``: the worker flags after ``--mode ROLE`` (engine, model, runtime: etcd/NATS, namespace)."""

    def __init__(
        self,
        args: dict[str, list[str]],
        log_dir: str | Path,
        kill_after_s: float = 60.0,
        python: str = sys.executable,
        clock=time.monotonic,
    ) -> None:
        self.args = args
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.kill_after_s = kill_after_s
        self.python = python
        self.clock = clock
        self.workers: list[LocalWorker] = []  # every one started, ended ones included
        self._serial = 0

    def _live(self, role: str | None = None) -> list[LocalWorker]:
        self.reap()
        return [
            w
            for w in self.workers
            if w.ended_at is None and w.draining_since is None and (role is None or w.role == role)
        ]

    def replicas(self) -> dict[str, int]:
        live = self._live()
        return {role: sum(1 for w in live if w.role == role) for role in self.args}

    def metrics_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{w.metrics_port}/metrics" for w in self._live()]

    def scale(self, role: str, replicas: int) -> None:
        live = self._live(role)
        for _ in range(replicas - len(live)):
            self.start(role)
        for w in sorted(live, key=lambda w: w.started_at)[replicas:] if replicas < len(live) else []:
            self.drain(w)

    def start(self, role: str) -> LocalWorker:
        self._serial += 1
        port = _free_port()
        cmd = [self.python, "-m", "dynamo_lite.worker", "--mode", role, "--metrics-host", "127.0.0.1"]
        cmd += ["--metrics-port", str(port), *self.args[role]]
        out = open(self.log_dir / f"{role}-{self._serial}.log", "wb")  # noqa: SIM115 — the child owns it
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
        out.close()
        w = LocalWorker(role, popen, port, self.clock())
        self.workers.append(w)
        log.info("started %s worker pid %d (metrics :%d)", role, popen.pid, port)
        return w

    def drain(self, w: LocalWorker) -> None:
        if w.popen.poll() is None:
            w.popen.send_signal(signal.SIGTERM)
            log.info("draining %s worker pid %d (SIGTERM)", w.role, w.pid)
        w.draining_since = self.clock()

    def reap(self) -> None:
        """Note the processes that ended; kill drains that overran ``kill_after_s``."""
        now = self.clock()
        for w in self.workers:
            if w.ended_at is not None:
                continue
            code = w.popen.poll()
            if code is not None:
                w.ended_at = now
                if w.draining_since is None:
                    log.warning("%s worker pid %d exited by itself (code %s)", w.role, w.pid, code)
            elif w.draining_since is not None and now - w.draining_since > self.kill_after_s:
                log.warning(
                    "%s worker pid %d still draining after %.0fs: SIGKILL", w.role, w.pid, self.kill_after_s
                )
                w.popen.kill()

    def worker_seconds(self) -> float:
        now = self.clock()
        self.reap()
        return sum(w.seconds(now) for w in self.workers)

    def close(self, timeout_s: float | None = None) -> None:
        """SIGTERM every worker still running, wait for them to drain (up to ``kill_after_s``), then kill."""
        for w in self.workers:
            if w.ended_at is None and w.draining_since is None:
                self.drain(w)
        deadline = time.monotonic() + (self.kill_after_s if timeout_s is None else timeout_s)
        for w in self.workers:
            if w.ended_at is not None:
                continue
            try:
                w.popen.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                w.popen.kill()
                w.popen.wait(5)
        self.reap()
