"""What a benchmark run is asked to do: one config object, with every default and limit in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson

EndpointType = Literal["chat", "completions"]

ENDPOINT_PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}

# genai-perf's SLO names, plus the short aliases people type.
GOODPUT_KEYS: dict[str, str] = {
    "ttft": "time_to_first_token",
    "time_to_first_token": "time_to_first_token",
    "itl": "inter_token_latency",
    "inter_token_latency": "inter_token_latency",
    "e2e": "request_latency",
    "request_latency": "request_latency",
}


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Time limits in seconds. ``request`` bounds a whole request, from sending to the last byte."""

    connect: float = 10.0
    request: float = 600.0


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits for what the client keeps."""

    max_connections: int = 4096  # open-loop mode opens connections as arrivals need them, up to this
    max_head_bytes: int = 64 * 1024  # HTTP status line + headers
    max_error_body_bytes: int = 4096  # kept from a non-2xx response body


@dataclass(slots=True)
class BenchmarkConfig:
    """One benchmark run (genai-perf's vocabulary). Build it directly or from the CLI.

    >>> cfg = BenchmarkConfig(url="http://127.0.0.1:8000", model="m", concurrency=8, request_count=100)
    """

    url: str = "http://127.0.0.1:8000"
    model: str = "SmolLM2-135M-Instruct"
    endpoint_type: EndpointType = "chat"
    endpoint: str | None = None  # path override, e.g. "/v1/chat/completions"
    streaming: bool = False  # genai-perf's default; --streaming turns it on
    # Load shape: closed loop at ``concurrency``, or Poisson arrivals at ``request_rate`` (open loop).
    concurrency: int = 1
    request_rate: float | None = None
    request_count: int | None = None  # measured requests; None: until measurement_seconds (or a default)
    warmup_request_count: int = 0
    measurement_seconds: float | None = None  # stop issuing new requests after this long
    # Synthetic data.
    tokenizer: str | None = None  # folder with tokenizer.json, or the file itself
    input_tokens_mean: int = 200
    input_tokens_stddev: float = 0.0
    output_tokens_mean: int | None = None  # None: don't send max_tokens
    output_tokens_stddev: float = 0.0
    chat_template_overhead: int | None = None  # tokens the server's chat template adds; None: measure it
    num_dataset_entries: int | None = None  # distinct prompts, cycled; None: one per request (up to 10k)
    random_seed: int = 0
    extra_inputs: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    # Observation.
    server_pids: list[int] = field(default_factory=list)
    goodput: dict[str, float] = field(default_factory=dict)  # genai-perf SLO name -> ms
    progress: bool = True
    artifact_dir: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.endpoint_type not in ENDPOINT_PATHS:
            raise ValueError(f"endpoint_type must be one of {sorted(ENDPOINT_PATHS)}")
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.request_rate is not None and self.request_rate <= 0:
            raise ValueError("request_rate must be > 0")
        self.goodput = {_goodput_key(k): float(v) for k, v in self.goodput.items()}

    @property
    def path(self) -> str:
        base = urlsplit(self.url).path.rstrip("/")
        return self.endpoint or base + ENDPOINT_PATHS[self.endpoint_type]

    @property
    def measured_count(self) -> int | None:
        """Requests to measure; None means "until measurement_seconds"."""
        if self.request_count is not None:
            return self.request_count
        if self.measurement_seconds is not None:
            return None
        return max(100, 4 * self.concurrency)

    def replace(self, **changes: Any) -> BenchmarkConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for reports; header values are redacted (they may hold credentials)."""
        out = dataclasses.asdict(self)
        out["headers"] = {k: "<redacted>" for k in self.headers}
        return out


def _goodput_key(key: str) -> str:
    try:
        return GOODPUT_KEYS[key.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown goodput SLO {key!r}; use one of {sorted(GOODPUT_KEYS)}") from None


def parse_extra_input(item: str) -> tuple[str, Any]:
    """``KEY:VALUE`` → (key, value); VALUE is JSON when it parses (``true``, ``64``, ``{...}``), else text."""
    key, sep, raw = item.partition(":")
    if not sep or not key:
        raise ValueError(f"--extra-inputs expects KEY:VALUE, got {item!r}")
    try:
        value: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = raw
    return key.strip(), value


def parse_goodput(spec: str) -> dict[str, float]:
    """``"ttft:300 itl:50"`` (spaces or commas) → {"time_to_first_token": 300.0, ...} in milliseconds."""
    out: dict[str, float] = {}
    for part in spec.replace(",", " ").split():
        key, sep, value = part.partition(":")
        if not sep:
            raise ValueError(f"goodput expects NAME:MS pairs, got {part!r}")
        out[_goodput_key(key)] = float(value)
    return out


def parse_header(item: str) -> tuple[str, str]:
    key, sep, value = item.partition(":")
    if not sep or not key.strip():
        raise ValueError(f"--header expects NAME:VALUE, got {item!r}")
    return key.strip(), value.strip()
