"""Processes on loopback for the benchmark scripts: etcd, nats-server, workers, a frontend — kept by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(what)


@dataclass
class LocalStack:
    """Everything a benchmark started; ``stop()`` sends SIGTERM by PID (SIGKILL after a grace period)."""

    tmp: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="dl-bench-"))
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        out = open(os.path.join(self.tmp, f"{name}.log"), "wb")  # noqa: SIM115 — the child owns it
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.procs[name] = proc
        return proc

    def start_services(self) -> list[str]:
        """etcd and nats-server on free loopback ports; returns the runtime flags that reach them."""
        etcd, peer, nats = free_port(), free_port(), free_port()
        self.spawn(
            "etcd",
            [
                "etcd",
                "--name",
                "bench",
                "--data-dir",
                os.path.join(self.tmp, "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-cluster",
                f"bench=http://127.0.0.1:{peer}",
            ],
        )
        self.spawn("nats", ["nats-server", "-a", "127.0.0.1", "-p", str(nats)])
        wait_for(
            lambda: b"true" in urllib.request.urlopen(f"http://127.0.0.1:{etcd}/health", timeout=1).read(),
            20,
            "etcd",
        )
        return ["--etcd-endpoints", f"127.0.0.1:{etcd}", "--nats-url", f"nats://127.0.0.1:{nats}"]

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)
