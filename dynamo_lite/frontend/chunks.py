"""OpenAI response bodies as bytes. Stream chunks are preformatted templates with only the text JSON-escaped
per chunk (orjson): no dict and no model object per token."""

from __future__ import annotations

import orjson

DONE = b"data: [DONE]\n\n"
_NULL_FINISH = b',"logprobs":null,"finish_reason":null}]}\n\n'
_FINISH = {
    reason: b',"logprobs":null,"finish_reason":' + orjson.dumps(reason) + b"}]}\n\n"
    for reason in ("stop", "length")
}


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


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
    """``chat.completion.chunk`` events; the first one carries ``role``."""

    __slots__ = ("_content", "_first", "_empty")

    def __init__(self, response_id: str, created: int, model: str) -> None:
        super().__init__(response_id, "chat.completion.chunk", created, model)
        self._content = self._head + b'{"index":0,"delta":{"content":'
        self._first = self._head + b'{"index":0,"delta":{"role":"assistant","content":'
        self._empty = self._head + b'{"index":0,"delta":{'

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> bytes:
        tail = _FINISH[finish_reason] if finish_reason else _NULL_FINISH
        if first:
            return self._first + orjson.dumps(text) + b"}" + tail
        if text:
            return self._content + orjson.dumps(text) + b"}" + tail
        return self._empty + b"}" + tail


class CompletionStreamFormat(_StreamFormat):
    """``text_completion`` stream events."""

    __slots__ = ("_text",)

    def __init__(self, response_id: str, created: int, model: str) -> None:
        super().__init__(response_id, "text_completion", created, model)
        self._text = self._head + b'{"index":0,"text":'

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> bytes:
        tail = _FINISH[finish_reason] if finish_reason else _NULL_FINISH
        return self._text + orjson.dumps(text) + tail


def chat_completion(response_id: str, created: int, model: str, text: str, finish: str, usage: dict) -> bytes:
    return orjson.dumps(
        {
            "id": response_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage,
        }
    )


def text_completion(response_id: str, created: int, model: str, text: str, finish: str, usage: dict) -> bytes:
    return orjson.dumps(
        {
            "id": response_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage,
        }
    )
