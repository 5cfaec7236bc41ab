"""``strict: true`` function tools: their call arguments constrained to their parameter schemas, for gpt-oss.

For each strict tool the request carries a ``ToolArgsGrammar``: the call's header as harmony writes it, in the
three forms gpt-oss uses (`` to=functions.NAME`` then ``<|channel|>``, `` to=functions.NAME <|constrain|>json``,
`` to=functions.NAME json``), and its schema; after the header's ``<|message|>`` the engine masks the arguments
to the schema (the torch engine, with xgrammar) until ``<|call|>``. Calls written otherwise (content type
``code``, other spellings) are not constrained. Other model families: not constrained.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from dynamo_lite.protocol import SamplingOptions, ToolArgsGrammar

if TYPE_CHECKING:
    from dynamo_lite.frontend.preprocess import ModelPreprocessor


def _strict(tools: list[dict[str, Any]] | None) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(fn, dict) and fn.get("strict") is True and isinstance(fn.get("name"), str):
            out.append((fn["name"], fn.get("parameters") or {"type": "object", "properties": {}}))
    return out


def apply(sampling: SamplingOptions, pre: ModelPreprocessor, tools: list[dict[str, Any]] | None) -> None:
    """Add the request's strict tools' grammars to ``sampling`` (gpt-oss only)."""
    strict = _strict(tools)
    if not strict or not pre.harmony:
        return
    from dynamo_lite.frontend.harmony import encoding
    from dynamo_lite.gpt_oss import vocab

    enc = encoding()
    grammars = []
    for name, schema in strict:
        header = f" to=functions.{name}"
        triggers = [
            enc.encode(header, allowed_special="all") + [vocab.CHANNEL],
            enc.encode(header + " ", allowed_special="all"),
            enc.encode(header + " json", allowed_special="all"),
        ]
        grammars.append(ToolArgsGrammar(triggers, vocab.MESSAGE, orjson.dumps(schema).decode()))
    sampling.tool_grammars = grammars
