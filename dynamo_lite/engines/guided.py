"""What every engine's grammar backend shares about a ``GuidedSpec`` (no heavy imports)."""

from __future__ import annotations

import re


def choice_regex(choices: list[str]) -> str:
    """A regex matching exactly one of ``choices``: how a choice constraint is compiled by engines whose grammar
    backend has no choice type of its own (xgrammar, TensorRT-LLM)."""
    return "(" + "|".join(re.escape(c) for c in choices) + ")"
