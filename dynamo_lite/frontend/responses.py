"""The OpenAI Responses API (``POST /v1/responses``) on top of the chat path.

A request's ``instructions`` and ``input`` items become chat messages (``input_messages``) and go through the
same preprocessing as a chat (harmony for gpt-oss, the chat template otherwise); the output — reasoning, answer
text, function calls — comes back as Responses output items, whole or as the event stream the OpenAI SDK reads
(``response.created`` … ``response.output_text.delta`` … ``response.completed``).

``previous_response_id`` continues a stored response: responses are kept (unless ``store: false``) in a bounded
in-memory store of this frontend process — a client must reach the same frontend for its follow-up; an
unknown id is a 400.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson

from dynamo_lite.frontend.errors import bad_request
from dynamo_lite.frontend.openai_protocol import ResponsesRequest
from dynamo_lite.frontend.output import ToolCall, Transcript
from dynamo_lite.frontend.parsers import Delta, ToolCallDelta


def _hex() -> str:
    return uuid.uuid4().hex[:24]


class ResponseStore:
    """The conversations of recent responses (messages in, messages out), by response id; oldest dropped first."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._entries: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    def get(self, response_id: str) -> list[dict[str, Any]] | None:
        return self._entries.get(response_id)

    def put(self, response_id: str, messages: list[dict[str, Any]]) -> None:
        if self._max <= 0:
            return
        self._entries[response_id] = messages
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


def _item_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                raise bad_request("only text content parts are supported", param=param)
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_request("content must be a string or a list of text parts", param=param)


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses function tools (flat) → chat tools (``{"type": "function", "function": {...}}``)."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request("only tools of type 'function' are supported", param=f"tools[{i}].type")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": fn})
    return out


def input_messages(
    req: ResponsesRequest, previous: list[dict[str, Any]] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(chat messages to render, the conversation to store): ``instructions`` apply to this response only."""
    conversation: list[dict[str, Any]] = list(previous or [])
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    reasoning: str | None = None  # a reasoning item waits for the assistant turn it belongs to

    def assistant() -> dict[str, Any]:
        nonlocal reasoning
        last = conversation[-1] if conversation else None
        if reasoning is None and last is not None and last["role"] == "assistant" and not last.get("content"):
            return last
        msg: dict[str, Any] = {"role": "assistant", "content": ""}
        if reasoning is not None:
            msg["reasoning_content"], reasoning = reasoning, None
        conversation.append(msg)
        return msg

    for i, item in enumerate(items):
        param = f"input[{i}]"
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            text = _item_text(item.get("content"), f"{param}.content")
            if role == "assistant":
                assistant()["content"] = text
            elif role in ("user", "system", "developer"):
                conversation.append({"role": role, "content": text})
            else:
                raise bad_request(f"unknown message role {role!r}", param=f"{param}.role")
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise bad_request("a function_call item needs call_id and name", param=param)
            call = {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": item.get("arguments", "")},
            }
            assistant().setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                output = orjson.dumps(output).decode()
            conversation.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        else:
            raise bad_request(f"input items of type {kind!r} are not supported", param=f"{param}.type")
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
    return messages, conversation


def output_items(transcript: Transcript) -> list[dict[str, Any]]:
    items = []
    for kind, value in transcript.items:
        if kind == "reasoning":
            items.append(_reasoning_item(f"rs_{_hex()}", str(value), "completed"))
        elif kind == "content":
            items.append(_message_item(f"msg_{_hex()}", str(value), "completed"))
        else:
            assert isinstance(value, ToolCall)
            items.append(_call_item(f"fc_{_hex()}", value.id, value.name, value.arguments, "completed"))
    return items


def assistant_message(transcript: Transcript) -> dict[str, Any]:
    """The response as a chat message, for the store (the next turn's history)."""
    msg: dict[str, Any] = {"role": "assistant", "content": transcript.text("content")}
    reasoning = transcript.text("reasoning")
    if reasoning:
        msg["reasoning_content"] = reasoning
    if transcript.tool_calls:
        msg["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in transcript.tool_calls
        ]
    return msg


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [_text_part(text)] if status == "completed" else []
    return {"type": "message", "id": item_id, "role": "assistant", "status": status, "content": content}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def responses_usage(usage: dict) -> dict:
    """Chat ``usage`` → Responses ``usage``."""
    details = usage.get("completion_tokens_details") or {}
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": details.get("reasoning_tokens", 0)},
        "total_tokens": usage["total_tokens"],
    }


@dataclass(slots=True)
class ResponsesApi:
    """One Responses request's context: what the response object echoes, and where it is stored."""

    req: ResponsesRequest
    conversation: list[dict[str, Any]]
    store: ResponseStore | None
    response_id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    created_at: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, status: str, output: list[dict], usage: dict | None = None, finish: str = "") -> dict:
        req = self.req
        effort = req.reasoning.effort if req.reasoning else None
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "model": req.model,
            "status": status,
            "output": output,
            "instructions": req.instructions,
            "tools": req.tools or [],
            "tool_choice": req.tool_choice or "auto",
            "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "max_output_tokens": req.max_output_tokens,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": effort, "summary": None},
            "text": req.text or {"format": {"type": "text"}},
            "metadata": req.metadata or {},
            "store": self.store is not None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "usage": responses_usage(usage) if usage is not None else None,
        }

    def done(self, transcript: Transcript) -> None:
        if self.store is not None:
            self.store.put(self.response_id, [*self.conversation, assistant_message(transcript)])

    def body(
        self, transcript: Transcript, finish: str, usage: dict, stop_sequence: str | None = None
    ) -> bytes:
        self.done(transcript)
        status = "incomplete" if finish == "length" else "completed"
        return orjson.dumps(self.envelope(status, output_items(transcript), usage, finish))

    def stream_format(self) -> ResponsesStreamFormat:
        return ResponsesStreamFormat(self)


