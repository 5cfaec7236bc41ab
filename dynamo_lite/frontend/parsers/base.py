"""What an output parser turns generated token ids into: answer text, reasoning text and tool calls.

One parser per request, fed the ids of each chunk as they stream (``feed``), then ``flush``ed once at the end.
A parser never raises on odd model output: what it cannot place is shown as answer text.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Protocol

from dynamo_lite.frontend.detokenize import Detokenizer


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ToolCallDelta:
    """Part of tool call ``index``: its first delta carries ``id`` and ``name``, later ones more ``arguments``."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class Delta:
    """What one chunk of ids released, by kind."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def extend(self, other: Delta) -> Delta:
        self.content += other.content
        self.reasoning += other.reasoning
        if other.tool_calls:
            self.tool_calls.extend(other.tool_calls)
        return self


class OutputParser(Protocol):
    reasoning_tokens: int  # generated tokens that were reasoning (usage.completion_tokens_details)
    tool_calls: int  # tool calls found so far

    def feed(self, token_ids: list[int]) -> Delta: ...

    def flush(self) -> Delta:
        """The stream ended: whatever was held back."""
        ...


class PlainText:
    """No structure: every token is answer text (SmolLM2 and any model without parsers)."""

    __slots__ = ("_detok", "reasoning_tokens", "tool_calls")

    def __init__(self, detok: Detokenizer) -> None:
        self._detok = detok
        self.reasoning_tokens = 0
        self.tool_calls = 0

    def feed(self, token_ids: list[int]) -> Delta:
        return Delta(self._detok.step(token_ids))

    def flush(self) -> Delta:
        return Delta()


def held_prefix(text: str, tag: str) -> int:
    """Where ``text`` ends with a proper prefix of ``tag`` (len(text) if it doesn't): that tail is held back."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return len(text) - n
    return len(text)
