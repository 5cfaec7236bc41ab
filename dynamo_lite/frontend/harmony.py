"""gpt-oss's prompt format: an OpenAI conversation rendered to token ids by the official ``openai-harmony``.

The conversation becomes harmony messages the way gpt-oss's own chat template lays them out:

- a system message: model identity, knowledge cutoff, the current date and the reasoning effort;
- a developer message: the request's system and developer texts as ``# Instructions`` and its function
  ``tools`` as the ``functions`` namespace (only when there is either);
- user turns; assistant turns as an ``analysis`` message (reasoning, kept only for the current tool-calling
  turn: ``current_turn_start``), a ``final`` message (content; an empty one too when there are no calls) and
  ``commentary`` messages to ``functions.NAME`` (tool calls); tool results as messages from ``functions.NAME``
  to the assistant — the name found through ``tool_call_id``;
- a function without parameters as ``() => any``, as gpt-oss was trained.

``openai-harmony`` renders the result. Anything it could not render faithfully is a ``HarmonyRequestError``
(a 400 naming the field). The encoding loads the bundled o200k_base vocabulary (``dynamo_lite.gpt_oss.vocab``),
never a network.
"""

from __future__ import annotations

import functools
import json
from datetime import date
from typing import Any

from dynamo_lite.gpt_oss import vocab

REASONING_EFFORTS = ("low", "medium", "high")


class HarmonyRequestError(ValueError):
    """The request cannot be rendered as harmony; ``param`` names the offending field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@functools.cache
def encoding() -> Any:
    """``openai-harmony``'s ``HARMONY_GPT_OSS`` encoding (loaded once; the vocabulary from this package)."""
    vocab.use_bundled_vocab()
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def stop_token_ids() -> list[int]:
    """What ends an assistant turn: ``<|return|>`` (answer) and ``<|call|>`` (tool call)."""
    return sorted(encoding().stop_tokens_for_assistant_actions())  # a set: sorted for a stable request


