"""The Anthropic Messages API: ``POST /v1/messages`` (whole or streamed) and ``POST /v1/messages/count_tokens``,
for every served model, on top of the chat path.

A request is turned into a chat request (``anthropic_protocol.to_chat``) and prepared as one; its output comes
back as Anthropic content blocks — ``thinking`` (the model's reasoning: gpt-oss's analysis channel, ``<think>``),
``text``, ``tool_use`` — in one message, or as Anthropic's event stream: ``message_start``, per block
``content_block_start`` / ``content_block_delta`` (``thinking_delta``, ``text_delta``, ``input_json_delta``) /
``content_block_stop``, then ``message_delta`` (``stop_reason``, usage) and ``message_stop``. ``stop_reason``:
``tool_use`` after tool calls, ``max_tokens`` when cut, ``stop_sequence`` (with the sequence) when one of
``stop_sequences`` ended the answer, else ``end_turn``. Usage as Anthropic counts it: ``input_tokens``
excludes the prompt tokens read from a prefix cache (``cache_read_input_tokens``). Errors come in Anthropic's
shape; with ``--api-key`` the key is taken from ``x-api-key`` (or ``Authorization: Bearer``).
"""

from __future__ import annotations

import hmac
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import Request
from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from dynamo_lite.frontend.access_log import log_access
from dynamo_lite.frontend.anthropic_protocol import error_body, error_response, to_chat
from dynamo_lite.frontend.errors import OpenAIError, as_openai_error, bad_request
from dynamo_lite.frontend.http_in import read_body, request_id_of
from dynamo_lite.frontend.openai_protocol import ChatCompletionRequest
from dynamo_lite.frontend.output import ToolCall, Transcript
from dynamo_lite.frontend.parsers import Delta, ToolCallDelta
from dynamo_lite.frontend.reasoning import reasoning_spec
from dynamo_lite.frontend.sse import WatchedResponse

if TYPE_CHECKING:
    from dynamo_lite.frontend.metrics import FrontendMetrics
    from dynamo_lite.frontend.prepare import RequestPreparer
    from dynamo_lite.frontend.serving import CompletionService
    from dynamo_lite.frontend.settings import FrontendSettings

MESSAGES = "messages"
_STOP_REASONS = {"tool_calls": "tool_use", "length": "max_tokens"}


