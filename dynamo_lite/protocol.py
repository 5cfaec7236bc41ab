"""The shapes everything passes around: wire messages and the handful of interfaces.

Wire messages are msgspec Structs encoded as msgpack (``array_like`` keeps them compact). Every message that
crosses a process boundary is decoded with a typed decoder, so a malformed or oversized message is rejected at
the edge. Never pickle.

Interfaces here (each has several backends, each testable in-process):

- ``Discovery``      — where instances and model cards live: etcd (``runtime/discovery_etcd.py``), memory
  (``runtime/discovery_memory.py``)
- ``RequestPlane``   — how a request reaches an instance and its stream comes back: NATS
  (``runtime/request_plane_nats.py``), in-process (``runtime/request_plane_inproc.py``)

Elsewhere: ``Engine`` — what produces tokens (torch, mocker, trtllm) — in ``dynamo_lite/engines/base.py``; the
KV bytes move between workers in ``dynamo_lite/kv`` (shared memory, TCP, CUDA IPC, chosen by locality).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar, Protocol, TypeVar

import msgspec

WIRE_VERSION = 1
"""The wire version this code writes: the ``version`` field of every message sent on its own (requests,
discovery records, events). A reply stream (``Frame`` and the ``GenerateChunk``/``ErrorInfo`` it carries) is
written in its request's version. An optional field added at the end of a message, or a new enum value, is no
new version: a reader one version behind ignores the field and reads the value as ``UNRECOGNIZED``. Bump it
only for a change that reader would misread; it then refuses such messages (``WireVersionError``), and the
request fails as a server error (``IncompatibleWire``), never the client's."""
OLDEST_WIRE_VERSION = 1
"""The oldest version this code reads."""
MAX_WIRE_MESSAGE_BYTES = 8 * 1024 * 1024
"""Hard upper bound on any wire message we decode (requests carry token ids, never KV bytes)."""
MAX_LOGPROBS = 20
"""Most alternatives per token a request may ask for (OpenAI's top_logprobs bound, vLLM's default)."""


class WireIntEnum(enum.IntEnum):
    """An enum read off the wire: a value this version doesn't know (a newer peer's) decodes to its
    ``UNRECOGNIZED`` member instead of failing the whole message; each reader says what that case means."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        return cls.UNRECOGNIZED if isinstance(value, int) else None  # type: ignore[attr-defined]


class WireStrEnum(enum.StrEnum):
    """``WireIntEnum`` for string-valued enums."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        return cls.UNRECOGNIZED if isinstance(value, str) else None  # type: ignore[attr-defined]


class Phase(WireIntEnum):
    """What a worker is asked to do with a request (``UNRECOGNIZED``: the worker refuses it, 503)."""

    UNRECOGNIZED = -1
    AGGREGATED = 0  # prefill + decode on one worker
    PREFILL = 1  # context-only: compute the prompt's KV, return the first token and a KV descriptor
    DECODE = 2  # continue from a KV descriptor (or recompute) and stream the rest


class Role(WireStrEnum):
    """What a worker does (``--mode``), registered with its instance: which phases of a request it runs.
    Routers place nothing on an instance of a role they don't know (``UNRECOGNIZED``)."""

    UNRECOGNIZED = "unrecognized"
    PREFILL = "prefill"  # context-only runs: the prompt's KV and the first token
    DECODE = "decode"  # continues from a prefill's KV (or prefills locally)
    AGGREGATED = "agg"  # both, on one worker


class FinishReason(WireStrEnum):
    """Why a request ended, on the wire. A prefill that hands its KV over has not ended: its chunk carries
    ``kv`` and no finish reason. A reason the frontend doesn't know (``UNRECOGNIZED``) ends it as ``stop``."""

    UNRECOGNIZED = "unrecognized"
    STOP = "stop"  # eos or a stop token/string
    LENGTH = "length"  # max_tokens or context length
    CANCELLED = "cancelled"
    ERROR = "error"


