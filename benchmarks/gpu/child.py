"""A benchmark child process spoken to in JSON lines: commands on its stdin, answers on its stdout."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parents[2]


class ChildError(RuntimeError):
    pass


class Child:
    """``python -m <module> <args>`` with a reader thread; ``recv`` waits for the next answer line."""

    def __init__(self, module: str, *args: str, name: str = "") -> None:
        self.name = name or module
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(ROOT),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(line)
            else:  # a library printing to stdout: not an answer
                sys.stderr.write(f"[{self.name} stdout] {line}")
        self.lines.put(None)

    def redirect(self, sink: queue.Queue[str | None]) -> None:
        """Send this child's later lines to ``sink`` (to wait on several children at once)."""
        self.lines = sink

    def send(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(msgspec.json.encode(obj).decode() + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise ChildError(f"{self.name}: no answer within {timeout} s") from None
        if line is None:
            raise ChildError(f"{self.name} exited (code {self.proc.poll()})")
        return msgspec.json.decode(line)

    def close(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"op": "quit"})
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait()
