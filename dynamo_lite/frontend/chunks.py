"""OpenAI response bodies as bytes. Stream chunks are preformatted templates with only the text JSON-escaped
per chunk (orjson): no dict and no model object per token."""

from __future__ import annotations

import orjson

from dynamo_lite.frontend.output import ToolCall, Transcript
from dynamo_lite.frontend.parsers import Delta, ToolCallDelta

DONE = b"data: [DONE]\n\n"
_NULL_FINISH = b',"logprobs":null,"finish_reason":null}]}\n\n'
_FINISH = {
    reason: b',"logprobs":null,"finish_reason":' + orjson.dumps(reason) + b"}]}\n\n"
    for reason in ("stop", "length", "tool_calls")
}


def usage_dict(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int, reasoning_tokens: int | None = None
) -> dict:
    """OpenAI's ``usage``; ``reasoning_tokens`` (None: the model has no reasoning parser) adds
    ``completion_tokens_details``."""
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def with_usage(event: bytes, usage: dict) -> bytes:
    """A chunk event with ``usage`` added (``stream_options.continuous_usage_stats``)."""
    return event[:-3] + b',"usage":' + orjson.dumps(usage) + b"}\n\n"


def tool_call_deltas(parts: list[ToolCallDelta]) -> list[dict]:
    """Chat ``delta.tool_calls``: consecutive parts of one call merged; a call's first part names it."""
    out: list[dict] = []
    for part in parts:
        last = out[-1] if out else None
        if last is not None and last["index"] == part.index and part.id is None:
            last["function"]["arguments"] = last["function"].get("arguments", "") + part.arguments
            continue
        entry: dict = {"index": part.index}
        if part.id is not None:
            entry["id"] = part.id
            entry["type"] = "function"
            entry["function"] = {"name": part.name, "arguments": part.arguments}
        else:
            entry["function"] = {"arguments": part.arguments}
        out.append(entry)
    return out


def tool_call_dict(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def error_event(error_body: bytes) -> bytes:
    """The event that ends a failed stream (followed by ``DONE``)."""
    return b"data: " + error_body + b"\n\n"


class _StreamFormat:
    """Shared head: ``data: {"id":..,"object":..,"created":..,"model":..,"choices":[``."""

    __slots__ = ("_head",)

    def __init__(self, response_id: str, obj: str, created: int, model: str) -> None:
        self._head = (
            b'data: {"id":'
            + orjson.dumps(response_id)
            + b',"object":"'
            + obj.encode()
            + b'","created":'
            + str(created).encode()
            + b',"model":'
            + orjson.dumps(model)
            + b',"choices":['
        )

    def usage(self, usage: dict) -> bytes:
        """The final ``include_usage`` chunk: empty ``choices``, the request's usage."""
        return self._head + b'],"usage":' + orjson.dumps(usage) + b"}\n\n"


class ChatStreamFormat(_StreamFormat):
    """``chat.completion.chunk`` events; the first one carries ``role``. Answer text alone takes a
    preformatted path; reasoning (``reasoning_content``) and tool calls build their delta object."""

    __slots__ = ("_content", "_first", "_empty", "_delta", "_started", "_include_usage")

    def __init__(
        self, response_id: str, created: int, model: str, include_usage: bool = False, index: int = 0
    ) -> None:
        super().__init__(response_id, "chat.completion.chunk", created, model)
        choice = self._head + b'{"index":' + str(index).encode()
        self._content = choice + b',"delta":{"content":'
        self._first = choice + b',"delta":{"role":"assistant","content":'
        self._empty = choice + b',"delta":{'
        self._delta = choice + b',"delta":'
        self._started = False
        self._include_usage = include_usage

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> bytes:
        tail = _FINISH[finish_reason] if finish_reason else _NULL_FINISH
        if first:
            return self._first + orjson.dumps(text) + b"}" + tail
        if text:
            return self._content + orjson.dumps(text) + b"}" + tail
        return self._empty + b"}" + tail

    def head(self) -> bytes:
        return b""

    def delta(self, d: Delta, finish_reason: str | None) -> bytes:
        first = not self._started
        self._started = True
        if not d.reasoning and not d.tool_calls:
            return self.chunk(d.content, finish_reason, first)
        obj: dict = {"role": "assistant"} if first else {}
        if d.content:
            obj["content"] = d.content
        if d.reasoning:
            obj["reasoning_content"] = d.reasoning
        if d.tool_calls:
            obj["tool_calls"] = tool_call_deltas(d.tool_calls)
        tail = _FINISH[finish_reason] if finish_reason else _NULL_FINISH
        return self._delta + orjson.dumps(obj) + tail

    def tail(self, usage: dict, finish_reason: str = "stop", stop_sequence: str | None = None) -> bytes:
        return self.usage(usage) + DONE if self._include_usage else DONE

    def error(self, error_body: bytes) -> bytes:
        return error_event(error_body) + DONE


class CompletionStreamFormat(_StreamFormat):
    """``text_completion`` stream events."""

    __slots__ = ("_text", "_include_usage")

    def __init__(
        self, response_id: str, created: int, model: str, include_usage: bool = False, index: int = 0
    ) -> None:
        super().__init__(response_id, "text_completion", created, model)
        self._text = self._head + b'{"index":' + str(index).encode() + b',"text":'
        self._include_usage = include_usage

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> bytes:
        tail = _FINISH[finish_reason] if finish_reason else _NULL_FINISH
        return self._text + orjson.dumps(text) + tail

    def head(self) -> bytes:
        return b""

    def delta(self, d: Delta, finish_reason: str | None) -> bytes:
        return self.chunk(d.content, finish_reason)

    def tail(self, usage: dict, finish_reason: str = "stop", stop_sequence: str | None = None) -> bytes:
        return self.usage(usage) + DONE if self._include_usage else DONE

    def error(self, error_body: bytes) -> bytes:
        return error_event(error_body) + DONE


def chat_choice(index: int, transcript: Transcript, finish: str, logprobs: dict | None) -> dict:
    """One choice of a whole ``chat.completion``."""
    message: dict = {"role": "assistant", "content": transcript.text("content")}
    reasoning = transcript.text("reasoning")
    if reasoning:
        message["reasoning_content"] = reasoning
    calls = transcript.tool_calls
    if calls:
        message["tool_calls"] = [tool_call_dict(c) for c in calls]
        message["content"] = message["content"] or None
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def text_choice(index: int, transcript: Transcript, finish: str, logprobs: dict | None) -> dict:
    """One choice of a whole ``text_completion``."""
    return {"index": index, "text": transcript.text("content"), "logprobs": logprobs, "finish_reason": finish}


def completion_body(
    response_id: str,
    obj: str,
    created: int,
    model: str,
    choices: list[dict],
    usage: dict,
    nvext: dict | None = None,
) -> bytes:
    """A whole ``chat.completion`` or ``text_completion`` (``obj``), encoded once; ``nvext`` when asked for
    (``nvext.extra_fields``)."""
    body = {
        "id": response_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }
    if nvext is not None:
        body["nvext"] = nvext
    return orjson.dumps(body)
