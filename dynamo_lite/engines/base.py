"""The engine interface and the token stream every engine hands back.

An engine takes a ``GenerateRequest`` and yields ``GenerateChunk``s. Engines compute off the event loop (a
thread or a device); they push tokens into a ``TokenStream`` from any thread, and the consumer takes *all* tokens
that arrived since its last read in one chunk — that coalescing is what keeps per-token cost low downstream.
Closing the generator (the caller went away) must free the request's batch slot and KV: engines do that in a
``finally``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from dynamo_lite.kv.blocks import KV_BLOCK_SIZE, KvEventSink
from dynamo_lite.kv.config import KvTransferConfig
from dynamo_lite.protocol import (
    EngineKind,
    FinishReason,
    GenerateChunk,
    GenerateRequest,
    KvDescriptor,
    Role,
    TokenLogprobs,
)
from dynamo_lite.timing import note_engine_start

if TYPE_CHECKING:
    from dynamo_lite.model_files import ModelFiles


@dataclass(slots=True)
class EngineStats:
    """A snapshot for metrics and load reports."""

    active_seqs: int = 0
    queued: int = 0
    kv_bytes_held: int = 0  # KV kept for transfer (prefill side), not yet pulled
    kv_usage: float = 0.0  # fraction of the engine's KV capacity in use
    kv_total_blocks: int = 0  # KV blocks the engine has (0: not known)
    last_batch_size: int = 0
    total_tokens: int = 0
    kv_transfers: int = 0
    kv_transfer_bytes: int = 0
    kv_transfer_seconds: float = 0.0
    kv_recomputes: int = 0


class Engine(Protocol):
    """What a worker runs. Besides the four methods, the worker reads and sets three attributes."""

    name: EngineKind
    model_files: ModelFiles  # tokenizer, chat template, config: the worker publishes them with its model card
    pacing: StreamPacing  # how long a token stream waits between chunks; the worker adapts it to the load
    on_kv_event: (
        KvEventSink | None
    )  # prefix-cache changes for the kv router, set by the worker (None: nobody)

    async def start(self) -> None: ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]: ...

    def stats(self) -> EngineStats: ...

    async def stop(self) -> None: ...


@runtime_checkable
class HoldsKvForDecode(Protocol):
    """An engine whose prompt KV a library holds for decode workers (TensorRT-LLM) and frees only when told:
    ``KvRelease`` messages on ``kv_release_subject`` reach ``release_kv``; ``on_kv_unused`` tells another
    prefill worker that KV it holds will not be pulled (this decode recomputes instead). The worker wires both.
    """

    kv_release_subject: str
    on_kv_unused: Callable[[KvDescriptor], None] | None

    def release_kv(self, transfer_id: str) -> bool: ...


class EngineError(Exception):
    """A request the engine refuses (``status`` 400) or cannot serve now (503)."""

    def __init__(self, message: str, status: int = 500, code: str = "engine_error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class StreamPacing:
    """How long a request's token stream waits between chunks, shared by all of an engine's streams.

    The worker raises ``interval_s`` above its base when many streams are active, so that the messages per
    second it sends stay bounded (a frontend reads every one): under load, chunks carry more tokens instead of
    piling up as messages nobody can read in time.

    ``per_token``: every token travels alone, whatever the load (no interval, and tokens produced between two
    wake-ups of a stream's reader go out as one chunk each): the stream a client sees is exactly per token.
    """

    __slots__ = ("interval_s", "base_s", "per_token")

    def __init__(self, base_s: float = 0.0, per_token: bool = False) -> None:
        self.per_token = per_token
        self.base_s = 0.0 if per_token else base_s
        self.interval_s = self.base_s

    def adapt(self, active_streams: int, max_messages_per_s: float) -> None:
        if self.per_token:
            return
        self.interval_s = max(self.base_s, active_streams / max_messages_per_s if max_messages_per_s else 0.0)


class EngineUnavailable(RuntimeError):
    """The engine's library is not installed here; the message is one line saying what to install."""


class TokenStream:
    """Thread-safe producer/consumer of one request's output.

    The producer (engine thread) calls ``push``/``finish``/``fail``; the consumer (event loop) iterates and gets
    one ``GenerateChunk`` per wake-up carrying every token produced meanwhile.
    """

    __slots__ = (
        "_loop",
        "_loop_thread",
        "_lock",
        "_tokens",
        "_finish",
        "_kv",
        "_error",
        "_event",
        "_scheduled",
        "_cached",
        "_done",
        "_pacing",
        "_last_yield",
        "_created",
        "_admitted",
        "_logprobs",
        "_prompt_logprobs",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, pacing: StreamPacing | None = None) -> None:
        self._loop = loop
        # Like TensorRT-LLM's stream_interval: after a chunk goes out, the next one waits ``pacing.interval_s``
        # so that tokens produced meanwhile travel together (fewer NATS messages and SSE events per token).
        # The first token and the final chunk are never held back.
        self._pacing = pacing
        self._last_yield = 0.0
        self._loop_thread = threading.get_ident()  # created on the loop's thread
        self._lock = threading.Lock()
        self._tokens: list[int] = []
        self._finish: FinishReason | None = None
        self._kv: KvDescriptor | None = None
        self._error: BaseException | None = None
        self._event = asyncio.Event()
        self._scheduled = False
        self._cached = 0
        self._done = False
        self._created = time.perf_counter()
        self._admitted = 0.0  # when the engine took the request into its batch (0: not told)
        self._logprobs: TokenLogprobs | None = None  # of ``_tokens``, when the engine pushes them
        self._prompt_logprobs: TokenLogprobs | None = None  # goes out once, with the next chunk

    def admitted(self) -> None:
        """The engine took the request from its queue into its batch (the request's timing and trace say how
        long it waited)."""
        self._admitted = time.perf_counter()

    def _wake(self) -> None:
        # Called with the lock held: schedule at most one wake-up per batch of pushes.
        if not self._scheduled:
            self._scheduled = True
            if threading.get_ident() == self._loop_thread:
                self._event.set()  # an engine running on the loop itself (the mocker): no self-pipe wake-up
            else:
                self._loop.call_soon_threadsafe(self._event.set)

    def push(self, token_ids: list[int] | int, logprobs: TokenLogprobs | None = None) -> None:
        with self._lock:
            if isinstance(token_ids, int):
                self._tokens.append(token_ids)
            else:
                self._tokens.extend(token_ids)
            if logprobs is not None:
                if self._logprobs is None:
                    self._logprobs = TokenLogprobs()
                self._logprobs.extend(logprobs)
            self._wake()

    def set_prompt_logprobs(self, logprobs: TokenLogprobs) -> None:
        """The prompt's log-probabilities, sent with the next chunk (before the first token's is pushed)."""
        with self._lock:
            self._prompt_logprobs = logprobs

    def finish(
        self, reason: FinishReason | None, kv: KvDescriptor | None = None, cached_tokens: int | None = None
    ) -> None:
        """End the stream. A prefill that hands over to a decode worker ends with ``reason=None`` and ``kv``."""
        with self._lock:
            self._finish = reason
            self._done = True
            self._kv = kv
            if cached_tokens is not None:
                self._cached = cached_tokens
            self._wake()

    def fail(self, error: BaseException) -> None:
        with self._lock:
            self._error = error
            self._wake()

    def set_cached_tokens(self, n: int) -> None:
        with self._lock:
            self._cached = n

    async def __aiter__(self) -> AsyncIterator[GenerateChunk]:
        first = True
        while True:
            await self._event.wait()
            interval = self._pacing.interval_s if self._pacing is not None else 0.0
            if interval and not self._done:
                wait = self._last_yield + interval - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            with self._lock:
                self._event.clear()
                self._scheduled = False
                tokens, self._tokens = self._tokens, []
                logprobs, self._logprobs = self._logprobs, None
                prompt_logprobs, self._prompt_logprobs = self._prompt_logprobs, None
                finish, kv, error, cached, done = (
                    self._finish,
                    self._kv,
                    self._error,
                    self._cached,
                    self._done,
                )
            if error is not None:
                raise error
            if tokens or done:
                if self._pacing is not None:
                    self._last_yield = self._loop.time()
                if first:
                    first = False
                    note_engine_start(self._created, self._admitted)
                if len(tokens) > 1 and self._pacing is not None and self._pacing.per_token:
                    for i in range(len(tokens) - 1):  # all but the last alone; the last carries the end
                        yield GenerateChunk(
                            token_ids=tokens[i : i + 1],
                            cached_tokens=cached,
                            logprobs=_one_token(logprobs, i),
                            prompt_logprobs=prompt_logprobs if i == 0 else None,
                        )
                    prompt_logprobs, logprobs = None, _one_token(logprobs, len(tokens) - 1)
                    tokens = tokens[-1:]
                yield GenerateChunk(
                    token_ids=tokens,
                    finish_reason=finish,
                    kv=kv if done else None,
                    cached_tokens=cached,
                    logprobs=logprobs,
                    prompt_logprobs=prompt_logprobs,
                )
            if done:
                return


def _one_token(logprobs: TokenLogprobs | None, i: int) -> TokenLogprobs | None:
    if logprobs is None:
        return None
    return TokenLogprobs(
        logprobs.logprobs[i : i + 1], logprobs.top_ids[i : i + 1], logprobs.top_logprobs[i : i + 1]
    )


DTYPES = ("auto", "float32", "bfloat16", "float16")  # the --dtype choices of every CLI
QUANTIZATIONS = ("auto", "none", "int8", "int4", "mxfp4")  # the --quantization choices


_KV = KvTransferConfig()  # the KV transfer's defaults (lease), which the engine flags show


@dataclass(slots=True)
class EngineSettings:
    """Everything an engine is built from: worker flags, then ``--extra-engine-args`` YAML merged on top
    (``extra`` holds the merged YAML mapping; each engine validates the keys it knows)."""

    role: Role = Role.AGGREGATED
    model_path: str | None = None  # None: the built-in default (SmolLM2)
    served_model_name: str = ""
    dtype: str = "auto"  # one of DTYPES; torch engine: "auto" is what the device computes natively
    # torch engine: "int8" | "int4" weight-only linears (CPU); "mxfp4": gpt-oss experts kept as the checkpoint's
    # MXFP4; "auto": the checkpoint's own precision where a kernel for it runs here (CPU with dtype auto: a 4-bit
    # GGUF's int4; CUDA: MXFP4 gpt-oss experts), else "none"
    quantization: str = "auto"
    device: str = "cpu"
    threads: int = 0  # 0: leave the library default
    # torch engine on CPU: threads of a prefill step while no other engine of the process has work (0: threads)
    alone_threads: int = 0
    max_batch_size: int = 16
    max_num_tokens: int = 512  # prefill tokens per engine step (chunked prefill bound)
    max_seq_len: int = 4096
    kv_block_size: int = KV_BLOCK_SIZE
    free_gpu_memory_fraction: float = 0.8
    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1
    enable_attention_dp: bool = False  # attention split by sequences across the ranks (not by heads)
    kv_failure_policy: str = "recompute"  # "recompute" | "fail"
    kv_bind_host: str = "127.0.0.1"
    kv_advertise_host: str = ""  # empty: kv_bind_host
    kv_port: int = 0  # 0: any free port
    kv_lease_s: float = _KV.lease_s  # unpulled KV is held this long
    speedup_ratio: float = 1.0  # mocker: engine time divided by this; 0 = no engine time at all
    shared_weights: str = (
        ""  # torch engine: a weights holder's socket to map the weights from ("": load them)
    )
    extra: dict = field(default_factory=dict)
    extra_source: str = ""  # file the extra args came from, for error messages
    # Fields set by a command-line flag (the worker CLI fills this; None: every field counts as given). The
    # TensorRT-LLM engine passes only these, so an omitted flag means TensorRT-LLM's own default, as in Dynamo.
    explicit: frozenset[str] | None = None

    def given(self, name: str) -> bool:
        """Whether field ``name`` was set on purpose (a flag), not left at its default."""
        return self.explicit is None or name in self.explicit
