"""What the client records about one request: raw timestamps and counts; metrics derive from these."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestRecord:
    """One request. Times are ``time.perf_counter()`` seconds; metrics are computed after the run."""

    index: int
    input_tokens: int = 0  # synthetic prompt length the client built (its own tokenizer's count)
    max_tokens: int | None = None  # the output length requested
    scheduled: float | None = None  # open loop: when the arrival process wanted it sent
    start: float = 0.0  # just before the request bytes were written
    first_byte: float | None = None
    first_response: float | None = None  # first SSE event with a JSON payload (may carry no text)
    chunk_times: list[float] = field(default_factory=list)  # reads that carried output text
    chunk_texts: list[str] = field(default_factory=list)
    end: float = 0.0  # the read that completed the response body
    status: int = 0
    error_kind: str | None = None  # "http_500", "timeout", "connection_dropped", "stream_error", ...
    error: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None  # from the server's usage
    completion_tokens: int | None = None  # from the server's usage
    chunk_tokens: list[int] | None = None  # tokens per text chunk, by the client's tokenizer (after the run)
    done_marker: bool = False  # saw "data: [DONE]"
    events: int = 0  # SSE "data:" events received, [DONE] included

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    def fail(self, kind: str, detail: str) -> None:
        if self.error_kind is None:  # keep the first cause
            self.error_kind = kind
            self.error = detail

    # -- derived timings (seconds); None where not applicable -------------------------------------------
    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def output_tokens(self) -> int:
        """Output tokens: the server's usage when it sent one, else the client's own count."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        if self.chunk_tokens is not None:
            return sum(self.chunk_tokens)
        return len(self.chunk_times)

    @property
    def itl(self) -> float | None:
        """genai-perf's inter-token latency: (e2e latency - TTFT) / (output tokens - 1)."""
        ttft = self.ttft
        n = self.output_tokens
        if ttft is None or n < 2:
            return None
        return (self.latency - ttft) / (n - 1)

    @property
    def queue_delay(self) -> float | None:
        """Open loop: how late the request went out (timers may fire a bit early: that counts as 0)."""
        return None if self.scheduled is None else max(0.0, self.start - self.scheduled)

    @property
    def chunk_gaps(self) -> list[float]:
        times = self.chunk_times
        return [b - a for a, b in zip(times, times[1:], strict=False)]
