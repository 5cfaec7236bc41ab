"""A request the frontend has validated and tokenized (``PreparedRequest``): what the response writer needs
to know about it, and how its endpoint writes a stream (``StreamFormat``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dynamo_lite.frontend.chunks import ChatStreamFormat, CompletionStreamFormat, usage_dict
from dynamo_lite.frontend.logprobs import ChatLogprobs, CompletionLogprobs, token_bytes
from dynamo_lite.frontend.parsers import Delta
from dynamo_lite.frontend.preprocess import ModelPreprocessor
from dynamo_lite.frontend.responses import ResponsesApi
from dynamo_lite.protocol import GenerateRequest

CHAT, COMPLETIONS, RESPONSES = "chat", "completions", "responses"


class TokenCounts(Protocol):
    """What usage reads of a response's choices (``dynamo_lite.frontend.choices.Choices``)."""

    @property
    def completion_tokens(self) -> int: ...

    @property
    def cached_tokens(self) -> int: ...

    @property
    def reasoning_tokens(self) -> int: ...


class StreamFormat(Protocol):
    """How one endpoint writes a streamed response (chat/completion chunks, Responses events)."""

    def head(self) -> bytes: ...

    def delta(self, d: Delta, finish_reason: str | None) -> bytes: ...

    def tail(self, usage: dict, finish_reason: str, stop_sequence: str | None = None) -> bytes: ...

    def error(self, error_body: bytes) -> bytes: ...


@dataclass(slots=True)
class PreparedRequest:
    """A validated request, tokenized and ready for the backend."""

    endpoint: str  # CHAT | COMPLETIONS | RESPONSES
    response_id: str
    created: int
    arrival: float  # time.perf_counter() when the request arrived
    request: GenerateRequest
    stops: list[str]
    stream: bool
    include_usage: bool
    pre: ModelPreprocessor
    responses: ResponsesApi | None = None  # RESPONSES: what the response object echoes, and the store
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage in every chunk
    received: float = 0.0  # time.perf_counter() before preprocessing (0: not measured)
    extra_fields: frozenset[str] = frozenset()  # nvext.extra_fields to answer ("timing", "worker_id")
    n: int = 1  # choices: n backend requests (``dynamo_lite.frontend.choices``)
    include_stop: bool = False  # include_stop_str_in_output: a matched stop string stays in the text
    echo: str | None = None  # completions' ``echo``: the prompt's text, before the completion's
    functions: frozenset[str] = frozenset()  # the function tools the prompt declared (the only tool calls)
    budget: tuple[int, str] | None = None  # the reasoning budget asked for, and its field

    @property
    def model(self) -> str:
        return self.request.model

    def new_logprobs(self) -> ChatLogprobs | CompletionLogprobs | None:
        """The collector of one choice's token logprobs (None: not asked for)."""
        if self.request.sampling.logprobs is None:
            return None
        if self.endpoint == CHAT:
            return ChatLogprobs(token_bytes(self.pre))
        prompt = self.request.token_ids if self.echo is not None else None
        return CompletionLogprobs(token_bytes(self.pre), prompt)

    def stream_format(self, index: int = 0) -> StreamFormat:
        """The events of choice ``index`` of a streamed response."""
        if self.responses is not None:
            return self.responses.stream_format()
        cls = ChatStreamFormat if self.endpoint == CHAT else CompletionStreamFormat
        return cls(self.response_id, self.created, self.model, self.include_usage, index)

    def usage(self, choices: TokenCounts) -> dict:
        """OpenAI's ``usage`` of the response so far: the prompt once, every choice's completion tokens."""
        reasoning = choices.reasoning_tokens if self.pre.has_reasoning else None
        return usage_dict(
            len(self.request.token_ids), choices.completion_tokens, choices.cached_tokens, reasoning
        )