class DisaggregationStrategy(WireStrEnum):
    """Who runs a disaggregated request's prefill handoff (a decode worker's ``--disaggregation-strategy``,
    registered with its instance). On the wire: the value, a plain string (``UNRECOGNIZED``: a newer peer's
    strategy; the router then treats the instance as prefill_first)."""

    UNRECOGNIZED = "unrecognized"
    PREFILL_FIRST = "prefill_first"  # the router: prefill worker first, then the decode worker
    DECODE_FIRST = "decode_first"  # the decode worker, asked first, runs the prefill on a prefill worker


class EngineKind(WireStrEnum):
    """Which engine holds a prefill's KV (``KvDescriptor.engine``): how a decode worker pulls or releases it.
    On the wire: the value, a plain string (``UNRECOGNIZED``: a KV no engine here can pull; it is recomputed)."""

    UNRECOGNIZED = "unrecognized"
    TORCH = "torch"
    MOCKER = "mocker"
    TRTLLM = "trtllm"
    LLAMACPP = "llamacpp"  # added after the golden fixtures: an older reader sees UNRECOGNIZED (recomputes)


class _Wire(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Base of every wire message: compact, typed, no cycles. Fields are positional and every one is written
    (``omit_defaults`` does not apply to arrays), so a new field only ever goes at the end, with a default: a
    reader one version behind ignores trailing fields it doesn't know, one ahead fills in the default for a
    field an older writer didn't send. (Releases before wire versions were read refused any extra field: a
    field added to a message they read waits until none of them is left in service.)

    A field added after the release that recorded the golden fixtures (``tests/runtime/golden``) is named in its
    class's ``APPENDED``: ``encode`` leaves such fields off the end while they hold their defaults, so a message
    that doesn't use them is, byte for byte, what that release wrote (and what every older reader reads)."""

    APPENDED: ClassVar[tuple[str, ...]] = ()


class GuidedKind(WireIntEnum):
    """Which grammar a guided (structured-output) request's tokens must follow (``UNRECOGNIZED``: the worker
    refuses the request, 503)."""

    UNRECOGNIZED = -1
    JSON_SCHEMA = 0  # ``value``: a JSON schema (JSON text)
    JSON_OBJECT = 1  # any JSON object (``response_format`` json_object)
    REGEX = 2  # ``value``: a regular expression the whole output matches
    CHOICE = 3  # ``choices``: the output is exactly one of them


class GuidedSpec(_Wire):
    """A structured-output constraint as the request stated it (the grammar's source, never compiled state):
    each engine compiles it with its own grammar backend. ``dynamo_lite.frontend.guided`` builds it."""

    kind: GuidedKind
    value: str = ""
    choices: list[str] = []


class ReasoningSpec(_Wire):
    """Where a reasoning model's answer starts in its output, for engines that act on it: the reasoning budget
    (after ``budget`` tokens of reasoning the engine writes ``forced_ids``, which close the reasoning and open the
    answer) and structured output, whose grammar applies only after ``answer_ids``. Token sequences of the
    model's format, built by the frontend (``dynamo_lite.frontend.reasoning``); engines follow them with
    ``dynamo_lite.engines.reasoning.ReasoningGate``."""

    budget: int = -1  # reasoning tokens allowed before the answer is forced open (-1: no limit)
    answer_ids: list[int] = []  # opens the answer (harmony ``<|channel|>final<|message|>``, ``</think>``)
    forced_ids: list[int] = []  # written when the budget is spent; ends with ``answer_ids``
    start_ids: list[int] = []  # reasoning starts after these (empty: with the first generated token)
    # other ways reasoning ends without an answer (harmony: a commentary message)
    end_ids: list[list[int]] = []
    open_ids: list[int] = []  # written first, before anything is generated: the reasoning's opening


