"""OpenAI request bodies as pydantic models: strict types (``"5"`` is not an int), extensions under ``nvext`` or
at the top level. Extra fields are kept here; ``fields.py`` decides what each field the client sent does (honoured,
refused with a 400, unknown)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dynamo_lite.protocol import MAX_LOGPROBS

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Model):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far in every chunk


class NvExt(_Model):
    """NVIDIA extensions (Dynamo/Triton style); the same fields are also accepted at the top level."""

    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    top_k: int | None = Field(default=None, ge=-1)
    greed_sampling: bool | None = None
    # Structured output (Dynamo's names; ``dynamo_lite.frontend.guided``): a schema (object or JSON text), a
    # regex, or choices.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # refused: no EBNF grammars
    extra_fields: list[str] | None = None  # response metadata to return: "timing", "worker_id"


class ContentPart(_Model):
    type: str
    text: str | None = None


class ChatMessage(_Model):
    role: str
    content: str | list[ContentPart] | None = None


class _GenerationParams(_Model):
    """Fields shared by chat and legacy completions."""

    model: str
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = Field(default=None, ge=_INT64_MIN, le=_INT64_MAX)
    n: int | None = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    user: str | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    nvext: NvExt | None = None


class ChatCompletionRequest(_GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template_args: dict[str, Any] | None = None  # Dynamo's name for chat_template_kwargs
    reasoning_effort: str | None = None
    response_format: dict[str, Any] | None = None

    def effort(self) -> str | None:
        """``reasoning_effort``: top level, else inside ``chat_template_kwargs`` / ``chat_template_args``."""
        if self.reasoning_effort is not None:
            return self.reasoning_effort
        for kwargs in (self.chat_template_kwargs, self.chat_template_args):
            if kwargs and kwargs.get("reasoning_effort") is not None:
                return str(kwargs["reasoning_effort"])
        return None

    def template_kwargs(self) -> dict[str, Any] | None:
        if self.chat_template_args and self.chat_template_kwargs:
            return {**self.chat_template_args, **self.chat_template_kwargs}
        return self.chat_template_kwargs or self.chat_template_args


class CompletionRequest(_GenerationParams):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None
    response_format: dict[str, Any] | None = None


class ReasoningOptions(_Model):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(_GenerationParams):
    """``POST /v1/responses`` (OpenAI Responses API): ``input`` is a string or a list of items (messages,
    ``function_call``, ``function_call_output``, ``reasoning``)."""

    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    reasoning: ReasoningOptions | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    text: dict[str, Any] | None = None
