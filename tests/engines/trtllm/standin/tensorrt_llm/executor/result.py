"""STAND-IN (tests only): ``tensorrt_llm.executor.result``'s log-probability types, same shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias


@dataclass(slots=True)
class Logprob:
    """A token's log-probability and its rank in the vocabulary (1 = most likely)."""

    logprob: float
    rank: int | None = None


TokenLogprobs: TypeAlias = list[dict[int, Logprob]]
"""One ``{token_id: Logprob}`` per position (prompt or generated)."""
