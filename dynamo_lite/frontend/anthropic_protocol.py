"""Anthropic Messages requests (``POST /v1/messages``) as chat requests, and errors in Anthropic's shape.

A Messages request becomes the chat request the rest of the frontend already serves (``to_chat``): ``system``
(a string or text blocks) → a system message; ``text`` blocks → content; an assistant's ``thinking`` blocks →
``reasoning_content``; ``tool_use`` blocks → ``tool_calls`` (``input`` as JSON arguments); a user's
``tool_result`` blocks → ``tool`` messages answering ``tool_use_id``; ``tools`` (``input_schema``) → function
tools; ``tool_choice`` auto/none; ``max_tokens``, ``stop_sequences``, ``temperature``, ``top_p``, ``top_k``;
``thinking`` → the reasoning budget (``budget_tokens``; ``disabled`` = 0) for models that reason, ignored for
others; ``output_config.format`` (a JSON schema) → structured output, ``output_config.effort`` → reasoning effort
(``xhigh``/``max`` as ``high``); a tool's ``strict`` as a strict tool. What agent clients send along is accepted
and has no effect: ``cache_control`` (on blocks or top level), ``metadata``, ``service_tier``, ``speed`` and the
like, the ``anthropic-version``/``anthropic-beta`` headers, ``?beta=true``.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from dynamo_lite.frontend.errors import OpenAIError, bad_request

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors)
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def error_body(status: int, message: str) -> bytes:
    kind = _ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


def error_response(err: OpenAIError, headers: dict[str, str] | None = None) -> Response:
    message = f"{err.param}: {err.message}" if err.param and err.param not in err.message else err.message
    return Response(
        error_body(err.status, message),
        status_code=err.status,
        headers={**err.headers, **(headers or {})},
        media_type="application/json",
    )


def _blocks(content: Any, param: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise bad_request("content must be a string or a list of content blocks", param=param)
    return content


def _text_of(content: Any, param: str) -> str:
    texts = []
    for j, block in enumerate(_blocks(content, param)):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise bad_request(
                f"only text blocks are supported here, not {block.get('type')!r}", f"{param}[{j}]"
            )
        texts.append(block["text"])
    return "\n".join(texts)


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        out.append({"role": "system", "content": _text_of(system, "system")})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            raise bad_request(f"role must be 'user' or 'assistant', not {role!r}", param=f"{param}.role")
        texts: list[str] = []
        reasoning: list[str] = []
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for j, block in enumerate(_blocks(m.get("content"), f"{param}.content")):
            where, kind = f"{param}.content[{j}]", block.get("type")
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "thinking" and role == "assistant":
                reasoning.append(str(block.get("thinking") or ""))
            elif kind == "redacted_thinking" and role == "assistant":
                pass  # encrypted elsewhere: nothing a local model can read
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                    raise bad_request("a tool_use block needs an id and a name", param=where)
                arguments = orjson.dumps(block.get("input") or {}).decode()
                calls.append(
                    {
                        "id": block["id"],
                        "type": "function",
                        "function": {"name": block["name"], "arguments": arguments},
                    }
                )
            elif kind == "tool_result" and role == "user":
                content = block.get("content")
                text = "" if content is None else _text_of(content, f"{where}.content")
                results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
            else:
                raise bad_request(f"content blocks of type {kind!r} are not supported in {role} turns", where)
        if role == "user":
            out.extend(results)  # the results answer the previous turn's calls; any text follows them
            if texts or not results:
                out.append({"role": "user", "content": "\n".join(texts)})
        else:
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
            if reasoning:
                msg["reasoning_content"] = "\n".join(reasoning)
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    return out


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise bad_request(
                f"server tools ({kind!r}) are not supported: declare client tools", f"tools[{i}]"
            )
        fn = {"name": tool.get("name"), "parameters": tool.get("input_schema") or {"type": "object"}}
        if tool.get("description"):
            fn["description"] = tool["description"]
        if tool.get("strict") is True:
            fn["strict"] = True
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(body: dict[str, Any]) -> str | None:
    choice = body.get("tool_choice")
    if choice is None:
        return None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in ("auto", "none"):
        return kind
    raise bad_request(
        f"tool_choice {kind!r} is not supported: only 'auto' and 'none' (the model is not forced to call a tool)",
        param="tool_choice.type",
    )


def thinking_budget(body: dict[str, Any]) -> int | None:
    """The reasoning budget ``thinking`` asks for (None: not set)."""
    thinking = body.get("thinking")
    if thinking is None:
        return None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return 0
    if kind in ("enabled", "adaptive"):
        budget = thinking.get("budget_tokens")
        if budget is None:
            return None
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise bad_request(
                "thinking.budget_tokens must be an integer >= 0", param="thinking.budget_tokens"
            )
        return budget
    raise bad_request(f"thinking.type {kind!r} is not one of enabled, disabled", param="thinking.type")


def to_chat(body: dict[str, Any], *, reasons: bool) -> dict[str, Any]:
    """The chat request body for a Messages request body; ``reasons``: the model has a reasoning parser (the
    ``thinking`` budget applies)."""
    if not isinstance(body.get("model"), str):
        raise bad_request("model is required", param="model")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad_request("max_tokens is required: an integer >= 1", param="max_tokens")
    chat: dict[str, Any] = {
        "model": body["model"],
        "messages": _messages(body),
        "max_tokens": max_tokens,
        "stream": bool(body.get("stream")),
    }
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]
    tools = _tools(body)
    if tools:
        chat["tools"] = tools
    choice = _tool_choice(body)
    if choice is not None:
        chat["tool_choice"] = choice
    budget = thinking_budget(body)
    if budget is not None and reasons:
        chat["thinking_token_budget"] = budget
    _output_config(body, chat, reasons=reasons)
    return chat


def _output_config(body: dict[str, Any], chat: dict[str, Any], *, reasons: bool) -> None:
    """``output_config``: ``format`` (a JSON schema) → structured output; ``effort`` → reasoning effort."""
    config = body.get("output_config")
    if not isinstance(config, dict):
        return
    fmt = config.get("format")
    if isinstance(fmt, dict):
        if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise bad_request(
                "output_config.format must be a json_schema with a schema", "output_config.format"
            )
        chat["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": fmt["schema"]},
        }
    effort = config.get("effort")
    if isinstance(effort, str) and reasons:
        chat["reasoning_effort"] = {"xhigh": "high", "max": "high"}.get(effort, effort)