class ToolArgsGrammar(_Wire):
    """A strict tool's arguments (``strict: true``): once the output has written one of ``triggers`` (the tool's
    call header, as token ids) and then ``open_id``, it follows ``schema`` (a JSON schema, as text) until a stop
    token. Built by ``dynamo_lite.frontend.strict_tools``; engines with a grammar backend follow it."""

    triggers: list[list[int]]
    open_id: int
    schema: str


class SamplingOptions(_Wire):
    """Per-request sampling and stop conditions, as the engines understand them."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = []
    guided: GuidedSpec | None = None  # structured output: the tokens follow this grammar
    # Log-probabilities of each generated token and of its ``logprobs`` most likely alternatives (None: none).
    logprobs: int | None = None
    # OpenAI/vLLM penalties: presence/frequency count generated tokens, repetition (multiplicative, as
    # transformers') prompt and generated ones; min_p is relative to the top token's probability.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] = {}
    # Log-probabilities of the prompt's tokens (from the second on) and their top alternatives (None: none).
    prompt_logprobs: int | None = None
    # -- appended after wire version 1's golden fixtures: written only when set (``_Wire``) --
    # Reasoning models: the budget and where the answer starts (structured output applies to the answer only).
    reasoning: ReasoningSpec | None = None
    # Strict tools: their call arguments follow their schemas.
    tool_grammars: list[ToolArgsGrammar] = []

    APPENDED: ClassVar[tuple[str, ...]] = ("reasoning", "tool_grammars")


class KvDescriptor(_Wire):
    """Metadata of a prompt's KV held by a prefill worker: where and what it is (never the bytes).

    ``opaque`` carries engine-specific state (TensorRT-LLM's disaggregated params) untouched.
    """

    transfer_id: str
    engine: EngineKind
    num_tokens: int
    nbytes: int
    secret: str = ""  # per-transfer token the KV server checks before sending bytes
    host: str = ""  # TCP endpoint of the prefill worker's KV server
    port: int = 0
    host_id: str = ""  # machine identity: equal host_id means shared memory is usable
    shm_name: str = ""
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    dtype: str = ""
    lease_s: float = 30.0
    opaque: bytes = b""
    # CUDA IPC (``dynamo_lite.kv.cuda_ipc``): the exporter's device pool and the hold's range in it, and the
    # GPU it lives on (uuid: indexes differ between processes with different CUDA_VISIBLE_DEVICES).
    cuda_ipc: bytes = b""
    device_index: int = -1
    gpu_uuid: str = ""
    # Engines whose KV a library holds (TensorRT-LLM): publish a ``KvRelease`` here when nobody will pull it.
    release_subject: str = ""
    # Sliding-window layers (gpt-oss): which layers attend to only the last ``window`` positions. Their KV holds
    # just that tail (``dynamo_lite.kv.layout.KvLayout``); empty: every layer holds every position.
    window: int = 0
    windowed_layers: list[int] = []


class KvRelease(_Wire):
    """Router or decode worker → prefill worker: nobody will pull this KV; free it now (best effort)."""

    transfer_id: str
    version: int = WIRE_VERSION


class GenerateRequest(_Wire):
    """Frontend (or decode worker) → worker: one generation request."""

    request_id: str
    model: str
    token_ids: list[int]
    sampling: SamplingOptions
    phase: Phase = Phase.AGGREGATED
    kv: KvDescriptor | None = None
    # Tokens already produced for this request (the prefill's first token, or a migrated stream's output);
    # the worker continues after them and counts them against max_tokens.
    generated_ids: list[int] = []
    # decode_first: the decode worker runs the prefill on a prefill worker itself
    remote_prefill: bool = False
    version: int = WIRE_VERSION

    def unrecognized(self) -> str | None:
        """The first field whose value this version doesn't know (a newer writer's), or None."""
        if self.phase is Phase.UNRECOGNIZED:
            return "phase"
        if self.sampling.guided is not None and self.sampling.guided.kind is GuidedKind.UNRECOGNIZED:
            return "sampling.guided.kind"
        return None


class WorkerTiming(_Wire):
    """What a worker measured of one request, on its first chunk (``nvext.timing``, ``dynamo_lite.timing``)."""

    instance_id: str
    first_chunk_ms: float = 0.0  # request received → its first chunk sent (prefill: queue + compute)
    engine_queue_ms: float = 0.0  # of that, waiting in the engine's queue for a batch slot
    kv_transfer_ms: float = 0.0  # the KV pulled from the prefill worker (decode side)
    kv_bytes: int = 0
    kv_transport: str = ""  # "tcp" | "shm" | "cuda_ipc" | "staged" | ...


class TokenLogprobs(_Wire):
    """Log-probabilities of a chunk's tokens (``SamplingOptions.logprobs``), one entry per token: the chosen
    token's, and the ids and log-probabilities of the most likely alternatives (most likely first)."""

    logprobs: list[float] = []
    top_ids: list[list[int]] = []
    top_logprobs: list[list[float]] = []

    def extend(self, other: TokenLogprobs) -> None:
        self.logprobs.extend(other.logprobs)
        self.top_ids.extend(other.top_ids)
        self.top_logprobs.extend(other.top_logprobs)


