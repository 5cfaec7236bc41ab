"""A one-line progress display on stderr (redrawn in place on a terminal, a line now and then otherwise)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from time import perf_counter
from typing import TextIO

from .records import RequestRecord

_BAR = 24


class Progress:
    """Counts finished requests; ``running()`` redraws the line while the phase runs."""

    def __init__(
        self,
        label: str,
        total: int | None,
        seconds: float | None = None,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.seconds = seconds
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.errors = 0
        self._t0 = perf_counter()
        self._tty = self.stream.isatty()

    def record(self, rec: RequestRecord) -> None:
        self.done += 1
        if not rec.ok:
            self.errors += 1

    def line(self) -> str:
        elapsed = perf_counter() - self._t0
        if self.total:
            frac = min(1.0, self.done / self.total)
            count = f"{self.done}/{self.total}"
        elif self.seconds:
            frac = min(1.0, elapsed / self.seconds)
            count = f"{self.done}"
        else:
            frac, count = 0.0, f"{self.done}"
        filled = int(frac * _BAR)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return (
            f"{self.label} [{'#' * filled}{'.' * (_BAR - filled)}] {count} req  {rate:7.1f} req/s  "
            f"errors {self.errors}  {elapsed:6.1f} s"
        )

    def _draw(self, final: bool = False) -> None:
        if self._tty:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    async def _redraw(self) -> None:
        interval = 0.5 if self._tty else 10.0
        while True:
            await asyncio.sleep(interval)
            self._draw()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Progress]:
        self._t0 = perf_counter()
        if not self.enabled:
            yield self
            return
        task = asyncio.create_task(self._redraw())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._draw(final=True)
