"""Where one request spent its time: ``nvext: {"extra_fields": ["timing", "worker_id"]}`` returns it, as Dynamo does.

Each process measures its own part and keeps it in a context variable of the request's task, so the code on
the path only adds a number where it is measured:

- a worker (``Worker.handle``) fills a ``WorkerTiming`` — request received → first chunk sent, and the KV pulled
  (``note_kv_transfer``, called where the pull happens) — and sends it on its first chunk;
- the frontend's router adds the queue (waits for an instance with room), the prefill and decode round trips and
  the instances they ran on; the frontend adds preprocessing, the first token and the end.

``RequestTiming.report`` assembles the breakdown: preprocess + queue + prefill + decode is the end-to-end time
up to what passes between those steps (a test holds it within 5 %).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from dynamo_lite import tracing
from dynamo_lite.protocol import WorkerTiming

TIMING, WORKER_ID = "timing", "worker_id"  # the nvext.extra_fields this module answers

_worker: ContextVar[WorkerTiming | None] = ContextVar("dynamo_lite_worker_timing", default=None)
_request: ContextVar[RequestTiming | None] = ContextVar("dynamo_lite_request_timing", default=None)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


# ---- worker side ------------------------------------------------------------------------------------------


def worker_timing(instance_id: str) -> WorkerTiming:
    """A ``WorkerTiming`` for the request this task serves; ``note_kv_transfer`` adds to it."""
    wt = WorkerTiming(instance_id)
    _worker.set(wt)
    return wt


def note_kv_transfer(seconds: float, nbytes: int, transport: str) -> None:
    """A KV pull for the current request finished (``seconds`` long): into its timing and its trace."""
    wt = _worker.get()
    if wt is not None:
        wt.kv_transfer_ms += _ms(seconds)
        wt.kv_bytes += nbytes
        wt.kv_transport = transport
    tracing.past_span("kv_transfer", seconds, {"kv.bytes": nbytes, "kv.transport": transport})


def note_engine_start(created: float, admitted: float) -> None:
    """The engine's first output for the current request: it was queued at ``created`` and taken into a batch
    at ``admitted`` (``time.perf_counter()``; 0: not known). Into its timing and, as ``queue`` and ``compute``
    spans, its trace."""
    if not admitted:
        return
    now = time.perf_counter()
    wt = _worker.get()
    if wt is not None and not wt.engine_queue_ms:
        wt.engine_queue_ms = _ms(admitted - created)
    if tracing.enabled():
        tracing.past_span("queue", admitted - created, ended_s_ago=now - admitted)
        tracing.past_span("compute", now - admitted)


# ---- frontend side ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestTiming:
    """One request's times on the frontend (``time.perf_counter`` seconds) and what its workers sent."""

    received: float
    preprocessed: float = 0.0
    queue_s: float = 0.0
    prefill_s: float = 0.0
    prefill_instance: str = ""
    prefill: WorkerTiming | None = None
    decode_sent: float = 0.0
    decode_done: float = 0.0
    decode_instance: str = ""
    decode: WorkerTiming | None = None
    first_token: float = 0.0

    def bind(self) -> None:
        """Make this the timing of the current task's request (the router adds to it)."""
        _request.set(self)

    def placed(self, prefill: bool, instance_id: str) -> None:
        """The router placed the request's prefill (else its decode or aggregated run) on ``instance_id`` (the
        last one counts, after a migration)."""
        if prefill:
            self.prefill_instance = instance_id
        else:
            self.decode_instance = instance_id

    def instances(self) -> dict[str, str]:
        """Role → instance id of what the router placed (for the access log)."""
        pairs = (("prefill", self.prefill_instance), ("decode", self.decode_instance))
        return {role: instance for role, instance in pairs if instance}

    def prefilled(self, instance_id: str, timing: WorkerTiming | None, seconds: float) -> None:
        """The prefill worker ``instance_id`` answered after ``seconds`` (the router's round trip)."""
        self.prefill_instance = instance_id
        self.prefill = timing
        self.prefill_s += seconds

    def decode_sent_now(self) -> None:
        """The decode (or aggregated) request goes out (the first time counts: a migration continues it)."""
        self.decode_sent = self.decode_sent or time.perf_counter()

    def decode_chunk(self, instance_id: str, timing: WorkerTiming | None, last: bool) -> None:
        """A chunk from the decode (or aggregated) worker ``instance_id``."""
        self.decode_instance = instance_id
        if timing is not None:
            self.decode = timing
        if last:
            self.decode_done = time.perf_counter()

    def report(self, fields: frozenset[str], output_tokens: int) -> dict:
        """The response's ``nvext`` for ``fields`` (``TIMING``, ``WORKER_ID``), as of now."""
        now = time.perf_counter()
        ids = {
            "prefill_worker_id": self.prefill_instance or None,
            "decode_worker_id": self.decode_instance or None,
        }
        out: dict = {}
        if WORKER_ID in fields:
            out[WORKER_ID] = ids
        if TIMING in fields:
            first = self.first_token or now
            decode_end = self.decode_done or now
            kv = self.decode
            out[TIMING] = {
                "total_ms": _ms(now - self.received),
                "ttft_ms": _ms(first - self.received),
                "itl_ms": _ms((now - first) / (output_tokens - 1)) if output_tokens > 1 else 0.0,
                "preprocess_ms": _ms(self.preprocessed - self.received) if self.preprocessed else 0.0,
                "queue_ms": _ms(self.queue_s),
                "prefill_ms": _ms(self.prefill_s),
                "prefill_worker_ms": self.prefill.first_chunk_ms if self.prefill else 0.0,
                "prefill_queue_ms": self.prefill.engine_queue_ms if self.prefill else 0.0,
                "kv_transfer_ms": kv.kv_transfer_ms if kv else 0.0,
                "kv_transfer_bytes": kv.kv_bytes if kv else 0,
                "kv_transport": kv.kv_transport if kv else "",
                "decode_ms": _ms(decode_end - self.decode_sent) if self.decode_sent else 0.0,
                **ids,
            }
        return out


def current() -> RequestTiming | None:
    """The timing of the request this task serves (the frontend binds one per request; the router adds to it)."""
    return _request.get()


@contextmanager
def routing(role: str) -> Iterator[None]:
    """The block waits for an instance of ``role`` with room: its time is the request's queue time (and a
    ``route`` span)."""
    rt = _request.get()
    started = time.perf_counter()
    with tracing.span("route", {"role": role}):
        try:
            yield
        finally:
            if rt is not None:
                rt.queue_s += time.perf_counter() - started
