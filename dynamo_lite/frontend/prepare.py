"""A parsed OpenAI request → validated, rendered and tokenized: a ``PreparedRequest`` for the backend.

The prompt is rendered from the model card (chat template or harmony, ``preprocess.py``) and tokenized; the
sampling options, stop strings, ``n``, logprobs, structured output (for reasoning models: the answer only,
with the reasoning budget, ``reasoning.py``), strict tools (``strict_tools.py``) and the context length are
checked here, each failure a 400 naming its field.
"""

from __future__ import annotations

import time
from typing import Any

from dynamo_lite.frontend import reasoning, strict_tools
from dynamo_lite.frontend.backend import Backend
from dynamo_lite.frontend.errors import OpenAIError, bad_request
from dynamo_lite.frontend.extra_fields import requested
from dynamo_lite.frontend.fields import tools_for_prompt
from dynamo_lite.frontend.guided import check_spec, guided_spec
from dynamo_lite.frontend.openai_protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponsesRequest,
)
from dynamo_lite.frontend.parsers.harmony import declared_functions
from dynamo_lite.frontend.prepared import CHAT, COMPLETIONS, RESPONSES, PreparedRequest
from dynamo_lite.frontend.preprocess import ModelPreprocessor, PreprocessorCache
from dynamo_lite.frontend.responses import ResponsesApi, ResponseStore, chat_tools, input_messages
from dynamo_lite.frontend.settings import FrontendSettings
from dynamo_lite.protocol import GenerateRequest, GuidedSpec, ModelCard, SamplingOptions

_SAMPLING = SamplingOptions()  # what a request leaves unsaid samples as the engines' defaults


def message_dict(message: ChatMessage) -> dict[str, Any]:
    """A chat message as the chat template reads it: text parts joined; other parts refused (400)."""
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise bad_request(f"content parts of type {part.type!r} are not supported", param="messages")
            texts.append(part.text)
        content = "\n".join(texts)
    out: dict[str, Any] = dict(message.model_extra) if message.model_extra else {}
    out["role"] = message.role
    out["content"] = content
    return out


def _stop_strings(stop: str | list[str] | None, settings: FrontendSettings) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > settings.max_stop_strings:
        raise bad_request(f"at most {settings.max_stop_strings} stop strings are supported", param="stop")
    if any(len(s) > settings.max_stop_string_chars for s in stops):
        raise bad_request(
            f"stop strings are limited to {settings.max_stop_string_chars} characters", param="stop"
        )
    return [s for s in stops if s]


def _first(*values: Any, default: Any) -> Any:
    for v in values:
        if v is not None:
            return v
    return default