def _text(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            text = part.get("text") if isinstance(part, dict) else None
            if not isinstance(text, str):
                raise HarmonyRequestError("only text content parts are supported", param)
            parts.append(text)
        return "\n".join(parts)
    raise HarmonyRequestError("content must be a string or a list of text parts", param)


def _function_tools(tools: list[dict[str, Any]] | None) -> list[Any]:
    from openai_harmony import ToolDescription

    out = []
    for i, tool in enumerate(tools or []):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise HarmonyRequestError("only tools of type 'function' are supported", param)
        fn = tool.get("function", tool)  # chat nests the function; the Responses API does not
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise HarmonyRequestError("a tool needs a function name", f"{param}.function.name")
        schema = fn.get("parameters")
        if schema is not None and (not isinstance(schema, dict) or schema.get("type", "object") != "object"):
            raise HarmonyRequestError(
                "a tool's parameters must be a JSON schema of type 'object'", f"{param}.function.parameters"
            )
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise HarmonyRequestError(
                "a tool's description must be a string", f"{param}.function.description"
            )
        # No parameters at all renders as gpt-oss was trained on it, ``() => any``.
        out.append(ToolDescription.new(name, description, parameters=schema if _has_params(schema) else None))
    return out


def _has_params(schema: dict[str, Any] | None) -> bool:
    """Whether an object schema declares any parameter (``{"type": "object", "properties": {}}`` does not)."""
    if not schema:
        return False
    return any(
        schema.get(k) for k in ("properties", "additionalProperties", "patternProperties", "anyOf", "oneOf")
    )


def current_turn_start(messages: list[dict[str, Any]]) -> int:
    """Index of the first message whose assistant reasoning the prompt keeps.

    gpt-oss drops the chain of thought of every turn that ended in a final answer and keeps only the current
    tool-calling turn's (OpenAI's gpt-oss guidance; its chat template): the turn after the last user message,
    unless an assistant answer (content, no tool calls) already ended it.
    """
    start = 0
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "user" or (role == "assistant" and not m.get("tool_calls") and m.get("content")):
            start = i + 1
    return start


def _reasoning_effort(effort: str | None) -> Any:
    from openai_harmony import ReasoningEffort

    value = (effort or "medium").lower()
    if value not in REASONING_EFFORTS:
        raise HarmonyRequestError(
            f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, not {effort!r}",
            "reasoning_effort",
        )
    return {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}[value]


def _arguments(call: dict[str, Any], param: str) -> str:
    args = call.get("arguments", "")
    if isinstance(args, dict):  # some clients send the parsed object
        return json.dumps(args, ensure_ascii=False)
    if not isinstance(args, str):
        raise HarmonyRequestError("tool call arguments must be a JSON string", param)
    return args


def build_conversation(
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    reasoning_effort: str | None = None,
    today: date | None = None,
) -> Any:
    """The harmony ``Conversation`` for an OpenAI chat (see the module docstring for the mapping)."""
    from openai_harmony import Author, Conversation, DeveloperContent, Message, Role, SystemContent

    system = (
        SystemContent.new()
        .with_reasoning_effort(_reasoning_effort(reasoning_effort))
        .with_conversation_start_date((today or date.today()).isoformat())
    )
    out = [Message.from_role_and_content(Role.SYSTEM, system)]
    instructions = [
        _text(m.get("content"), f"messages[{i}].content")
        for i, m in enumerate(messages)
        if m.get("role") in ("system", "developer")
    ]
    function_tools = _function_tools(tools)
    if any(instructions) or function_tools:
        developer = DeveloperContent.new()
        if any(instructions):
            developer = developer.with_instructions("\n\n".join(t for t in instructions if t))
        if function_tools:
            developer = developer.with_function_tools(function_tools)
        out.append(Message.from_role_and_content(Role.DEVELOPER, developer))

    call_names: dict[str, str] = {}  # tool_call_id -> function name, from earlier assistant turns
    keep_reasoning_from = current_turn_start(messages)
    for i, m in enumerate(messages):
        role = m.get("role")
        param = f"messages[{i}]"
        if role in ("system", "developer"):
            continue
        if role == "user":
            out.append(Message.from_role_and_content(Role.USER, _text(m.get("content"), f"{param}.content")))
        elif role == "assistant":
            reasoning = m.get("reasoning_content") or m.get("reasoning")
            if reasoning and i >= keep_reasoning_from:
                text = _text(reasoning, f"{param}.reasoning_content")
                out.append(Message.from_role_and_content(Role.ASSISTANT, text).with_channel("analysis"))
            content = _text(m.get("content"), f"{param}.content")
            calls = m.get("tool_calls") or []
            if content or not calls:  # an empty answer is still the assistant's turn
                # Text next to tool calls is a preamble on the commentary channel; alone it is the answer.
                channel = "commentary" if calls else "final"
                out.append(Message.from_role_and_content(Role.ASSISTANT, content).with_channel(channel))
            for j, call in enumerate(calls):
                cparam = f"{param}.tool_calls[{j}]"
                fn = call.get("function") if isinstance(call, dict) else None
                name = fn.get("name") if isinstance(fn, dict) else None
                if not isinstance(name, str) or not name:
                    raise HarmonyRequestError("a tool call needs a function name", f"{cparam}.function.name")
                if isinstance(call.get("id"), str):
                    call_names[call["id"]] = name
                out.append(
                    Message.from_role_and_content(
                        Role.ASSISTANT, _arguments(fn, f"{cparam}.function.arguments")
                    )
                    .with_channel("commentary")
                    .with_recipient(f"functions.{name}")
                    .with_content_type("json")
                )
        elif role == "tool":
            call_id = m.get("tool_call_id")
            name = call_names.get(call_id) if isinstance(call_id, str) else None
            if name is None:
                raise HarmonyRequestError(
                    f"tool message with tool_call_id {call_id!r} answers no earlier tool call",
                    f"{param}.tool_call_id",
                )
            out.append(
                Message.from_author_and_content(
                    Author.new(Role.TOOL, f"functions.{name}"), _text(m.get("content"), f"{param}.content")
                )
                .with_channel("commentary")
                .with_recipient("assistant")
            )
        else:
            raise HarmonyRequestError(f"unknown message role {role!r}", f"{param}.role")
    return Conversation.from_messages(out)


def render_prompt(
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    reasoning_effort: str | None = None,
    today: date | None = None,
) -> list[int]:
    """Prompt token ids for the assistant's next turn (ends with ``<|start|>assistant``)."""
    from openai_harmony import HarmonyError, Role

    conversation = build_conversation(messages, tools=tools, reasoning_effort=reasoning_effort, today=today)
    try:
        return encoding().render_conversation_for_completion(conversation, Role.ASSISTANT)
    except HarmonyError as e:
        raise HarmonyRequestError(f"cannot render the conversation as harmony: {e}", "messages") from e
