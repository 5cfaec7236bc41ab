"""Sends prepared requests over keep-alive connections and records each one; never raises per request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from time import perf_counter

from .config import BenchmarkConfig
from .http import ConnectionDropped, ConnectionPool, HttpConnection, HttpProtocolError, Origin
from .openai_api import BodyRecorder, StreamRecorder
from .records import RequestRecord


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request built before the run: its complete HTTP bytes and what it asks for."""

    data: bytes
    input_tokens: int
    max_tokens: int | None


class LoadClient:
    """The per-request path of the benchmark: acquire a connection, send, record, release."""

    def __init__(self, cfg: BenchmarkConfig) -> None:
        self.origin = Origin.from_url(cfg.url)
        self.pool = ConnectionPool(self.origin, cfg.timeouts, cfg.limits)
        self._chat = cfg.endpoint_type == "chat"
        self._stream = cfg.streaming
        self._timeout = cfg.timeouts.request

    async def send(self, req: PreparedRequest, index: int, scheduled: float | None = None) -> RequestRecord:
        """Send one request; failures (HTTP status, timeout, dropped connection) end up in the record."""
        rec = RequestRecord(index, req.input_tokens, req.max_tokens, scheduled)
        for attempt in range(2):
            try:
                conn = await self.pool.acquire()
            except (OSError, TimeoutError) as exc:
                rec.start = rec.end = perf_counter()
                rec.fail("connect_failed", repr(exc))
                return rec
            retry = await self._exchange(conn, req, rec, first_attempt=attempt == 0)
            if not retry:
                return rec
        return rec

    async def _exchange(
        self, conn: HttpConnection, req: PreparedRequest, rec: RequestRecord, first_attempt: bool
    ) -> bool:
        """One request/response on ``conn``; returns True when it should be retried on a fresh connection."""
        reused = conn.requests_sent > 0
        sink = StreamRecorder(rec, self._chat) if self._stream else BodyRecorder(rec, self._chat)
        rec.start = perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                result = await conn.request(req.data, sink)
        except TimeoutError:
            rec.end = perf_counter()
            conn.abort()
            rec.fail("timeout", f"no complete response within {self._timeout:g} s")
            return False
        except ConnectionDropped as exc:
            rec.end = perf_counter()
            if first_attempt and reused and not exc.got_bytes:
                # The server closed an idle keep-alive connection as we wrote: not this request's failure.
                return True
            rec.fail("connection_dropped", str(exc))
            return False
        except HttpProtocolError as exc:
            rec.end = perf_counter()
            rec.fail("protocol_error", str(exc))
            return False
        except OSError as exc:
            rec.end = perf_counter()
            conn.abort()
            rec.fail("connection_error", repr(exc))
            return False
        except BaseException:
            conn.abort()  # cancelled mid-request: the connection's state is unknown
            raise
        finally:
            self.pool.release(conn)
        rec.status = result.status
        rec.first_byte = result.first_byte
        rec.end = result.end
        if 200 <= result.status < 300:
            sink.finish()
        else:
            rec.fail(f"http_{result.status}", result.error_body.decode("utf-8", "replace"))
        return False

    def close(self) -> None:
        self.pool.close()
