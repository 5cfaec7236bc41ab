"""What the frontend does with every request field, in one table per endpoint.

Each top-level field of ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/responses`` (and each key of
``stream_options`` and ``nvext``) is one of:

- ``HONOURED``: an OpenAI field that takes effect (or, like ``user``, is an identifier with no effect by
  definition);
- ``EXTENSION``: not OpenAI's, sent by vLLM/Dynamo clients, genai-perf or aiperf, and honoured;
- ``ELSEWHERE``: handled by code outside this table (structured output, per-request timing), which decides;
- ``REFUSED``: not implemented: a request that gives it a value other than its no-op value (``n=1``,
  ``presence_penalty=0``, ``logprobs=false``) is answered 400 naming the field.

A ``HONOURED``/``EXTENSION`` field may take only some values (``tool_choice``): others are refused the same way.
A field not in the table is unknown: 400 naming it (as NVIDIA Dynamo answers), or, with
``FrontendSettings.allow_unknown_fields``, accepted and named in one warning line per request (as vLLM does).

To implement a refused field, flip its entry to ``HONOURED`` (``honoured()``) where the code that applies it
lands.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from dynamo_lite.frontend.errors import OpenAIError, bad_request


class Kind(enum.Enum):
    HONOURED = "honoured"
    EXTENSION = "extension"
    ELSEWHERE = "elsewhere"
    REFUSED = "refused"


def _any(value: Any) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class Field:
    """One field's policy: ``accepts(value)`` says whether a value is taken; others get ``reason`` as a 400.
    ``nested`` polices the keys of an object-valued field the same way."""

    kind: Kind
    reason: str = ""
    accepts: Callable[[Any], bool] = _any
    nested: Mapping[str, Field] | None = field(default=None)


def _same(value: Any, expected: Any) -> bool:
    if isinstance(value, bool) or isinstance(expected, bool):
        return value is expected
    return value == expected


def only(*values: Any) -> Callable[[Any], bool]:
    """A predicate: the value is null or one of ``values`` (``True`` is not ``1`` here)."""
    return lambda value: value is None or any(_same(value, v) for v in values)


def honoured(
    accepts: Callable[[Any], bool] = _any, reason: str = "", nested: Mapping[str, Field] | None = None
) -> Field:
    return Field(Kind.HONOURED, reason, accepts, nested)


def extension(
    accepts: Callable[[Any], bool] = _any, reason: str = "", nested: Mapping[str, Field] | None = None
) -> Field:
    return Field(Kind.EXTENSION, reason, accepts, nested)


def elsewhere(note: str) -> Field:
    return Field(Kind.ELSEWHERE, note)


def refused(reason: str, *noop: Any) -> Field:
    """Refused unless null or one of ``noop`` (values that ask for nothing)."""
    return Field(Kind.REFUSED, reason, only(*noop))


NOT_SUPPORTED = "is not supported"

_TOOL_CHOICE = honoured(
    only("auto", "none"),
    "tool_choice: only 'auto' and 'none' are supported (the model is not constrained to call a tool)",
)
_PARALLEL_TOOL_CALLS = honoured(
    only(True), "parallel_tool_calls=false is not supported: the model may call several tools"
)

STREAM_OPTIONS = {
    "include_usage": honoured(),  # a last chunk with the request's usage
    "continuous_usage_stats": extension(),  # vLLM's: usage (so far) in every chunk
}

NVEXT = {
    "ignore_eos": extension(),
    "min_tokens": extension(),
    "top_k": extension(),
    "greed_sampling": extension(),
    "guided_json": elsewhere("structured output"),
    "guided_regex": elsewhere("structured output"),
    "guided_grammar": elsewhere("structured output"),
    "guided_choice": elsewhere("structured output"),
    "guided_decoding_backend": elsewhere("structured output"),
    "guided_whitespace_pattern": elsewhere("structured output"),
    "extra_fields": elsewhere("per-request timing"),
    "max_thinking_tokens": elsewhere("the reasoning budget (frontend/reasoning.py)"),
}

# Fields every generating endpoint shares (its pydantic models' _GenerationParams).
_COMMON: dict[str, Field] = {
    "model": honoured(),
    "stream": honoured(),
    "stream_options": honoured(nested=STREAM_OPTIONS),
    "max_tokens": honoured(),
    "temperature": honoured(),
    "top_p": honoured(),
    "seed": honoured(),
    "stop": honoured(),
    "user": honoured(),  # an end-user identifier: no effect on the output by definition
    "n": honoured(),  # n choices (frontend/choices.py)
    "presence_penalty": honoured(),
    "frequency_penalty": honoured(),
    "logit_bias": honoured(),
    # vLLM / Dynamo / genai-perf / aiperf extensions
    "top_k": extension(),
    "min_tokens": extension(),
    "ignore_eos": extension(),
    "stop_token_ids": extension(),
    "nvext": extension(nested=NVEXT),
    # Dynamo flattens its structured-output fields to the top level too (CommonExt)
    "guided_json": elsewhere("structured output"),
    "guided_regex": elsewhere("structured output"),
    "guided_grammar": elsewhere("structured output"),
    "guided_choice": elsewhere("structured output"),
    "min_p": extension(),
    "thinking_token_budget": elsewhere("the reasoning budget (frontend/reasoning.py)"),
    "repetition_penalty": extension(),
    "include_stop_str_in_output": extension(),
    "skip_special_tokens": refused("skip_special_tokens=false is not supported", True),
    "use_beam_search": refused(f"use_beam_search {NOT_SUPPORTED}", False),
}

CHAT: dict[str, Field] = {
    **_COMMON,
    "messages": honoured(),
    "max_completion_tokens": honoured(),
    "tools": honoured(),
    "tool_choice": _TOOL_CHOICE,
    "parallel_tool_calls": _PARALLEL_TOOL_CALLS,
    "reasoning_effort": honoured(),
    "response_format": elsewhere("structured output"),
    "logprobs": honoured(),
    "top_logprobs": honoured(),
    "metadata": honoured(),  # tags for stored completions: no effect on the output
    "store": refused("store=true is not supported: completions are not stored", False),
    "service_tier": honoured(only("auto", "default"), "service_tier: only 'auto' and 'default' exist here"),
    "prompt_cache_key": honoured(),  # a routing hint: prefix caching is automatic here
    "safety_identifier": honoured(),  # an end-user identifier, like user
    "modalities": refused("only the text modality is supported", ["text"]),
    "audio": refused(f"audio output {NOT_SUPPORTED}"),
    "prediction": refused(f"predicted outputs are {NOT_SUPPORTED}"),
    "web_search_options": refused(f"web search {NOT_SUPPORTED}"),
    "verbosity": refused(f"verbosity {NOT_SUPPORTED}"),
    "functions": refused("functions is deprecated and not supported: use tools"),
    "function_call": refused("function_call is deprecated and not supported: use tool_choice"),
    # extensions
    "add_generation_prompt": extension(),
    "chat_template_kwargs": extension(),
    "chat_template_args": extension(),
    "echo": refused(f"echo {NOT_SUPPORTED}", False),
}

COMPLETIONS: dict[str, Field] = {
    **_COMMON,
    "prompt": honoured(),
    "response_format": elsewhere("structured output"),
    "logprobs": honoured(),
    "echo": honoured(),  # the prompt (and with logprobs, its logprobs) before the completion
    "best_of": refused("best_of must be 1", 1),
    "suffix": refused(f"suffix {NOT_SUPPORTED}", ""),
}

RESPONSES: dict[str, Field] = {
    **_COMMON,
    "n": refused("n must be 1 for responses", 1),
    "stream_options": honoured(
        nested={
            "include_usage": honoured(),  # response.completed carries the usage anyway
            "include_obfuscation": honoured(),  # no obfuscation padding is ever added
        }
    ),
    "input": honoured(),
    "instructions": honoured(),
    "tools": honoured(),
    "tool_choice": _TOOL_CHOICE,
    "parallel_tool_calls": _PARALLEL_TOOL_CALLS,
    "max_output_tokens": honoured(),
    "reasoning": honoured(),
    "store": honoured(),
    "previous_response_id": honoured(),
    "metadata": honoured(),
    "text": elsewhere("structured output"),
    "service_tier": CHAT["service_tier"],
    "prompt_cache_key": honoured(),
    "safety_identifier": honoured(),
    "truncation": honoured(only("disabled"), "truncation: only 'disabled' is supported"),
    "top_logprobs": refused(f"top_logprobs {NOT_SUPPORTED}", 0),
    "include": refused(f"include {NOT_SUPPORTED}", []),
    "background": refused(f"background responses are {NOT_SUPPORTED}", False),
    "max_tool_calls": refused(f"max_tool_calls {NOT_SUPPORTED}"),
    "prompt": refused(f"prompt templates are {NOT_SUPPORTED}"),
    "conversation": refused(f"conversations are {NOT_SUPPORTED}: use previous_response_id"),
}

TABLES: dict[str, Mapping[str, Field]] = {"chat": CHAT, "completions": COMPLETIONS, "responses": RESPONSES}


def _given(request: BaseModel | dict) -> dict[str, Any]:
    """The fields the client sent: declared ones it set, plus the extra ones pydantic kept."""
    if isinstance(request, dict):
        return request
    given = {name: getattr(request, name) for name in request.model_fields_set}
    if request.model_extra:
        given.update(request.model_extra)
    return given


def _check(given: dict[str, Any], table: Mapping[str, Field], prefix: str, unknown: list[str]) -> None:
    for name, value in given.items():
        param = prefix + name
        rule = table.get(name)
        if rule is None:
            unknown.append(param)
            continue
        if not rule.accepts(value):
            raise bad_request(rule.reason or f"{param} {NOT_SUPPORTED}", param=param)
        if rule.nested is not None and value is not None:
            _check(_given(value), rule.nested, param + ".", unknown)


def check_fields(endpoint: str, request: BaseModel) -> list[str]:
    """Refuse (400 naming the field) what ``request`` asks for and the frontend doesn't do; return the
    unknown fields' names (dotted inside ``stream_options``/``nvext``), in the order given."""
    unknown: list[str] = []
    _check(_given(request), TABLES[endpoint], "", unknown)
    return unknown


def unknown_fields_error(unknown: list[str]) -> OpenAIError:
    names = ", ".join(unknown)
    return bad_request(
        f"Unsupported parameter(s): {names}. Unknown fields are refused; start the frontend with "
        "--allow-unknown-fields to accept (and ignore) them.",
        param=unknown[0],
    )


def tools_for_prompt(tools: list | None, tool_choice: Any) -> list | None:
    """The tools the prompt shows the model: none with ``tool_choice="none"`` (it then answers in text)."""
    return None if tool_choice == "none" else tools
