"""Every knob of the HTTP frontend, with its default, in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from dynamo_lite.runtime.config import Timeouts


@dataclass(slots=True)
class FrontendSettings:
    """Limits and timeouts of the OpenAI-compatible frontend.

    >>> FrontendSettings(http_port=0, max_body_bytes=1 << 20)  # doctest: +ELLIPSIS
    FrontendSettings(http_host='127.0.0.1', http_port=0, ...)
    """

    http_host: str = "127.0.0.1"
    http_port: int = 8000
    # HTTP processes sharing the port (SO_REUSEPORT, the kernel spreads connections), each with its own router
    # view, etcd watch and NATS connection, under a supervisor that restarts them; 1: this process serves.
    workers: int = 1
    max_body_bytes: int = 10 * 1024 * 1024
    timeouts: Timeouts = field(default_factory=Timeouts)  # first token, request, keep-alive, shutdown
    backlog: int = 2048
    # Prompts longer than this (characters) are tokenized in a worker thread (tokenizers releases the GIL):
    # byte-level BPE costs ~0.5-1 us per character, and a long prompt must not stall every stream on the loop.
    tokenize_in_thread_chars: int = 2048
    completions_default_max_tokens: int = 16  # OpenAI's default for the legacy /v1/completions
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_choices: int = 16  # n above this is refused: each choice is a full request on the workers
    model_owner: str = "dynamo_lite"
    # Requests in flight (queued at the router included) beyond this are refused with 429 + Retry-After (0: no
    # bound), before their body is read. A bound on the frontend's memory, above the router's queue depth plus
    # what the workers take: the queue limit binds first, and it too refuses before the body is read once
    # every model's queue is full (``Backend.refusal``).
    max_inflight: int = 8192
    responses_store_size: int = 1024  # /v1/responses kept for previous_response_id (per frontend process)
    api_key: str = ""  # when set, /v1/* needs "Authorization: Bearer <key>" (401 otherwise)
    # Unknown request fields: 400 naming them (NVIDIA Dynamo's default), or accepted with a warning line.
    allow_unknown_fields: bool = False
    # Browser origins allowed by CORS ("*": any); none: no CORS headers, browsers refuse cross-origin calls.
    allowed_origins: tuple[str, ...] = ()
    tls_cert_path: str = ""  # both set: HTTPS (PEM certificate chain and private key)
    tls_key_path: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_path)