class GenerateChunk(_Wire):
    """Worker → frontend: new token ids since the last chunk (several when coalesced)."""

    token_ids: list[int] = []
    finish_reason: FinishReason | None = None
    kv: KvDescriptor | None = None  # set on a prefill result that hands its KV over (then no finish_reason)
    cached_tokens: int = 0  # prompt tokens served from a prefix cache (an engine may count imported KV; the
    # router reports only what no worker computed for this request)
    timing: WorkerTiming | None = None  # on a worker's first chunk
    logprobs: TokenLogprobs | None = None  # of ``token_ids``, when the request asked for them
    prompt_logprobs: TokenLogprobs | None = None  # of the prompt's tokens from the second on (first chunk)


class LoadReport(_Wire):
    """Worker → routers, periodically: how busy an instance is. Routers drop reports older than a TTL."""

    instance_id: str
    active_seqs: int = 0
    queued: int = 0
    kv_usage: float = 0.0  # fraction of the KV cache in use
    inflight: int = 0  # requests the worker is handling (all phases)
    max_batch_size: int = 0
    version: int = WIRE_VERSION


class KvEventKind(WireIntEnum):
    UNRECOGNIZED = -1  # routers ignore the event
    STORED = 0  # blocks now cached on the instance
    REMOVED = 1  # blocks evicted
    CLEARED = 2  # everything gone (restart, reset)


class KvEvent(_Wire):
    """Engine → routers: changes of an instance's prefix cache, as chained block hashes."""

    instance_id: str
    kind: KvEventKind
    block_hashes: list[int] = []
    version: int = WIRE_VERSION


class ErrorInfo(_Wire):
    """A failure carried on a stream: ``status`` follows HTTP semantics (400, 429, 503, 500...)."""

    status: int
    message: str
    code: str = "internal_error"


class FrameKind(WireIntEnum):
    """What a reply-stream frame is. A newer sender's kind (``UNRECOGNIZED``) is skipped: new kinds may only
    ever add information."""

    UNRECOGNIZED = -1
    DATA = 0
    END = 1
    ERROR = 2
    ACK = 3  # "request received", outside the seq numbering (NATS delivers at most once); any frame also says it
    BUSY = 4  # "refused, at capacity": sent instead of ACK; the request was not accepted and nothing ran


class Frame(_Wire):
    """One message of a reply stream. ``seq`` lets the receiver detect loss or reordering."""

    seq: int
    kind: FrameKind
    payload: bytes = b""


