"""Server-sent events framing: bytes in, the ``data`` of each complete event out.

Only ``data:`` fields matter to a load client; ``event:``, ``id:``, ``retry:`` and comments are skipped.
Line ends may be LF, CRLF or CR (the SSE spec allows all three), split anywhere between reads.
"""

from __future__ import annotations


class SseParser:
    """Incremental SSE parser. ``feed(bytes)`` returns the data payloads of the events it completed."""

    __slots__ = ("_buf", "_pending_cr")

    def __init__(self) -> None:
        self._buf = b""
        self._pending_cr = False  # the last read ended in CR: it may be the first half of a CRLF

    def feed(self, data: bytes) -> list[bytes]:
        if (
            not self._buf
            and data.startswith(b"data: ")
            and data.find(b"\n") == len(data) - 2
            and data.endswith(b"\n\n")
            and not self._pending_cr
            and b"\r" not in data
        ):
            return [data[6:-2]]  # fast path: exactly one single-line event, as OpenAI servers send them
        if self._pending_cr:
            data = b"\r" + data
            self._pending_cr = False
        if b"\r" in data:
            if data.endswith(b"\r"):
                data = data[:-1]
                self._pending_cr = True
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf + data if self._buf else data
        events: list[bytes] = []
        pos = 0
        while True:
            end = buf.find(b"\n\n", pos)
            if end < 0:
                break
            block = buf[pos:end]
            pos = end + 2
            # Fast path: what every OpenAI-style server sends, one "data: ..." line per event.
            if block.startswith(b"data: ") and b"\n" not in block:
                events.append(block[6:])
                continue
            data_lines = []
            for line in block.split(b"\n"):
                if line.startswith(b"data:"):
                    value = line[5:]
                    data_lines.append(value[1:] if value.startswith(b" ") else value)
                elif line == b"data":
                    data_lines.append(b"")
            if data_lines:
                events.append(b"\n".join(data_lines))
        self._buf = buf[pos:] if pos else buf
        return events

    def end(self) -> list[bytes]:
        """At the end of the stream: the events a final CR or a missing blank line left undelivered."""
        if self._pending_cr or self._buf:
            return self.feed(b"\n")
        return []

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated by a blank line."""
        return self._buf