class RequestPreparer:
    """Prepares parsed requests for the backend; holds the per-model preprocessors and the Responses store."""

    def __init__(self, backend: Backend, settings: FrontendSettings) -> None:
        self._backend = backend
        self._settings = settings
        self._models = PreprocessorCache(
            tokenize_in_thread_chars=settings.tokenize_in_thread_chars,
            files=getattr(backend, "card_files", None),  # the cards' model files, when published
        )
        self._responses = ResponseStore(settings.responses_store_size)

    def find_card(self, model: str) -> ModelCard:
        for card in self._backend.model_cards():
            if card.served_name == model:
                return card
        known = getattr(self._backend, "model_card", None)  # optional: known but not servable now
        card = known(model) if known is not None else None
        if card is not None:
            return card
        raise OpenAIError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")

    async def preprocessor(self, model: str) -> tuple[ModelCard, ModelPreprocessor]:
        """The card of a served ``model`` (404 otherwise) and its preprocessor."""
        card = self.find_card(model)
        return card, await self._models.get(card)

    def known_model(self, model: str | None) -> str:
        """``model`` if it is served (a safe metrics label), else ""."""
        if model and any(card.served_name == model for card in self._backend.model_cards()):
            return model
        return ""

    async def prepare_chat(self, req: ChatCompletionRequest, request_id: str) -> PreparedRequest:
        received = time.perf_counter()
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs: true", param="top_logprobs")
        guided = await _guided(req)
        card = self.find_card(req.model)
        pre = await self._models.get(card)
        tools = tools_for_prompt(req.tools, req.tool_choice)
        ids = await pre.chat_prompt_ids(
            [message_dict(m) for m in req.messages],
            add_generation_prompt=req.add_generation_prompt,
            tools=tools,
            reasoning_effort=req.effort(),
            extra=req.template_kwargs(),
        )
        max_tokens = _first(req.max_completion_tokens, req.max_tokens, default=None)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        prepared = self._prepare(
            CHAT, f"chatcmpl-{request_id}", request_id, req, card, pre, ids, max_tokens, logprobs
        )
        prepared = _with_guided(prepared, guided)
        prepared.functions = declared_functions(tools)
        strict_tools.apply(prepared.request.sampling, pre, tools)
        prepared.received = received
        return prepared

    async def prepare_responses(self, req: ResponsesRequest, request_id: str) -> PreparedRequest:
        received = time.perf_counter()
        if req.n not in (None, 1):
            raise bad_request("n must be 1 for responses", param="n")
        previous = None
        if req.previous_response_id is not None:
            previous = self._responses.get(req.previous_response_id)
            if previous is None:
                raise bad_request(
                    f"previous response {req.previous_response_id!r} is not stored on this frontend",
                    param="previous_response_id",
                )
        messages, conversation = input_messages(req, previous)
        guided = await _guided(req)
        card = self.find_card(req.model)
        pre = await self._models.get(card)
        tools = chat_tools(tools_for_prompt(req.tools, req.tool_choice))
        ids = await pre.chat_prompt_ids(
            messages,
            tools=tools,
            reasoning_effort=req.reasoning.effort if req.reasoning else None,
        )
        api = ResponsesApi(req, conversation, self._responses if req.store is not False else None)
        prepared = self._prepare(
            RESPONSES, api.response_id, request_id, req, card, pre, ids, req.max_output_tokens
        )
        prepared.responses = api
        prepared.functions = declared_functions(tools)
        strict_tools.apply(prepared.request.sampling, pre, tools)
        _with_guided(prepared, guided)
        prepared.created = api.created_at
        prepared.received = received
        return prepared

    async def prepare_completion(self, req: CompletionRequest, request_id: str) -> PreparedRequest:
        received = time.perf_counter()
        if req.echo and req.n not in (None, 1):
            raise bad_request("echo is supported with n = 1 only", param="echo")
        if req.best_of not in (None, 1):
            raise bad_request("best_of must be 1", param="best_of")
        if req.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        guided = await _guided(req)
        card = self.find_card(req.model)
        pre = await self._models.get(card)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise bad_request("only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = await pre.encode(prompt, add_special_tokens=True)
        else:
            ids = prompt
            if any(i < 0 or i >= pre.vocab_size for i in ids):
                raise bad_request(f"prompt token ids must be in [0, {pre.vocab_size})", param="prompt")
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = max(
                1, min(self._settings.completions_default_max_tokens, card.context_length - len(ids))
            )
        prepared = self._prepare(
            COMPLETIONS, f"cmpl-{request_id}", request_id, req, card, pre, ids, max_tokens, req.logprobs
        )
        if req.echo:
            prepared.echo = (
                prompt if isinstance(prompt, str) else pre.tokenizer.decode(ids, skip_special_tokens=False)
            )
            prepared.request.sampling.prompt_logprobs = req.logprobs  # scored by the engine, when asked
        prepared = _with_guided(prepared, guided)
        prepared.received = received
        return prepared

    def _prepare(
        self,
        endpoint: str,
        response_id: str,
        request_id: str,
        req: ChatCompletionRequest | CompletionRequest | ResponsesRequest,
        card: ModelCard,
        pre: ModelPreprocessor,
        ids: list[int],
        max_tokens: int | None,
        logprobs: int | None = None,
    ) -> PreparedRequest:
        param = {CHAT: "messages", COMPLETIONS: "prompt", RESPONSES: "input"}[endpoint]
        prompt_len = len(ids)
        if prompt_len == 0:
            raise bad_request("the prompt is empty", param=param)
        context = card.context_length
        if max_tokens is None:
            max_tokens = context - prompt_len
        if prompt_len + max_tokens > context or max_tokens <= 0:
            raise bad_request(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {param}, "
                f"{max_tokens} in the completion).",
                param=param,
                code="context_length_exceeded",
            )
        nv = req.nvext
        min_tokens = _first(req.min_tokens, nv and nv.min_tokens, default=_SAMPLING.min_tokens)
        if min_tokens > max_tokens:
            raise bad_request(
                f"min_tokens ({min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens"
            )
        stop_ids = req.stop_token_ids or []
        if any(i < 0 or i >= pre.vocab_size for i in stop_ids):
            raise bad_request(f"stop_token_ids must be in [0, {pre.vocab_size})", param="stop_token_ids")
        ignore_eos = _first(req.ignore_eos, nv and nv.ignore_eos, default=_SAMPLING.ignore_eos)
        if not ignore_eos:  # the model's own stop ids travel with the request to every engine
            stop_ids = [*stop_ids, *(i for i in pre.stop_token_ids if i not in stop_ids)]
        temperature = _first(req.temperature, default=_SAMPLING.temperature)
        if nv is not None and nv.greed_sampling:
            temperature = 0.0
        top_k = _first(req.top_k, nv and nv.top_k, default=_SAMPLING.top_k)
        sampling = SamplingOptions(
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            temperature=temperature,
            top_p=_first(req.top_p, default=_SAMPLING.top_p),
            top_k=max(top_k, 0),  # -1 (vLLM's "off") and 0 both mean off
            seed=req.seed,
            ignore_eos=ignore_eos,
            stop_token_ids=list(stop_ids),
            logprobs=logprobs,
            **_penalties(req, pre.vocab_size),
        )
        stream = bool(req.stream)
        options = req.stream_options if stream else None
        n = req.n if req.n is not None else 1
        if not 1 <= n <= self._settings.max_choices:
            raise bad_request(f"n must be in [1, {self._settings.max_choices}]", param="n")
        return PreparedRequest(
            endpoint=endpoint,
            response_id=response_id,
            created=int(time.time()),
            arrival=time.perf_counter(),
            request=GenerateRequest(
                request_id=request_id, model=card.served_name, token_ids=ids, sampling=sampling
            ),
            stops=_stop_strings(req.stop, self._settings),
            stream=stream,
            include_usage=options is not None and options.include_usage,
            pre=pre,
            continuous_usage=options is not None and options.continuous_usage_stats and endpoint != RESPONSES,
            extra_fields=requested(nv.extra_fields)
            if nv is not None and endpoint != RESPONSES
            else frozenset(),
            n=n,
            include_stop=bool(req.include_stop_str_in_output),
            budget=reasoning.requested_budget(req),
        )


async def _guided(
    req: ChatCompletionRequest | CompletionRequest | ResponsesRequest,
) -> tuple[GuidedSpec, str] | None:
    """The request's structured-output constraint and its field, compile-checked (400 naming the field)."""
    found = guided_spec(req)
    if found is not None:
        await check_spec(*found)
    return found


def _with_guided(p: PreparedRequest, guided: tuple[GuidedSpec, str] | None) -> PreparedRequest:
    """Structured output and the reasoning budget (``dynamo_lite.frontend.reasoning``): for a reasoning model
    the grammar constrains only the answer, which the engine finds through the request's ``ReasoningSpec``."""
    reasoning.apply(p.request.sampling, p.pre, p.budget, guided)
    return p


def _penalties(req: ChatCompletionRequest | CompletionRequest | ResponsesRequest, vocab_size: int) -> dict:
    """The request's penalties, min_p and logit_bias as ``SamplingOptions`` fields (ranges checked by the
    request model; logit_bias keys here)."""
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= token < vocab_size or not -100.0 <= value <= 100.0:
            raise bad_request(
                f"logit_bias maps token ids in [0, {vocab_size}) to values in [-100, 100]", param="logit_bias"
            )
        bias[token] = float(value)
    return {
        "presence_penalty": _first(req.presence_penalty, default=_SAMPLING.presence_penalty),
        "frequency_penalty": _first(req.frequency_penalty, default=_SAMPLING.frequency_penalty),
        "repetition_penalty": _first(req.repetition_penalty, default=_SAMPLING.repetition_penalty),
        "min_p": _first(req.min_p, default=_SAMPLING.min_p),
        "logit_bias": bias,
    }
