"""Where a reasoning model's answer starts, followed token by token: the reasoning budget and the point from which
structured output constrains the output (``ReasoningSpec``). Plain Python, shared by every engine.

Phases of one sequence: ``before`` (waiting for ``start_ids``; skipped when there are none), ``reasoning``
(counted against the budget), ``answer`` (``answer_ids`` seen: the grammar applies from the next token), and
``other`` (reasoning ended some other way, e.g. a harmony tool call on ``commentary``: nothing counted, nothing
constrained, until ``answer_ids`` come). ``forced`` names the tokens the engine must write instead of sampling:
``open_ids`` first, and when the budget is all but spent, the rest of ``forced_ids`` that the output does not
already end with. The budget counts every token from the start of the reasoning to the end of what opens the
answer, the forced ones included (unless the format's own markers alone exceed it).

    gate = ReasoningGate(spec, prompt_ids)
    for each step:
        token = gate.forced or sample(masked by the grammar only if gate.in_answer)
        gate.advance(token)
"""

from __future__ import annotations

from dynamo_lite.protocol import ReasoningSpec

BEFORE, REASONING, ANSWER, OTHER = "before", "reasoning", "answer", "other"
# A chat template that opens the reasoning ends the prompt with it (maybe plus a newline or two).
_PROMPT_LOOKBACK = 4


class ReasoningGate:
    """One sequence's position relative to its reasoning (see the module docstring)."""

    __slots__ = ("spec", "_tail", "_keep", "_queue", "phase", "reasoning_tokens")

    def __init__(
        self, spec: ReasoningSpec, prompt: list[int], generated: list[int] | tuple[int, ...] = ()
    ) -> None:
        """``prompt``: the request's prompt ids (its end may have begun ``forced_ids``, e.g. harmony's
        ``<|end|><|start|>assistant``, or opened the reasoning); ``generated``: tokens this request already
        produced elsewhere (the prefill's first token)."""
        self.spec = spec
        lengths = [len(spec.answer_ids), len(spec.forced_ids), len(spec.start_ids), *map(len, spec.end_ids)]
        self._keep = max(lengths)
        self._tail = list(prompt[-self._keep :]) if self._keep else []
        self.phase = REASONING
        if spec.start_ids:
            recent = prompt[-(len(spec.start_ids) + _PROMPT_LOOKBACK) :]
            self.phase = REASONING if _find(recent, spec.start_ids) >= 0 else BEFORE
        self.reasoning_tokens = 0
        self._queue: list[int] = list(spec.open_ids)  # tokens still to force; the output starts with these
        for token in generated:
            self.advance(token)

    @property
    def in_answer(self) -> bool:
        """Whether the next token is part of the answer (the grammar applies)."""
        return self.phase == ANSWER and not self._queue

    @property
    def forced(self) -> int | None:
        """The token the engine must write next (the budget is spent), or None to sample."""
        if not self._queue and self.phase == REASONING and self.spec.budget >= 0:
            rest = self._rest_of_forced()
            if self.reasoning_tokens + len(rest) >= self.spec.budget:  # the closing tokens count too
                self._queue = rest
        return self._queue[0] if self._queue else None

    def _rest_of_forced(self) -> list[int]:
        forced = self.spec.forced_ids
        for n in range(min(len(forced), len(self._tail)), 0, -1):  # the output may have begun them already
            if self._tail[-n:] == forced[:n]:
                return forced[n:]
        return list(forced)

    def advance(self, token: int) -> None:
        """``token`` was written (sampled or forced)."""
        if self._queue and token == self._queue[0]:
            self._queue.pop(0)
        elif self._queue:
            self._queue.clear()  # not what was forced (a stop token won): force afresh if still due
        tail = self._tail
        tail.append(token)
        if len(tail) > self._keep:
            del tail[0]
        spec = self.spec
        if self.phase == REASONING:
            self.reasoning_tokens += 1
        if spec.answer_ids and _ends_with(tail, spec.answer_ids):
            self.phase = ANSWER
        elif self.phase == REASONING and any(_ends_with(tail, e) for e in spec.end_ids if e):
            self.phase = OTHER
        elif self.phase == BEFORE and _ends_with(tail, spec.start_ids):
            self.phase = REASONING


def _find(ids: list[int], sub: list[int]) -> int:
    for i in range(len(ids) - len(sub), -1, -1):
        if ids[i : i + len(sub)] == sub:
            return i
    return -1


def _ends_with(tail: list[int], ids: list[int]) -> bool:
    return len(tail) >= len(ids) and tail[len(tail) - len(ids) :] == ids


def answer_so_far(
    spec: ReasoningSpec, prompt: list[int], generated: list[int]
) -> tuple[ReasoningGate, list[int]]:
    """A gate past ``generated`` (tokens produced elsewhere, e.g. by the prefill worker), and those of them that
    were answer (to replay into the request's grammar)."""
    gate = ReasoningGate(spec, prompt)
    answer = []
    for token in generated:
        if gate.in_answer:
            answer.append(token)
        gate.advance(token)
    return gate, answer
