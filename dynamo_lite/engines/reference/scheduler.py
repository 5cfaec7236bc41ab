"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every sequence is "tokens to feed" (``tokens[num_computed:]``): a fresh prompt, a prompt plus tokens produced
elsewhere (decode after a recompute), or the one last sampled token (decoding). A step takes one token from
every decoding sequence first, then fills the rest of its ``max_num_tokens`` budget with prompt chunks in
arrival order, so a long prompt is prefilled over several steps while the others keep decoding. When a
sequence's last pending token has been fed, the step samples its next token from that row's logits.

Sequences join (a free slot is enough) and leave (finished, cancelled) between any two steps. This module is
plain bookkeeping; the engine thread owns it (no locks) and runs the model.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from dynamo_lite.engines.base import TokenStream
from dynamo_lite.engines.reference.kv_cache import KvCache
from dynamo_lite.engines.reference.sampling import Sampler
from dynamo_lite.protocol import FinishReason, Phase, SamplingOptions, TokenLogprobs


class SeqState(enum.Enum):
    WAITING = 0  # queued for a slot
    RUNNING = 1  # holds a slot
    DONE = 2  # finished, failed or cancelled: holds nothing


@dataclass(eq=False, slots=True)
class Sequence:
    """One request inside the engine."""

    request_id: str
    phase: Phase
    tokens: list[int]  # prompt, then every generated token
    prompt_len: int
    sampling: SamplingOptions
    sampler: Sampler
    stream: TokenStream
    num_generated: int = 0  # generated tokens so far, those produced elsewhere (generated_ids) included
    slot: int = -1
    num_computed: int = 0  # positions of ``tokens`` whose K/V are in the slot
    state: SeqState = SeqState.WAITING
    pulled: Any = None  # a KvPulled to copy into the slot when it gets one (decode phase)
    cached_tokens: int = 0  # prompt tokens whose KV was imported, not computed
    transfer_id: str = ""  # prefill phase: the exporter hold of this sequence's KV
    delivered: bool = False  # prefill phase: the descriptor reached the consumer
    abandoned: bool = False  # the consumer is gone (set by the event loop; the engine thread checks it)
    grammar: Any = None  # a GrammarState when the request is guided (structured output)
    gate: Any = None  # a ReasoningGate when the request has a ReasoningSpec (budget; the answer's start)
    tools: Any = None  # a ToolArgsWatcher when the request has strict tools
    tool_args: Any = None  # the GrammarState of a strict tool's arguments being written
    arrival: float = field(default_factory=time.monotonic)
    prompt_scores: TokenLogprobs | None = None  # prompt logprobs so far (``SamplingOptions.prompt_logprobs``)

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.num_computed


@dataclass(slots=True)
class StepPlan:
    """What one step feeds: decode tokens, prefill chunks, and which sequences sample afterwards."""

    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (seq, start, length)
    sample: list[Sequence] = field(default_factory=list)  # in flat-row order of ``sample_rows``
    sample_rows: list[int] = field(default_factory=list)
    # Prompt positions whose logits score the next prompt token: (seq, first position, count), their rows
    # in ``score_rows`` (after ``sample_rows`` in the logits).
    score: list[tuple[Sequence, int, int]] = field(default_factory=list)
    score_rows: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(n for _, _, n in self.prefill)

    @property
    def sequences(self) -> list[Sequence]:
        return [*self.decode, *(s for s, _, _ in self.prefill)]


class Scheduler:
    """FCFS admission into cache slots and per-step token budgeting."""

    def __init__(self, cache: KvCache, max_num_tokens: int) -> None:
        self.cache = cache
        self.max_num_tokens = max_num_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.running) or (bool(self.waiting) and self.cache.free_slots > 0)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Give free slots to waiting sequences (oldest first); returns the newly admitted ones."""
        admitted = []
        while self.waiting and self.cache.free_slots > 0:
            seq = self.waiting.popleft()
            # A prompt scored for its logprobs is computed whole: cached positions have no logits.
            if seq.pulled is None and seq.num_computed == 0 and seq.sampling.prompt_logprobs is None:
                # Prefix caching: a slot that still holds this prompt's first blocks skips computing them.
                seq.slot, reused = self.cache.allocate_for(seq.tokens)
                if reused:
                    seq.num_computed = reused
                    seq.cached_tokens = min(reused, seq.prompt_len)
                    seq.stream.set_cached_tokens(seq.cached_tokens)
            else:
                seq.slot = self.cache.allocate()
            seq.state = SeqState.RUNNING
            seq.stream.admitted()
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out of the engine (finished or cancelled) and free its slot."""
        if seq.state is SeqState.RUNNING:
            self.running.remove(seq)
            self.cache.free(seq.slot, seq.tokens[: seq.num_computed])
            seq.slot = -1
        elif seq.state is SeqState.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.state = SeqState.DONE

    def plan(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_tokens
        for seq in sorted(self.running, key=lambda s: s.slot):
            if seq.pending == 1:
                plan.decode.append(seq)
        budget -= len(plan.decode)
        # Decode rows come first in the flat batch (ordered by slot, as build_step sorts them).
        plan.sample.extend(plan.decode)
        plan.sample_rows.extend(range(len(plan.decode)))
        row = len(plan.decode)
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if budget <= 0:
                break
            if seq.pending <= 1:
                continue
            n = min(seq.pending, budget)
            plan.prefill.append((seq, seq.num_computed, n))
            budget -= n
            if seq.sampling.prompt_logprobs is not None:
                # positions start.. predict tokens start+1..; the prompt's last position is the sampled row
                count = min(seq.num_computed + n, seq.prompt_len - 1) - seq.num_computed
                if count > 0:
                    plan.score.append((seq, seq.num_computed, count))
                    plan.score_rows.extend(range(row, row + count))
            row += n
            if n == seq.pending:
                plan.sample.append(seq)
                plan.sample_rows.append(row - 1)
        return plan

    @property
    def kv_tokens(self) -> int:
        return sum(s.num_computed for s in self.running)


def stop_reason(seq: Sequence, token: int, eos_ids: frozenset[int], max_seq_len: int) -> FinishReason | None:
    """Why ``seq`` ends after producing ``token`` (already appended and counted), or None to go on."""
    opts = seq.sampling
    if seq.num_generated >= opts.min_tokens:
        if token in opts.stop_token_ids:
            return FinishReason.STOP
        if token in eos_ids and not opts.ignore_eos:
            return FinishReason.STOP
    if seq.num_generated >= opts.max_tokens or len(seq.tokens) >= max_seq_len:
        return FinishReason.LENGTH
    return None


def suppressed_ids(seq: Sequence, eos_ids: frozenset[int]) -> list[int] | None:
    """Tokens ``seq`` may not produce next: its stop tokens while ``min_tokens`` is not reached."""
    opts = seq.sampling
    if seq.num_generated >= opts.min_tokens:
        return None
    ids = list(opts.stop_token_ids)
    if not opts.ignore_eos:
        ids.extend(eos_ids)
    return ids or None