def stop_reason(finish: str, stop_sequence: str | None) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` for an OpenAI finish reason and the stop string that
    ended the answer, if one did."""
    if finish == "stop" and stop_sequence:
        return "stop_sequence", stop_sequence
    return _STOP_REASONS.get(finish, "end_turn"), None


def anthropic_usage(usage: dict) -> dict[str, int]:
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return {
        "input_tokens": usage["prompt_tokens"] - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": usage["completion_tokens"],
    }


def _input(arguments: str) -> Any:
    try:
        return orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {}  # arguments cut short (max_tokens): no object to give


def content_blocks(transcript: Transcript) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for kind, value in transcript.items:
        if kind == "reasoning":
            blocks.append({"type": "thinking", "thinking": str(value), "signature": ""})
        elif kind == "content":
            blocks.append({"type": "text", "text": str(value)})
        else:
            assert isinstance(value, ToolCall)
            blocks.append(
                {"type": "tool_use", "id": value.id, "name": value.name, "input": _input(value.arguments)}
            )
    return blocks


@dataclass(slots=True)
class MessagesApi:
    """One Messages request's context (the ``PreparedRequest.responses`` hook: its body and stream format)."""

    model: str
    prompt_tokens: int = 0  # reported by message_start (the cache's share is known only at the end)
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex[:24]}")

    def message(
        self,
        content: list[dict],
        stop_reason: str | None,
        usage: dict[str, int],
        stop_sequence: str | None = None,
    ) -> dict[str, Any]:
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        }

    def body(
        self, transcript: Transcript, finish: str, usage: dict, stop_sequence: str | None = None
    ) -> bytes:
        stop, sequence = stop_reason(finish, stop_sequence)
        return orjson.dumps(self.message(content_blocks(transcript), stop, anthropic_usage(usage), sequence))

    def stream_format(self) -> MessagesStreamFormat:
        return MessagesStreamFormat(self)


class MessagesStreamFormat:
    """Anthropic's event stream: one content block per run of thinking, text or one tool call."""

    def __init__(self, api: MessagesApi) -> None:
        self._api = api
        self._index = -1  # the open block's index
        self._open = ""  # its type ("" when none is open)
        self._call = -1  # the parser's index of the open tool call

    @staticmethod
    def _event(kind: str, **fields: Any) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"

    def head(self) -> bytes:
        usage = {
            "input_tokens": self._api.prompt_tokens,
            "output_tokens": 0,
        }  # message_delta: the final counts
        return self._event("message_start", message=self._api.message([], None, usage))

    def delta(self, d: Delta, finish_reason: str | None) -> bytes:
        out = []
        if d.reasoning:
            out.append(self._text("thinking", "thinking_delta", "thinking", d.reasoning))
        if d.content:
            out.append(self._text("text", "text_delta", "text", d.content))
        for part in d.tool_calls:
            out.append(self._tool(part))
        return b"".join(out)

    def _start(self, block: dict[str, Any]) -> bytes:
        out = self._close()
        self._index += 1
        self._open = block["type"]
        return out + self._event("content_block_start", index=self._index, content_block=block)

    def _text(self, kind: str, delta_type: str, key: str, text: str) -> bytes:
        out = b""
        if self._open != kind:
            start = {"type": kind, kind: ""}
            if kind == "thinking":
                start["signature"] = ""
            out = self._start(start)
        return out + self._event(
            "content_block_delta", index=self._index, delta={"type": delta_type, key: text}
        )

    def _tool(self, part: ToolCallDelta) -> bytes:
        out = b""
        if part.id is not None or self._open != "tool_use" or self._call != part.index:
            out = self._start({"type": "tool_use", "id": part.id or "", "name": part.name or "", "input": {}})
            self._call = part.index
        if part.arguments:
            delta = {"type": "input_json_delta", "partial_json": part.arguments}
            out += self._event("content_block_delta", index=self._index, delta=delta)
        return out

    def _close(self) -> bytes:
        if not self._open:
            return b""
        self._open, self._call = "", -1
        return self._event("content_block_stop", index=self._index)

    def tail(self, usage: dict, finish_reason: str = "stop", stop_sequence: str | None = None) -> bytes:
        stop, sequence = stop_reason(finish_reason, stop_sequence)
        delta = {"stop_reason": stop, "stop_sequence": sequence}
        return (
            self._close()
            + self._event("message_delta", delta=delta, usage=anthropic_usage(usage))
            + self._event("message_stop")
        )

    def error(self, openai_body: bytes) -> bytes:
        """The stream's last event for a failure (given in OpenAI's shape), in Anthropic's."""
        err = orjson.loads(openai_body).get("error", {})
        body = orjson.loads(error_body(500, str(err.get("message", "error"))))
        if err.get("type") in ("rate_limit_error", "service_unavailable"):
            body["error"]["type"] = "overloaded_error"
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"


class MessagesRoutes:
    """``/v1/messages`` and ``/v1/messages/count_tokens`` over the chat path: the OpenAI routes' preparer and
    service."""

    def __init__(
        self,
        settings: FrontendSettings,
        metrics: FrontendMetrics,
        preparer: RequestPreparer,
        service: CompletionService,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._preparer = preparer
        self._service = service
        self._key = settings.api_key.encode() if settings.api_key else b""

    def _refuse(self, request: Request, rid: str) -> Response | None:
        if self._key:
            given = request.headers.get("x-api-key")
            if given is None:
                given = (request.headers.get("authorization") or "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), self._key):
                return error_response(OpenAIError(401, "invalid x-api-key"), {"x-request-id": rid})
        settings = self._settings
        if settings.max_inflight and self._service.active >= settings.max_inflight:
            err = OpenAIError(
                429, f"too many requests in flight (--max-inflight {settings.max_inflight}); retry later"
            )
            return error_response(
                err, {"x-request-id": rid, "retry-after": str(settings.timeouts.retry_after_s)}
            )
        return None

    async def _body(self, request: Request) -> dict[str, Any]:
        raw = await read_body(request, self._settings.max_body_bytes)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise bad_request(f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        return body

    async def _chat(self, body: dict[str, Any]) -> ChatCompletionRequest:
        """The chat request a Messages request body stands for (400 naming the field)."""
        model = body.get("model")
        if not isinstance(model, str):
            raise bad_request("model is required", param="model")
        _, pre = await self._preparer.preprocessor(model)
        try:
            return ChatCompletionRequest.model_validate(
                to_chat(body, reasons=reasoning_spec(pre) is not None)
            )
        except ValidationError as e:
            first = e.errors()[0]
            raise bad_request(first["msg"], param=".".join(str(p) for p in first["loc"])) from None

    async def create(self, request: Request) -> Response | WatchedResponse:
        """``POST /v1/messages``."""

        rid = request_id_of(request)
        refused = self._refuse(request, rid)
        if refused is not None:
            log_access(request_id=rid, endpoint=MESSAGES, model="", status=refused.status_code)
            return refused
        try:
            body = await self._body(request)
            prepared = await self._preparer.prepare_chat(await self._chat(body), rid)
            api = MessagesApi(body["model"], len(prepared.request.token_ids))
            prepared.responses = api  # type: ignore[assignment]  # the response writer's hook
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception as exc:
            err = as_openai_error(exc)
            self._metrics.error(err.type)
            log_access(request_id=rid, endpoint=MESSAGES, model="", status=err.status)
            return error_response(err, {"x-request-id": rid})
        return self._service.response(prepared, rid)

    async def count_tokens(self, request: Request) -> Response:
        """``POST /v1/messages/count_tokens``: the prompt's tokens as ``/v1/messages`` would render it."""
        from dynamo_lite.frontend.fields import tools_for_prompt

        rid = request_id_of(request)
        refused = self._refuse(request, rid)
        if refused is not None:
            return refused
        try:
            body = await self._body(request)
            body.setdefault("max_tokens", 1)  # count_tokens takes none
            chat = await self._chat(body)
            _, pre = await self._preparer.preprocessor(chat.model)
            messages = [
                {**(m.model_extra or {}), "role": m.role, "content": m.content} for m in chat.messages
            ]
            ids = await pre.chat_prompt_ids(messages, tools=tools_for_prompt(chat.tools, chat.tool_choice))
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception as exc:
            return error_response(as_openai_error(exc), {"x-request-id": rid})
        return Response(orjson.dumps({"input_tokens": len(ids)}), media_type="application/json")