class InstanceInfo(_Wire):
    """What discovery stores per live instance (under the instance's lease)."""

    instance_id: str
    namespace: str
    role: Role
    endpoint: str
    address: str  # request-plane address (NATS subject or in-process name)
    model: str
    host: str = ""
    metrics_port: int = 0
    disaggregation_strategy: DisaggregationStrategy = DisaggregationStrategy.PREFILL_FIRST
    version: int = WIRE_VERSION
    # Requests the instance takes at once (its worker's max_inflight; 0: unbounded). After ``version`` so that
    # records written without it still decode.
    max_inflight: int = 0


class CardFile(_Wire):
    """One model file published with a card (``dynamo_lite.runtime.card_files``), addressed by its hash."""

    name: str  # file name in the model folder: "tokenizer.json", ...
    sha256: str
    size: int


class ModelCard(_Wire):
    """What the frontend needs to preprocess for a served model."""

    served_name: str
    model_path: str
    tokenizer_path: str  # a tokenizer.json the frontend can read
    chat_template: str = ""
    context_length: int = 4096
    role: Role = Role.AGGREGATED
    eos_token_ids: list[int] = []
    bos_token: str = ""
    eos_token: str = ""
    vocab_size: int = 0
    model_type: str = ""  # config.json's model_type ("llama", "gpt_oss", ...)
    # Output parsing the frontend applies (``dynamo_lite.frontend.parsers``): "" = plain text. gpt-oss models
    # get "gpt_oss" / "harmony" by default; other families by the worker's --reasoning-parser/--tool-call-parser.
    reasoning_parser: str = ""
    tool_call_parser: str = ""
    version: int = WIRE_VERSION
    # The model folder's files a frontend reads, published in discovery: a frontend host needs no model folder.
    files: list[CardFile] = []


class WireError(ValueError):
    """A wire message was malformed, of the wrong type, or too large."""


class WireVersionError(WireError):
    """A wire message of a version this reader can't read: its writer made a change this version would
    misread. Never the client's fault: a request failing with it is answered 503 (``IncompatibleWire``)."""


_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, tuple[msgspec.msgpack.Decoder, int | None]] = {}


def encode(msg: msgspec.Struct) -> bytes:
    if type(msg) is GenerateRequest:  # the one message that carries ``APPENDED`` fields (its sampling's)
        sampling = _trimmed(msg.sampling)
        if sampling is not msg.sampling:
            fields = list(msgspec.structs.astuple(msg))  # the same array, its sampling written shorter
            fields[_SAMPLING_INDEX] = sampling
            return _encoder.encode(fields)
    return _encoder.encode(msg)


def _trimmed(msg: _Wire) -> Any:
    """``msg`` as the wire writes it: itself, or, when its last ``APPENDED`` fields hold their defaults, the
    tuple of its fields without them (encoded as the same array, shorter)."""
    values = msgspec.structs.astuple(msg)  # one C call: this runs for every request sent
    end = len(values)
    for default in _trailing_defaults(type(msg)):
        if values[end - 1] != default:
            break
        end -= 1
    return msg if end == len(values) else values[:end]


_SAMPLING_INDEX = GenerateRequest.__struct_fields__.index("sampling")
_trailing: dict[type, tuple[Any, ...]] = {}


def _trailing_defaults(kind: type) -> tuple[Any, ...]:
    """The defaults of ``kind``'s ``APPENDED`` fields that end its field list, the last field's first."""
    found = _trailing.get(kind)
    if found is None:
        defaults = []
        names = kind.__struct_fields__
        end = len(names)
        for name in reversed(kind.APPENDED):  # type: ignore[attr-defined]
            if names[end - 1] != name:
                break
            info = next(f for f in msgspec.structs.fields(kind) if f.name == name)
            defaults.append(info.default if info.default is not msgspec.NODEFAULT else info.default_factory())
            end -= 1
        found = _trailing[kind] = tuple(defaults)
    return found


T = TypeVar("T")


