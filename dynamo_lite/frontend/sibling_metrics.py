"""``/metrics`` of a frontend run as several processes (``--workers N``): the sum over all of them.

Each process keeps its own registry, as with one process (no shared-memory values on the per-chunk path), and
answers on a Unix socket ``<dir>/<pid>.sock`` in the supervisor's directory with a snapshot of it. The process
that gets the scrape collects every sibling's snapshot and adds them up, sample by sample: counters and
histograms are totals, the gauges (in-flight, queued, disconnected clients) are sums over the live processes
(prometheus_client's "livesum"), ``*_created`` keeps the earliest. ``dynamo_lite_frontend_processes`` says how
many processes answered. A process that dies takes its counts with it: its replacement starts from zero, which
Prometheus' ``rate()`` reads as a counter reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

log = logging.getLogger("dynamo_lite.frontend.metrics")

PROCESSES = "dynamo_lite_frontend_processes"
SOCKET_SUFFIX = ".sock"
MAX_SNAPSHOT_BYTES = 64 << 20


class Sample(msgspec.Struct, array_like=True, frozen=True):
    name: str
    labels: dict[str, str]
    value: float


class Family(msgspec.Struct, array_like=True):
    name: str
    documentation: str
    type: str
    unit: str
    samples: list[Sample]


class Snapshot(msgspec.Struct, array_like=True):
    """One process's registry at one moment."""

    pid: int
    families: list[Family]


def snapshot(registry: CollectorRegistry) -> Snapshot:
    families = [
        Family(
            m.name, m.documentation, m.type, m.unit, [Sample(s.name, s.labels, s.value) for s in m.samples]
        )
        for m in registry.collect()
    ]
    return Snapshot(os.getpid(), families)


def merge(snapshots: list[Snapshot]) -> list[Metric]:
    """The families of all ``snapshots``, samples with the same name and labels added (``_created``: the min)."""
    metrics: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for snap in snapshots:
        for fam in snap.families:
            if fam.name not in metrics:
                metrics[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            into = values[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(s.labels.items()))
                old = into.get(key)
                if old is None:
                    into[key] = s.value
                elif s.name.endswith("_created"):
                    into[key] = min(old, s.value)
                else:
                    into[key] = old + s.value
    for name, metric in metrics.items():
        for (sample, labels), value in values[name].items():
            metric.add_sample(sample, dict(labels), value)
    return list(metrics.values())


class _Families:
    """A collector over ready-made families, for ``generate_latest``."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def exposition(snapshots: list[Snapshot]) -> bytes:
    """The text exposition of ``snapshots`` added up, with the count of processes they came from."""
    processes = GaugeMetricFamily(PROCESSES, "Frontend processes whose metrics this scrape adds up")
    processes.add_metric([], len(snapshots))
    return generate_latest(_Families([*merge(snapshots), processes]))  # type: ignore[arg-type]


class SiblingMetrics:
    """This process's side: serve its snapshot to siblings, and render the sum over all of them. ``pid`` names
    its socket (this process's id by default)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        directory: str | os.PathLike[str],
        timeout_s: float = 2.0,
        pid: int | None = None,
    ) -> None:
        self._registry = registry
        self._dir = Path(directory)
        self._path = self._dir / f"{os.getpid() if pid is None else pid}{SOCKET_SUFFIX}"
        self._timeout_s = timeout_s
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._answer, path=str(self._path))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(OSError):
            self._path.unlink()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(msgspec.msgpack.encode(snapshot(self._registry)))
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _fetch(self, path: Path) -> Snapshot | None:
        try:
            async with asyncio.timeout(self._timeout_s):
                reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_SNAPSHOT_BYTES)
                try:
                    data = await reader.read(-1)
                finally:
                    writer.close()
            return msgspec.msgpack.decode(data, type=Snapshot)
        except (OSError, TimeoutError, msgspec.DecodeError) as e:
            # Gone (killed; the supervisor removes its socket when it restarts it) or too busy to answer.
            log.debug("no metrics from %s: %r", path.name, e)
            return None

    async def render(self) -> bytes:
        """The exposition of the whole frontend: this process's registry plus every sibling's that answers."""
        others = [p for p in self._dir.glob(f"*{SOCKET_SUFFIX}") if p != self._path]
        fetched = await asyncio.gather(*(self._fetch(p) for p in others))
        return exposition([snapshot(self._registry), *(s for s in fetched if s is not None)])
