"""What a request has produced: backend chunks → parsed deltas (answer, reasoning, tool calls), stop strings,
token counts and the finish reason; and, for whole (non-streamed) responses, the transcript of it all."""

from __future__ import annotations

from dataclasses import dataclass, field

from dynamo_lite.frontend.detokenize import StopMatcher
from dynamo_lite.frontend.parsers import Delta, OutputParser, ToolCallDelta
from dynamo_lite.protocol import ErrorInfo, FinishReason, GenerateChunk, StreamError


def _finish_reason(reason: FinishReason) -> str:
    """OpenAI's ``finish_reason`` for the wire's; a worker's error or cancel ends the stream with an error."""
    if reason == FinishReason.LENGTH:
        return "length"
    if reason == FinishReason.ERROR:
        raise StreamError(ErrorInfo(500, "generation failed on the worker", "engine_error"))
    if reason == FinishReason.CANCELLED:
        raise StreamError(ErrorInfo(503, "the worker cancelled the request", "cancelled"))
    return "stop"


class OutputState:
    """Turns a request's chunks into deltas; sets ``finish_reason`` when the request is done.

    Stop strings end the visible answer (they are matched in answer text, not in reasoning or tool calls).
    A request that ends normally after calling tools finishes with ``tool_calls``.
    """

    __slots__ = (
        "_parser",
        "_stops",
        "_remaining",
        "completion_tokens",
        "cached_tokens",
        "finish_reason",
        "backend_finished",
    )

    def __init__(
        self, parser: OutputParser, stops: list[str], max_tokens: int, include_stop: bool = False
    ) -> None:
        self._parser = parser
        self._stops = StopMatcher(stops, include_stop) if stops else None
        self._remaining = max_tokens
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finish_reason: str | None = None
        self.backend_finished = False  # the backend said it is done (vs. a stop string or max_tokens here)

    @property
    def reasoning_tokens(self) -> int:
        return self._parser.reasoning_tokens

    def process(self, chunk: GenerateChunk) -> Delta:
        """What ``chunk`` releases."""
        ids = chunk.token_ids
        finish = None
        if ids:
            n = len(ids)
            if n >= self._remaining:  # the backend should stop by itself; never exceed max_tokens anyway
                ids = ids[: self._remaining]
                n = self._remaining
                finish = "length"
            self._remaining -= n
            self.completion_tokens += n
            delta = self._parser.feed(ids)
        else:
            delta = Delta()
        if chunk.cached_tokens:
            self.cached_tokens = chunk.cached_tokens
        if chunk.finish_reason is not None:
            self.backend_finished = True
            finish = _finish_reason(chunk.finish_reason)
        return self._finish(delta, finish)

    def end(self) -> Delta:
        """The backend's stream ended without a finish reason."""
        self.backend_finished = True
        return self._finish(Delta(), "stop")

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended the answer (finish reason ``stop``), if one did."""
        return self._stops.matched if self._stops is not None else None

    def _finish(self, delta: Delta, finish: str | None) -> Delta:
        if finish is not None:
            delta.extend(self._parser.flush())
        if self._stops is not None:
            hit = False
            if delta.content:
                delta.content, hit = self._stops.feed(delta.content)
            if hit:
                finish = "stop"
            elif finish is not None:
                delta.content += self._stops.flush()
        if finish == "stop" and self._parser.tool_calls:
            finish = "tool_calls"
        self.finish_reason = finish
        return delta


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str = ""


@dataclass(slots=True)
class Transcript:
    """Everything a whole response returns, in order: ``items`` are ("reasoning" | "content", text) runs and
    ("tool_call", ToolCall), as the model produced them."""

    items: list[tuple[str, str | ToolCall]] = field(default_factory=list)
    _calls: dict[int, ToolCall] = field(default_factory=dict)

    def add(self, delta: Delta) -> None:
        if delta.reasoning:
            self._text("reasoning", delta.reasoning)
        if delta.content:
            self._text("content", delta.content)
        for part in delta.tool_calls:
            self._tool(part)

    def _text(self, kind: str, text: str) -> None:
        items = self.items
        if items and items[-1][0] == kind:
            items[-1] = (kind, items[-1][1] + text)  # type: ignore[operator]
        else:
            items.append((kind, text))

    def _tool(self, part: ToolCallDelta) -> None:
        call = self._calls.get(part.index)
        if call is None:
            call = self._calls[part.index] = ToolCall(part.id or "", part.name or "")
            self.items.append(("tool_call", call))
        call.arguments += part.arguments

    def text(self, kind: str) -> str:
        return "".join(v for k, v in self.items if k == kind)  # type: ignore[misc]

    @property
    def tool_calls(self) -> list[ToolCall]:
        return list(self._calls.values())