def decode(data: bytes, kind: type[T]) -> T:
    """Decode ``data`` as ``kind``; raises ``WireError`` on anything unexpected, ``WireVersionError`` for a
    message of a version outside ``OLDEST_WIRE_VERSION..WIRE_VERSION``."""
    if len(data) > MAX_WIRE_MESSAGE_BYTES:
        raise WireError(f"{kind.__name__}: message of {len(data)} bytes exceeds {MAX_WIRE_MESSAGE_BYTES}")
    entry = _decoders.get(kind)
    if entry is None:
        fields = getattr(kind, "__struct_fields__", ())
        entry = _decoders[kind] = (
            msgspec.msgpack.Decoder(kind),
            fields.index("version") if "version" in fields else None,
        )
    dec, version_at = entry
    try:
        msg = dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        if version_at is not None:  # a newer layout may fail to decode: say so if its version is newer
            _check_version(kind, _peek_version(data, version_at))
        raise WireError(f"{kind.__name__}: {e}") from e
    if version_at is not None:
        _check_version(kind, msg.version)  # type: ignore[attr-defined]
    return msg


def _check_version(kind: type, version: object) -> None:
    if isinstance(version, int) and not OLDEST_WIRE_VERSION <= version <= WIRE_VERSION:
        raise WireVersionError(
            f"{kind.__name__} of wire version {version}; this process reads versions "
            f"{OLDEST_WIRE_VERSION}..{WIRE_VERSION} (upgrade it)"
        )


def _peek_version(data: bytes, index: int) -> object:
    try:
        fields = msgspec.msgpack.decode(data)
    except msgspec.DecodeError:
        return None
    return fields[index] if isinstance(fields, list) and len(fields) > index else None


# ---------------------------------------------------------------------------------------------------------------
# Interfaces
# ---------------------------------------------------------------------------------------------------------------


class StreamError(Exception):
    """A reply stream ended with an error: ``info`` says what, with an HTTP status.

    The request plane's own failures are the subclasses below; anything else a handler raised arrives as a
    plain ``StreamError`` with the handler's status and code. ``retryable``: the failure was the instance's or
    the plane's, not the request's, so the request may be sent again to another instance.
    """

    retryable: ClassVar[bool] = False

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(f"{info.status} {info.code}: {info.message}")
        self.info = info

    @property
    def plane_failed(self) -> bool:
        """The request plane failed (NATS went down), not the instance: it is as good a choice as before."""
        return self.info.code == PLANE_DOWN

    @staticmethod
    def from_info(info: ErrorInfo) -> StreamError:
        """The error an ``ErrorInfo`` received on a stream stands for (typed by its code)."""
        kind = _ERRORS_BY_CODE.get(info.code, StreamError)
        error = kind.__new__(kind)
        StreamError.__init__(error, info)
        return error


class InstanceUnavailable(StreamError):
    """The request never reached a serving instance: nobody serves the address, the request was lost on the way
    (NATS delivers at most once), or the request plane is down. Nothing ran: retryable."""

    retryable = True

    def __init__(self, message: str, code: str = "instance_unavailable") -> None:
        super().__init__(ErrorInfo(503, message, code))


PLANE_DOWN = "request_plane_down"
"""The code of failures of the request plane itself, not of an instance (``StreamError.plane_failed``)."""


class RequestPlaneDown(InstanceUnavailable):
    """The request plane itself failed to take a message (NATS disconnected past its buffer, closed, or not
    answering a flush): nothing was sent. Retryable once the plane is back."""

    def __init__(self, message: str) -> None:
        super().__init__(message, PLANE_DOWN)


class InstanceLost(StreamError):
    """The instance went away mid-request without ending the stream: it fell silent (no heartbeat), frames went
    missing, or the caller lost its connection to the plane. Part of the answer may have been sent: retryable
    by continuing elsewhere (migration), never by replaying what the client has."""

    retryable = True

    def __init__(self, message: str, code: str = "instance_lost", status: int = 503) -> None:
        super().__init__(ErrorInfo(status, message, code))


