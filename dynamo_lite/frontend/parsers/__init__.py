"""Output parsers: generated token ids → answer text, reasoning and tool calls, chosen per model card.

=================  ==================  ===========================================================
reasoning_parser   tool_call_parser    parser
=================  ==================  ===========================================================
gpt_oss            harmony (or "")     ``HarmonyOutput`` (gpt-oss; its channels hold both)
deepseek_r1/qwen3  hermes / ""         ``TaggedText``: ``<think>`` reasoning, ``<tool_call>`` calls
""                 ""                  ``PlainText``
=================  ==================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from tokenizers import Tokenizer

from dynamo_lite.frontend.detokenize import Detokenizer
from dynamo_lite.frontend.parsers.base import Delta, OutputParser, PlainText, ToolCallDelta
from dynamo_lite.frontend.parsers.harmony import HarmonyOutput
from dynamo_lite.frontend.parsers.text import HermesToolCalls, TaggedText, ThinkTags
from dynamo_lite.model_files import REASONING_PARSERS, TOOL_CALL_PARSERS

__all__ = ["Delta", "OutputParser", "ParserFactory", "ToolCallDelta", "is_harmony", "parser_factory"]


def is_harmony(reasoning_parser: str, tool_call_parser: str) -> bool:
    return reasoning_parser == "gpt_oss" or tool_call_parser == "harmony"


class ParserFactory(Protocol):
    def __call__(self, functions: frozenset[str] = ...) -> OutputParser:
        """A fresh parser for one request; ``functions``: the function names it declared (tool calls to
        any other name are never returned as calls)."""
        ...


def parser_factory(
    reasoning_parser: str,
    tool_call_parser: str,
    tokenizer: Tokenizer,
    new_detokenizer: Callable[[], Detokenizer],
) -> ParserFactory:
    """A function making a fresh parser per request for this model's parser names (see the table)."""
    for name, known in ((reasoning_parser, REASONING_PARSERS), (tool_call_parser, TOOL_CALL_PARSERS)):
        if name and name not in known:
            raise ValueError(f"unknown output parser {name!r}; known: {', '.join(known)}")
    if is_harmony(reasoning_parser, tool_call_parser):
        return lambda functions=frozenset(): HarmonyOutput(tokenizer, new_detokenizer, functions)
    if reasoning_parser or tool_call_parser:
        think_start = reasoning_parser == "deepseek_r1"
        return lambda functions=frozenset(): TaggedText(
            new_detokenizer(),
            ThinkTags(starts_in_reasoning=think_start) if reasoning_parser else None,
            HermesToolCalls(functions) if tool_call_parser == "hermes" else None,
        )
    return lambda functions=frozenset(): PlainText(new_detokenizer())
