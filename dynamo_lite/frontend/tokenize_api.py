"""``POST /tokenize`` and ``POST /detokenize`` in vLLM's shapes, through the very preprocessing a chat or
completion request goes through (the model's chat template, or harmony for gpt-oss).

>>> # POST /tokenize {"model": "m", "prompt": "Hello"}  ->  {"count": 2, "max_model_len": 8192, "tokens": [...]}
>>> # POST /tokenize {"model": "m", "messages": [...], "add_generation_prompt": true}  ->  the chat prompt's ids
>>> # POST /detokenize {"model": "m", "tokens": [1, 2]}  ->  {"prompt": "..."}
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from dynamo_lite.frontend.errors import bad_request
from dynamo_lite.frontend.fields import tools_for_prompt
from dynamo_lite.frontend.openai_protocol import ChatMessage
from dynamo_lite.frontend.prepare import message_dict
from dynamo_lite.frontend.preprocess import ModelPreprocessor
from dynamo_lite.protocol import ModelCard


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # an unknown field is a 400 naming it


class TokenizeCompletionRequest(_Strict):
    model: str
    prompt: str
    add_special_tokens: bool = True  # as /v1/completions encodes a text prompt
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str
    tokens: list[int]


def parse_tokenize(body: bytes) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """A body with ``messages`` is a chat; anything else a prompt."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    schema = TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest
    return schema.model_validate(data)


async def tokenize(
    req: TokenizeCompletionRequest | TokenizeChatRequest,
    card: ModelCard,
    pre: ModelPreprocessor,
) -> dict[str, Any]:
    """The ids the request's prompt becomes: the same ids /v1/chat/completions or /v1/completions sends."""
    if isinstance(req, TokenizeChatRequest):
        ids = await pre.chat_prompt_ids(
            [message_dict(m) for m in req.messages],
            add_generation_prompt=req.add_generation_prompt,
            tools=tools_for_prompt(req.tools, req.tool_choice),
            reasoning_effort=req.reasoning_effort,
            extra=req.chat_template_kwargs,
        )
    else:
        ids = await pre.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    out: dict[str, Any] = {"count": len(ids), "max_model_len": card.context_length, "tokens": ids}
    out["token_strs"] = [pre.tokenizer.id_to_token(i) for i in ids] if req.return_token_strs else None
    return out


def detokenize(req: DetokenizeRequest, pre: ModelPreprocessor) -> dict[str, Any]:
    """The text of ``req.tokens``, special tokens included (a tokenized chat prompt reads back whole)."""
    if any(i < 0 or i >= pre.vocab_size for i in req.tokens):
        raise bad_request(f"token ids must be in [0, {pre.vocab_size})", param="tokens")
    return {"prompt": pre.tokenizer.decode(req.tokens, skip_special_tokens=False)}