class IncompatibleWire(StreamError):
    """Two of our processes could not understand each other: a request or reply of a wire version, or with a
    value, the reader doesn't know (a rolling upgrade across a breaking change), or an unreadable message. A
    server error (503), never the client's; another instance (already upgraded, or not yet) may serve the
    request: retryable."""

    retryable = True

    def __init__(self, message: str) -> None:
        super().__init__(ErrorInfo(503, message, "wire_incompatible"))


class RequestTimedOut(StreamError):
    """No first payload within the caller's ``first_timeout`` (504); the instance is alive (else
    ``InstanceLost``) and is told to cancel. Not retryable: another instance would be no faster."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorInfo(504, message, "timeout"))


class RequestCancelled(StreamError):
    """The instance ended the request unfinished: it stopped serving past its drain time (503). Not retryable:
    its operator took it out of service on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorInfo(503, message, "instance_stopped"))


class InstanceBusy(StreamError):
    """The instance refused the request before accepting it: it is at capacity (``FrameKind.BUSY``).

    Nothing ran, so the caller may place the request on another instance or wait until this one has room;
    never a client error."""

    retryable = True

    def __init__(self, address: str) -> None:
        super().__init__(ErrorInfo(503, f"instance {address} is at capacity", "instance_busy"))


class Overloaded(StreamError):
    """No instance had room for the request within the frontend's queue limits (depth or wait): answered before
    any byte, as 429 (queue full) or 503 (waited too long), with ``Retry-After: retry_after_s``."""

    def __init__(self, info: ErrorInfo, retry_after_s: int) -> None:
        super().__init__(info)
        self.retry_after_s = retry_after_s


# Failures an instance reports on a stream (an ERROR frame carries only ``ErrorInfo``) keep their type.
_ERRORS_BY_CODE: dict[str, type[StreamError]] = {
    "instance_unavailable": InstanceUnavailable,
    "instance_lost": InstanceLost,
    "frame_lost": InstanceLost,
    PLANE_DOWN: InstanceLost,
    # The worker's engine failed for good (a torch engine rank died): the instance is going away, so its streams
    # migrate as for an instance that fell silent, only sooner.
    "engine_failed": InstanceLost,
    "timeout": RequestTimedOut,
    "instance_stopped": RequestCancelled,
    "wire_incompatible": IncompatibleWire,
}


Handler = Callable[[bytes], AsyncIterator[bytes]]
"""A served endpoint: takes the request payload, yields reply payloads. Raising ``StreamError`` sends an error
frame; being cancelled (the caller went away) must free everything the request holds."""


class Served(Protocol):
    """One address being served (``RequestPlane.serve``)."""

    @property
    def inflight(self) -> int:
        """Requests accepted and not yet ended."""
        ...

    async def stop(self, drain_s: float = 0.0) -> None:
        """Take no new requests (callers get ``InstanceUnavailable``), let those in flight finish for up to
        ``drain_s``, then cancel the rest: their callers get ``RequestCancelled`` at once."""
        ...

    async def kill(self) -> None:
        """Go away at once, saying nothing: what a crashed process looks like to its callers, whose open
        streams fail with ``InstanceLost``."""
        ...