class ResponsesStreamFormat:
    """The Responses event stream: one output item per run of reasoning, answer text or function call, each
    opened (``output_item.added``), filled (``*.delta``) and closed (``*.done``, ``output_item.done``)."""

    def __init__(self, api: ResponsesApi) -> None:
        self._api = api
        self._seq = 0
        self._items: list[dict] = []  # closed items, in order
        self._open: dict | None = None  # the item being streamed
        self._text = ""  # its text or arguments so far
        self._call_index = -1  # the parser's index of the open function call
        self._transcript = Transcript()

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def head(self) -> bytes:
        snapshot = self._api.envelope("in_progress", [])
        return self._event("response.created", response=snapshot) + self._event(
            "response.in_progress", response=snapshot
        )

    def delta(self, d: Delta, finish_reason: str | None) -> bytes:
        self._transcript.add(d)
        out = []
        if d.reasoning:
            out.append(self._stream_text("reasoning", d.reasoning))
        if d.content:
            out.append(self._stream_text("message", d.content))
        for part in d.tool_calls:
            out.append(self._stream_call(part))
        return b"".join(out)

    def _where(self) -> dict[str, Any]:
        assert self._open is not None
        return {"item_id": self._open["id"], "output_index": len(self._items)}

    def _stream_text(self, kind: str, text: str) -> bytes:
        out = b""
        if self._open is None or self._open["type"] != kind:
            out += self._close()
            item_id = f"rs_{_hex()}" if kind == "reasoning" else f"msg_{_hex()}"
            self._open = (
                _reasoning_item(item_id, "", "in_progress")
                if kind == "reasoning"
                else _message_item(item_id, "", "in_progress")
            )
            part = {"type": "reasoning_text", "text": ""} if kind == "reasoning" else _text_part("")
            out += self._event("response.output_item.added", output_index=len(self._items), item=self._open)
            out += self._event("response.content_part.added", **self._where(), content_index=0, part=part)
        self._text += text
        if kind == "reasoning":
            return out + self._event(
                "response.reasoning_text.delta", **self._where(), content_index=0, delta=text
            )
        return out + self._event(
            "response.output_text.delta", **self._where(), content_index=0, delta=text, logprobs=[]
        )

    def _stream_call(self, part: ToolCallDelta) -> bytes:
        out = b""
        if part.id is not None or self._open is None or self._call_index != part.index:
            out += self._close()
            self._call_index = part.index
            self._open = _call_item(f"fc_{_hex()}", part.id or "", part.name or "", "", "in_progress")
            out += self._event("response.output_item.added", output_index=len(self._items), item=self._open)
        if part.arguments:
            self._text += part.arguments
            out += self._event(
                "response.function_call_arguments.delta", **self._where(), delta=part.arguments
            )
        return out

    def _close(self) -> bytes:
        item = self._open
        if item is None:
            return b""
        where, text = self._where(), self._text
        out = b""
        if item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            out += self._event("response.reasoning_text.done", **where, content_index=0, text=text)
            out += self._event("response.content_part.done", **where, content_index=0, part=part)
            done = _reasoning_item(item["id"], text, "completed")
        elif item["type"] == "message":
            out += self._event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
            out += self._event("response.content_part.done", **where, content_index=0, part=_text_part(text))
            done = _message_item(item["id"], text, "completed")
        else:
            out += self._event(
                "response.function_call_arguments.done", **where, name=item["name"], arguments=text
            )
            done = _call_item(item["id"], item["call_id"], item["name"], text, "completed")
        out += self._event("response.output_item.done", output_index=len(self._items), item=done)
        self._items.append(done)
        self._open, self._text, self._call_index = None, "", -1
        return out

    def tail(self, usage: dict, finish_reason: str = "stop", stop_sequence: str | None = None) -> bytes:
        out = self._close()
        self._api.done(self._transcript)
        if finish_reason == "length":
            response = self._api.envelope("incomplete", self._items, usage, finish_reason)
            return out + self._event("response.incomplete", response=response)
        return out + self._event(
            "response.completed", response=self._api.envelope("completed", self._items, usage)
        )

    def error(self, error_body: bytes) -> bytes:
        err = orjson.loads(error_body).get("error", {})
        return self._event(
            "error", code=err.get("code"), message=err.get("message", ""), param=err.get("param")
        )
