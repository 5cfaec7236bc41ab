"""KV handoff between two real processes: the exporter is a child (``dynamo_lite.kv.selftest export``)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest

from dynamo_lite.kv import shm
from dynamo_lite.kv.config import KvTransferConfig
from dynamo_lite.kv.errors import KvPullError
from dynamo_lite.kv.importer import pull_kv
from dynamo_lite.kv.selftest import pattern
from dynamo_lite.protocol import KvDescriptor

ROOT = Path(__file__).resolve().parents[2]
SHAPE = ["--layers", "4", "--heads", "2", "--dim", "16", "--tokens", "64", "--seed", "5"]


class Exporter:
    """A child exporter process, spoken to over its stdin/stdout."""

    def __init__(self, *args: str) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dynamo_lite.kv.selftest", "export", *SHAPE, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def line(self, within: float = 10.0) -> str:
        try:
            line = self.lines.get(timeout=within)
        except queue.Empty:
            raise AssertionError(f"exporter {self.proc.pid} printed nothing in {within} s") from None
        assert line, f"exporter {self.proc.pid} exited with {self.proc.wait(5)}"
        return line

    def descriptor(self) -> KvDescriptor:
        return msgspec.json.decode(self.line(), type=KvDescriptor)

    def stats(self) -> dict:
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.line())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # EOF: the child stops its exporter and exits
            try:
                return self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(5)


@pytest.fixture
def exporter_process() -> Iterator[Callable[..., Exporter]]:
    children: list[Exporter] = []

    def start(*args: str) -> Exporter:
        child = Exporter(*args)
        children.append(child)
        return child

    yield start
    for child in children:
        child.stop()


def wait_until(predicate: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
async def test_round_trip_across_processes(exporter_process: Callable[..., Exporter], use_shm: bool) -> None:
    child = exporter_process("--count", "2", *([] if use_shm else ["--no-shm"]))
    descs = [child.descriptor(), child.descriptor()]
    assert child.stats()["held_count"] == 2
    for desc in descs:
        async with await pull_kv(desc, KvTransferConfig(use_shm=use_shm)) as pulled:
            assert pulled.transport == ("shm" if use_shm else "tcp")
            assert np.array_equal(np.frombuffer(pulled.buffer, np.uint8), pattern(desc.nbytes, 5))
    wait_until(lambda: child.stats()["held_count"] == 0, within=3.0)
    stats = child.stats()
    assert stats["held_bytes"] == 0 and stats["transfers"] == 2 and stats["bytes"] == 2 * descs[0].nbytes
    assert child.stop() == 0
    if use_shm:
        assert not any(shm.exists(d.shm_name) for d in descs)


@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
async def test_exporter_killed_before_pull(exporter_process: Callable[..., Exporter], use_shm: bool) -> None:
    child = exporter_process(*([] if use_shm else ["--no-shm"]))
    desc = child.descriptor()
    assert shm.exists(desc.shm_name) == use_shm
    os.kill(child.proc.pid, signal.SIGKILL)
    child.proc.wait(5)
    config = KvTransferConfig(use_shm=use_shm, connect_timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(KvPullError):
        await pull_kv(desc, config)
    assert time.monotonic() - t0 < config.connect_timeout_s
    if use_shm:
        # The dead process's resource tracker unlinks what it created: nothing stranded in /dev/shm.
        wait_until(lambda: not shm.exists(desc.shm_name), within=3.0)


async def test_hung_exporter_times_out(exporter_process: Callable[..., Exporter]) -> None:
    child = exporter_process()
    desc = child.descriptor()
    os.kill(child.proc.pid, signal.SIGSTOP)  # alive, accepting at the kernel level, answering nothing
    try:
        t0 = time.monotonic()
        with pytest.raises(KvPullError, match="did not answer"):
            await pull_kv(desc, KvTransferConfig(connect_timeout_s=0.5))
        assert time.monotonic() - t0 < 1.5
    finally:
        os.kill(child.proc.pid, signal.SIGCONT)


async def test_exporter_stop_unlinks_unpulled_segments(exporter_process: Callable[..., Exporter]) -> None:
    child = exporter_process("--count", "3")
    names = [child.descriptor().shm_name for _ in range(3)]
    assert all(shm.exists(n) for n in names)
    assert child.stop() == 0
    assert not any(shm.exists(n) for n in names)
