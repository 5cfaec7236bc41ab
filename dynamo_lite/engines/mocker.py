"""The mocker: an engine that simulates timing, not math — for scale and overhead tests without a model.

Continuous batching on the event loop: each step admits waiting requests (prefill time ∝ prompt tokens), then
advances every active sequence by one token (step time grows with batch size and KV held). ``speedup_ratio``
divides all simulated time; 0 removes it (pure framework overhead). Token ids are deterministic, inside the
tokenizer's vocab, and never eos or a stop id (generation ends at max_tokens). Its KV descriptor names the byte
size a real model of this config would move, but carries no bytes.

A script (engine arg ``script``: a YAML/JSON file or an inline list of ``{match: TEXT, answer: TEXT}``) makes it
play a fixed answer for prompts whose text contains ``match``: ``answer`` is encoded with the model's tokenizer,
special tokens included (e.g. a harmony ``<|channel|>analysis<|message|>…<|return|>``), and played token by
token across prefill and decode like generated output. It ends at its last token (or earlier at a stop id).
A reasoning budget (``SamplingOptions.reasoning``) is honoured as engines do: past it the forced tokens are
played, then the script resumes at its answer. Structured output is accepted only for a scripted answer that
follows the grammar (checked with xgrammar, the answer part only for a reasoning model); else 400 (no script) or
500 (a script that breaks it). A scripted call to a strict tool is checked against the tool's schema likewise.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dynamo_lite.engines.base import EngineError, EngineSettings, EngineStats, StreamPacing, TokenStream
from dynamo_lite.engines.reasoning import ReasoningGate
from dynamo_lite.engines.tool_args import ToolArgsWatcher
from dynamo_lite.kv.blocks import KvEventSink, PrefixCacheIndex, block_hashes
from dynamo_lite.model_files import ModelFiles, resolve_model
from dynamo_lite.protocol import (
    EngineKind,
    FinishReason,
    GenerateChunk,
    GenerateRequest,
    GuidedKind,
    GuidedSpec,
    KvDescriptor,
    Phase,
    TokenLogprobs,
    ToolArgsGrammar,
)
from dynamo_lite.timing import note_kv_transfer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class MockerTiming:
    """Simulated cost model (seconds), before ``speedup_ratio``."""

    prefill_base_s: float = 0.002
    prefill_per_token_s: float = 0.00005
    decode_base_s: float = 0.008
    decode_per_seq_s: float = 0.0002
    decode_per_kv_token_s: float = 0.0000005
    kv_transfer_gbps: float = 0.0  # 0: KV transfer takes no simulated time

    @classmethod
    def from_extra(cls, extra: dict, source: str) -> MockerTiming:
        timing = cls()
        for key, value in extra.items():
            if key in cls.__dataclass_fields__:
                if not isinstance(value, int | float):
                    raise ValueError(f"{source}: {key} must be a number, got {value!r}")
                setattr(timing, key, float(value))
        return timing


@dataclass(slots=True)
class ScriptedAnswer:
    match: str  # played for prompts whose text (special tokens included) contains this
    token_ids: list[int]


def load_script(spec: str | list, tokenizer_json: Path) -> list[ScriptedAnswer]:
    """Scripted answers from ``spec`` (a YAML/JSON file, or the list itself), encoded with the tokenizer."""
    from tokenizers import Tokenizer

    entries = yaml.safe_load(Path(spec).read_text()) if isinstance(spec, str) else spec
    if not isinstance(entries, list):
        raise ValueError(f"mocker script {spec!r}: expected a list of {{match, answer}} entries")
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("match"), str):
            raise ValueError(f"mocker script entry {entry!r}: needs a 'match' string")
        ids = entry.get("answer_ids")
        if ids is None:
            ids = tokenizer.encode(str(entry.get("answer", "")), add_special_tokens=False).ids
        out.append(ScriptedAnswer(entry["match"], [int(i) for i in ids]))
    return out


class _Seq:
    __slots__ = (
        "request",
        "stream",
        "generated",
        "target",
        "kv_tokens",
        "cancelled",
        "salt",
        "script",
        "stops",
        "gate",
        "cursor",
        "forcing",
    )

    def __init__(self, request: GenerateRequest, stream: TokenStream, script: list[int] | None) -> None:
        self.request = request
        self.stream = stream
        self.generated = 0
        self.target = request.sampling.max_tokens
        self.kv_tokens = len(request.token_ids)
        self.cancelled = False
        self.salt = (sum(request.token_ids[:64]) * 2654435761 + len(request.token_ids)) & 0xFFFFFFFF
        self.script = script
        self.stops = frozenset(request.sampling.stop_token_ids)
        spec = request.sampling.reasoning
        # A reasoning budget: forced tokens replace the script's, which then resumes at its answer.
        self.gate = ReasoningGate(spec, request.token_ids) if spec is not None else None
        self.cursor = 0  # the script's next token
        self.forcing = False  # the token being emitted was forced
        for token in request.generated_ids:  # what the prefill worker played, replayed
            self.forcing = self.gate is not None and self.gate.forced == token
            self.advance(token)

    def advance(self, token: int) -> None:
        """``token`` was emitted."""
        self.generated += 1
        self.kv_tokens += 1
        script = self.script
        if not self.forcing or (
            script is not None and self.cursor < len(script) and script[self.cursor] == token
        ):
            self.cursor += 1  # played, or forced as the script has it anyway
        if self.gate is not None:
            self.gate.advance(token)
            if self.forcing and self.gate.in_answer and self.script is not None:
                self.cursor = answer_start(self.script, self.gate) or len(self.script)

    @property
    def script_done(self) -> bool:
        return self.script is not None and self.cursor >= len(self.script)

    def stopped_by(self, token: int) -> bool:
        return token in self.stops and self.generated >= self.request.sampling.min_tokens


_MOCKER_KEYS = {
    "max_batch_size",
    "max_num_tokens",
    "max_seq_len",
    "speedup_ratio",
    "vocab_size",
    "enable_prefix_caching",
    "num_cache_blocks",
    "script",
    *MockerTiming.__dataclass_fields__,
}


class MockerEngine:
    name = EngineKind.MOCKER

    def __init__(self, settings: EngineSettings, model_files: ModelFiles) -> None:
        for key in settings.extra:
            if key not in _MOCKER_KEYS:
                log.warning(
                    "%s: unknown mocker engine arg %r ignored", settings.extra_source or "engine args", key
                )
        self.settings = settings
        self.model_files = model_files
        self.pacing = StreamPacing()  # the worker adapts it to the load
        self.timing = MockerTiming.from_extra(settings.extra, settings.extra_source or "engine args")
        self.speedup = float(settings.extra.get("speedup_ratio", settings.speedup_ratio))
        self.max_batch = int(settings.extra.get("max_batch_size", settings.max_batch_size))
        cfg = model_files.config
        self.vocab = int(settings.extra.get("vocab_size", cfg.get("vocab_size") or 32000))
        heads = int(cfg.get("num_attention_heads") or 8)
        self.layers = int(cfg.get("num_hidden_layers") or 16)
        self.kv_heads = int(cfg.get("num_key_value_heads") or heads)
        self.head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size") or 512) // heads)
        self._eos = set(model_files.eos_token_ids)
        script = settings.extra.get("script")
        self.script = load_script(script, model_files.tokenizer_json) if script else []
        self._tokenizer = None  # decodes prompts to match the script (loaded with the script)
        self._grammars: Any = None  # checks scripted answers of guided requests (loaded on the first)
        if self.script:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(model_files.tokenizer_json))
        self._waiting: deque[_Seq] = deque()
        self._active: list[_Seq] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._stats = EngineStats()
        # Prefix caching, simulated: prefill time is charged only for prompt blocks not already cached.
        self.block_size = max(1, settings.kv_block_size)
        self.cache_blocks = int(settings.extra.get("num_cache_blocks", 65536))
        self.prefix_cache = (
            PrefixCacheIndex(self.cache_blocks) if settings.extra.get("enable_prefix_caching", True) else None
        )

    @property
    def on_kv_event(self) -> KvEventSink | None:
        return self.prefix_cache.sink if self.prefix_cache else None

    @on_kv_event.setter
    def on_kv_event(self, sink: KvEventSink | None) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.sink = sink

    def _uncached_prompt_tokens(self, seq: _Seq) -> int:
        """Prompt tokens this sequence must compute; stores its blocks in the simulated prefix cache."""
        n = len(seq.request.token_ids)
        if self.prefix_cache is None:
            return n
        hashes = block_hashes(seq.request.token_ids, self.block_size)
        cached = self.prefix_cache.cached_prefix(hashes) * self.block_size
        self.prefix_cache.store(hashes)
        if cached:
            seq.stream.set_cached_tokens(cached)
        return n - cached

    def kv_bytes(self, tokens: int) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * 2 * tokens  # bf16

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="mocker-engine")

    async def stop(self) -> None:
        self._stopped = True
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # Whoever still reads a stream gets an error, not a hang: nothing will ever advance it again.
        for seq in [*self._waiting, *self._active]:
            seq.stream.fail(EngineError("engine stopped", 503, "engine_stopped"))
        self._waiting.clear()
        self._active.clear()

    def stats(self) -> EngineStats:
        s = self._stats
        s.active_seqs, s.queued = len(self._active), len(self._waiting)
        capacity = self.cache_blocks * self.block_size
        s.kv_total_blocks = self.cache_blocks
        s.kv_usage = min(1.0, sum(q.kv_tokens for q in self._active) / capacity) if capacity else 0.0
        return s

    def _token(self, seq: _Seq) -> int:
        forced = seq.gate.forced if seq.gate is not None else None
        seq.forcing = forced is not None
        if forced is not None:
            return forced
        if seq.script is not None:
            return seq.script[seq.cursor]
        # Deterministic, in vocab, clear of the low special ids, eos and the request's stop ids.
        span = max(self.vocab - 256, 1)
        tok = 256 + (seq.salt + seq.generated * 40503) % span
        while tok in self._eos or tok in seq.stops:
            tok = 256 + (tok - 255) % span
        return tok

    def _logprobs(self, token: int, k: int) -> TokenLogprobs:
        """Made-up but well-formed: the chosen token has probability 1/2, then ids after it e^-1.5, e^-2.5...
        (most likely first, the total below 1)."""
        ids = [token, *((token + i) % self.vocab for i in range(1, k))][:k]
        return TokenLogprobs(
            [-math.log(2.0)], [ids], [[-math.log(2.0), *(-0.5 - i for i in range(1, k))][:k]]
        )

    def _scripted(self, request: GenerateRequest) -> list[int] | None:
        if not self.script or self._tokenizer is None:
            return None
        prompt = self._tokenizer.decode(request.token_ids, skip_special_tokens=False)
        for entry in self.script:
            if entry.match in prompt:
                return entry.token_ids
        return None

    async def _sleep(self, seconds: float) -> None:
        if self.speedup > 0 and seconds > 0:
            await asyncio.sleep(seconds / self.speedup)
        else:
            await asyncio.sleep(0)  # one step per loop turn: requests still join and leave a running batch

    async def _loop(self) -> None:
        while True:
            if not self._waiting and not self._active:
                self._wake.clear()
                await self._wake.wait()
            admitted: list[_Seq] = []
            while self._waiting and len(self._active) + len(admitted) < self.max_batch:
                seq = self._waiting.popleft()
                if not seq.cancelled:
                    seq.stream.admitted()
                    admitted.append(seq)
            t = self.timing
            step_s = 0.0
            if admitted:
                self._active.extend(admitted)  # before the prefill time, so that stop() sees them too
                prompt = sum(self._uncached_prompt_tokens(s) for s in admitted if s.request.kv is None)
                step_s = t.prefill_base_s + prompt * t.prefill_per_token_s
            if not self._active:
                continue
            kv = sum(s.kv_tokens for s in self._active)
            # The prefill and the decode step after it, slept as one: the same simulated time, and at zero time
            # one loop turn per step, not two (a prefill worker's first token comes a turn sooner).
            step_s += t.decode_base_s + len(self._active) * t.decode_per_seq_s + kv * t.decode_per_kv_token_s
            await self._sleep(step_s)
            still: list[_Seq] = []
            for seq in self._active:
                if seq.cancelled:
                    continue
                self._emit(seq)
                if seq.generated < seq.target:
                    still.append(seq)
            self._active = still
            self._stats.last_batch_size = len(still) or self._stats.last_batch_size

    def _emit(self, seq: _Seq) -> None:
        """One token for ``seq``; in prefill phase that token ends the request with a KV descriptor."""
        tok = self._token(seq)
        seq.advance(tok)
        self._stats.total_tokens += 1
        k = seq.request.sampling.logprobs
        seq.stream.push(tok, None if k is None else self._logprobs(tok, k))
        stopped = seq.stopped_by(tok) or seq.script_done
        if seq.request.phase == Phase.PREFILL:
            seq.target = seq.generated  # context-only: one token
            if stopped:
                seq.stream.finish(FinishReason.STOP)
            elif seq.request.sampling.max_tokens <= 1:
                seq.stream.finish(FinishReason.LENGTH)
            else:
                n = len(seq.request.token_ids)
                desc = KvDescriptor(
                    transfer_id=uuid.uuid4().hex,
                    engine=EngineKind.MOCKER,
                    num_tokens=n,
                    nbytes=self.kv_bytes(n),
                    num_layers=self.layers,
                    num_kv_heads=self.kv_heads,
                    head_dim=self.head_dim,
                    dtype="bfloat16",
                    lease_s=self.settings.kv_lease_s,
                )
                seq.stream.finish(None, kv=desc)
        elif stopped:
            seq.target = seq.generated
            seq.stream.finish(FinishReason.STOP)
        elif seq.generated >= seq.target:
            seq.stream.finish(FinishReason.LENGTH)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        if self._stopped:
            raise EngineError("engine stopped", 503, "engine_stopped")
        if request.sampling.max_tokens < 1:
            raise EngineError("max_tokens must be at least 1", 400, "invalid_request")
        script = self._scripted(request)
        if request.sampling.guided is not None:
            # It simulates timing, not tokens: it can only check that its scripted answer follows the grammar.
            if script is None:
                raise EngineError(
                    "structured output needs a scripted answer on the mocker engine", 400, "invalid_request"
                )
            await self._check_script(request, script)
        elif request.sampling.tool_grammars and script is not None:
            await self._check_script(request, script)  # strict tools: the script's calls follow their schemas
        if (
            len(request.token_ids) + request.sampling.max_tokens
            > int(self.settings.extra.get("max_seq_len", self.settings.max_seq_len))
            and self.settings.max_seq_len > 0
        ):
            raise EngineError("prompt + max_tokens exceeds the engine's max_seq_len", 400, "context_length")
        cached = 0
        if request.phase == Phase.DECODE and request.kv is not None:
            cached = request.kv.num_tokens
            pull_started = time.perf_counter()
            if self.timing.kv_transfer_gbps > 0:
                await self._sleep(request.kv.nbytes / (self.timing.kv_transfer_gbps * 1e9))
            note_kv_transfer(time.perf_counter() - pull_started, request.kv.nbytes, "mocker")
            self._stats.kv_transfers += 1
            self._stats.kv_transfer_bytes += request.kv.nbytes
        seq = _Seq(request, TokenStream(asyncio.get_running_loop(), self.pacing), script)
        if cached:
            seq.stream.set_cached_tokens(cached)
        if seq.generated >= seq.target or seq.script_done:
            reason = FinishReason.STOP if seq.script_done else FinishReason.LENGTH
            yield GenerateChunk(finish_reason=reason, cached_tokens=cached)
            return
        self._waiting.append(seq)
        self._wake.set()
        try:
            async for chunk in seq.stream:
                yield chunk
        finally:
            seq.cancelled = True

    async def _check_script(self, request: GenerateRequest, script: list[int]) -> None:
        if self._grammars is None:
            from dynamo_lite.engines.scripted_grammar import ScriptedAnswerCheck

            eos = sorted(self._eos)
            if not eos:
                raise EngineError(
                    "structured output needs the model's eos ids on the mocker", 400, "invalid_request"
                )
            self._grammars = ScriptedAnswerCheck(self.model_files.tokenizer_json, self.vocab, eos)
        opts = request.sampling
        stop_ids = sorted({*opts.stop_token_ids, *self._eos})
        checks: list[tuple[str, GuidedSpec, list[int]]] = []
        if opts.guided is not None:
            answer = script
            if opts.reasoning is not None:
                start = answer_start(script, ReasoningGate(opts.reasoning, request.token_ids))
                answer = script[start:] if start is not None else []
            checks.append(("answer", opts.guided, answer))
        for grammar, arguments in tool_arguments(script, opts.tool_grammars, stop_ids):
            checks.append(
                ("arguments of a strict tool", GuidedSpec(GuidedKind.JSON_SCHEMA, grammar.schema), arguments)
            )
        for what, spec, tokens in checks:
            problem = await asyncio.to_thread(self._grammars.problem, spec, tokens, stop_ids)
            if problem:
                raise EngineError(f"the mocker's scripted {what} {problem}", 500, "scripted_answer_invalid")


def tool_arguments(
    script: list[int], grammars: list[ToolArgsGrammar], stop_ids: list[int]
) -> list[tuple[ToolArgsGrammar, list[int]]]:
    """The strict tools' calls in ``script``: each tool's grammar and its arguments' tokens (up to and with the
    stop token that ends them)."""
    if not grammars:
        return []
    watcher, out = ToolArgsWatcher(grammars), []
    current: tuple[ToolArgsGrammar, list[int]] | None = None
    for token in script:
        if current is not None:
            current[1].append(token)
            if token in stop_ids:
                out.append(current)
                current = None
            continue
        opened = watcher.advance(token)
        if opened is not None:
            current = (opened, [])
    if current is not None:
        out.append(current)
    return out


def answer_start(script: list[int], gate: ReasoningGate) -> int | None:
    """Where ``script``'s answer starts (after the spec's ``answer_ids``), replayed through a copy of ``gate``'s
    spec; None when it never opens one."""
    probe = ReasoningGate(gate.spec, [])
    for i, token in enumerate(script):
        probe.advance(token)
        if probe.in_answer:
            return i + 1
    return None


def build_engine(settings: EngineSettings) -> MockerEngine:
    return MockerEngine(settings, resolve_model(settings.model_path))