class RequestPlane(Protocol):
    """Point-to-point streaming RPC to one instance address: the contract every plane keeps.

    - **Accept or refuse, at once.** An instance acknowledges a request as it takes it (``on_ack`` sees it; over
      NATS a first frame within ``Timeouts.ack_delay_s`` is the acknowledgement, else an ACK then), or refuses
      it for capacity (``InstanceBusy``, nothing ran). A request that reaches no serving instance
      fails fast with ``InstanceUnavailable``, never by a timeout.
    - **Ordered, complete streams.** Payloads arrive in the order the handler yielded them; the stream ends
      when the handler returns, or with the ``StreamError`` it raised (its status and code kept).
    - **Liveness, not patience.** A stream whose instance goes away without ending it fails with
      ``InstanceLost`` (over NATS within the heartbeat timeout), however long the request may take.
    - **A first answer in time.** Without a first payload within ``first_timeout`` the stream fails with
      ``RequestTimedOut`` and the instance is told to cancel.
    - **Cancellation flows down.** Closing the iterator early, or cancelling the task consuming it, cancels the
      handler (it sees ``CancelledError`` and frees what the request holds).
    - **Stopping.** ``Served.stop`` drains, then ends what is left with ``RequestCancelled``.
    - **Typed failures.** The plane's own failures are ``StreamError``s too: ``RequestPlaneDown`` (503,
      retryable) when it can't take a message (``stream``, ``subscribe``, ``serve``, ``publish``).

    ``StreamError.retryable`` says which failures may be sent again to another instance.
    ``tests/runtime/test_request_plane.py`` runs this contract against every plane.
    """

    on_ack: Callable[[str, float], None] | None
    """Observer of acknowledgements: ``(address, seconds from sending to acknowledged)`` (metrics)."""

    on_reachable: list[Callable[[], None]]
    """Called when addresses may have become reachable again (the plane reconnected, an instance was heard
    from again): callers holding requests for them (the router's admission queue) try again."""

    def reachable(self, address: str) -> bool:
        """Whether a request sent to ``address`` now can reach it: the plane is connected and, just after a
        reconnect, the instance has been heard from again (or has had time to be)."""
        ...

    async def serve(
        self,
        address: str,
        handler: Handler,
        *,
        max_inflight: int | None = None,
        on_refused: Callable[[], None] | None = None,
    ) -> Served:
        """Serve ``address`` with ``handler``. With ``max_inflight``, a request arriving while that many are in
        flight is refused before it is accepted: its caller gets ``InstanceBusy`` (``on_refused`` is called)."""
        ...

    def stream(self, address: str, payload: bytes, *, first_timeout: float | None) -> AsyncIterator[bytes]:
        """Send ``payload`` to ``address`` and iterate its reply payloads (``first_timeout`` None: no bound on
        the first one; the instance's liveness still holds). Raises ``StreamError`` as the contract says."""
        ...

    async def publish(self, subject: str, payload: bytes) -> None:
        """Fire-and-forget event (load reports, KV cache events): delivered to current subscribers; one sent
        while the plane is disconnected may be dropped (events are periodic or best effort)."""
        ...

    async def subscribe(self, prefix: str, callback: EventCallback) -> Subscription:
        """Call ``callback(subject, payload)`` for every event whose subject starts with ``prefix``."""
        ...

    async def close(self) -> None: ...


EventCallback = Callable[[str, bytes], None]


class Subscription(Protocol):
    async def unsubscribe(self) -> None: ...


class DiscoveryEvent(msgspec.Struct, frozen=True):
    key: str
    value: bytes | None  # None: deleted (or its lease expired)
    revision: int = 0  # store revision of this change; lets a watcher drop stale events after a re-list


class Discovery(Protocol):
    """A key-value view with leases: everything a process writes lives under its own lease."""

    async def put(self, key: str, value: bytes) -> None: ...

    async def put_shared(self, key: str, value: bytes) -> None:
        """Write a key that outlives this process (no lease): content shared by several processes."""
        ...

    async def delete(self, key: str) -> None: ...

    async def get_prefix(self, prefix: str) -> list[DiscoveryEvent]: ...

    def watch_prefix(self, prefix: str) -> AsyncIterator[DiscoveryEvent]:
        """Changes under ``prefix`` from now on; raises ``ConnectionError`` if the watch breaks."""
        ...

    async def delete_prefix(self, prefix: str) -> int: ...

    async def close(self) -> None: ...
