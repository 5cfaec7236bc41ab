"""The OpenAI API as a load client sees it: request bodies out, chunks and usage in.

Streaming responses are recorded per read: every SSE event is parsed with orjson (cheap, ~1 µs for a small
chunk) because the text per chunk is what counts tokens per chunk; the token totals come from the final
``usage`` chunk, which the client asks for with ``stream_options.include_usage``.
"""

from __future__ import annotations

from typing import Any

import orjson

from .config import BenchmarkConfig
from .records import RequestRecord
from .sse import SseParser

_ERROR_DETAIL_CHARS = 2000


def build_payload(cfg: BenchmarkConfig, prompt: str, max_tokens: int | None) -> dict[str, Any]:
    """The JSON body of one request; ``cfg.extra_inputs`` is merged last, so it overrides."""
    body: dict[str, Any] = {"model": cfg.model}
    if cfg.endpoint_type == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body["stream"] = cfg.streaming
    if cfg.streaming:
        body["stream_options"] = {"include_usage": True}
    body.update(cfg.extra_inputs)
    return body


def _read_usage(rec: RequestRecord, usage: dict[str, Any]) -> None:
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    if isinstance(prompt, int):
        rec.prompt_tokens = prompt
    if isinstance(completion, int):
        rec.completion_tokens = completion


class StreamRecorder:
    """A ``BodySink`` for streaming responses: SSE events → timestamps, text, usage into the record."""

    __slots__ = ("_rec", "_sse", "_chat")

    def __init__(self, rec: RequestRecord, chat: bool) -> None:
        self._rec = rec
        self._sse = SseParser()
        self._chat = chat

    def on_body(self, data: bytes, t: float) -> None:
        self._handle(self._sse.feed(data), t)

    def _handle(self, payloads: list[bytes], t: float) -> None:
        # The per-chunk hot path: keep it flat (no helper calls per event).
        rec = self._rec
        rec.events += len(payloads)
        for payload in payloads:
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                if payload.strip() == b"[DONE]":
                    rec.done_marker = True
                else:
                    rec.fail("bad_event", payload[:_ERROR_DETAIL_CHARS].decode("utf-8", "replace"))
                continue
            if type(obj) is not dict:
                rec.fail("bad_event", payload[:_ERROR_DETAIL_CHARS].decode("utf-8", "replace"))
                continue
            if rec.first_response is None:
                rec.first_response = t
            choices = obj.get("choices")
            if choices:
                choice = choices[0]
                if self._chat:
                    delta = choice.get("delta")
                    text = delta.get("content") if delta else None
                    if (
                        delta and "reasoning_content" in delta
                    ):  # reasoning models (gpt-oss) stream thoughts here
                        text = (delta["reasoning_content"] or "") + (text or "")
                else:
                    text = choice.get("text")
                if text:
                    rec.chunk_times.append(t)
                    rec.chunk_texts.append(text)
                reason = choice.get("finish_reason")
                if reason:
                    rec.finish_reason = reason
            usage = obj.get("usage")
            if usage:
                _read_usage(rec, usage)
            if "error" in obj and obj["error"]:
                rec.fail("stream_error", orjson.dumps(obj["error"]).decode()[:_ERROR_DETAIL_CHARS])

    def finish(self) -> None:
        """Called when the body ended: an event left without its blank line still counts."""
        self._handle(self._sse.end(), self._rec.end)


class BodyRecorder:
    """A ``BodySink`` for non-streaming responses: collects the body, parses it once at the end."""

    __slots__ = ("_rec", "_parts", "_chat")

    def __init__(self, rec: RequestRecord, chat: bool) -> None:
        self._rec = rec
        self._parts: list[bytes] = []
        self._chat = chat

    def on_body(self, data: bytes, t: float) -> None:
        self._parts.append(data)

    def finish(self) -> None:
        rec = self._rec
        body = b"".join(self._parts)
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            rec.fail("bad_body", body[:_ERROR_DETAIL_CHARS].decode("utf-8", "replace"))
            return
        rec.first_response = rec.end
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if choices:
            choice = choices[0]
            if self._chat:
                message = choice.get("message") or {}
                text = (message.get("reasoning_content") or "") + (message.get("content") or "")
            else:
                text = choice.get("text") or ""
            if text:
                rec.chunk_texts.append(text)  # no chunk_times: TTFT and ITL don't apply without streaming
            rec.finish_reason = choice.get("finish_reason")
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if usage:
            _read_usage(rec, usage)
        if isinstance(obj, dict) and obj.get("error"):
            rec.fail("response_error", orjson.dumps(obj["error"]).decode()[:_ERROR_DETAIL_CHARS])
