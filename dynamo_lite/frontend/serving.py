"""A parsed OpenAI request → token ids → the backend's stream → text, stop strings, usage → SSE or JSON.

The per-chunk path (``_stream``) is kept lean: one detokenizer call, one stop-string scan (only when the
request has stop strings), one preformatted byte chunk, one ``send``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from dynamo_lite import tracing
from dynamo_lite.frontend import choices as n_choices
from dynamo_lite.frontend import reasoning, strict_tools
from dynamo_lite.frontend.access_log import log_access
from dynamo_lite.frontend.backend import Backend
from dynamo_lite.frontend.chunks import (
    ChatStreamFormat,
    CompletionStreamFormat,
    chat_completion,
    text_completion,
    usage_dict,
    with_usage,
)
from dynamo_lite.frontend.errors import OpenAIError, as_openai_error, bad_request
from dynamo_lite.frontend.extra_fields import nvext_chunk, requested, with_nvext
from dynamo_lite.frontend.fields import tools_for_prompt
from dynamo_lite.frontend.guided import check_spec, guided_spec
from dynamo_lite.frontend.logprobs import ChatLogprobs, CompletionLogprobs, splice, token_bytes
from dynamo_lite.frontend.metrics import FrontendMetrics
from dynamo_lite.frontend.openai_protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponsesRequest,
)
from dynamo_lite.frontend.output import OutputState, Transcript
from dynamo_lite.frontend.parsers import Delta
from dynamo_lite.frontend.parsers.harmony import declared_functions
from dynamo_lite.frontend.preprocess import ModelPreprocessor, PreprocessorCache
from dynamo_lite.frontend.responses import ResponsesApi, ResponseStore, chat_tools, input_messages
from dynamo_lite.frontend.settings import FrontendSettings
from dynamo_lite.frontend.sse import JSON_HEADERS, SSE_HEADERS, BufferedBody, Exchange, WatchedResponse
from dynamo_lite.protocol import GenerateChunk, GenerateRequest, GuidedSpec, ModelCard, SamplingOptions
from dynamo_lite.timing import RequestTiming

logger = logging.getLogger(__name__)

CHAT, COMPLETIONS, RESPONSES = "chat", "completions", "responses"
_DRAIN_TIMEOUT_S = 5.0  # closing a backend stream must not hold a finished response hostage
_SEND_ERROR_TIMEOUT_S = 5.0  # delivering an error to a client that may have stopped reading


class StreamFormat(Protocol):
    """How one endpoint writes a streamed response (chat/completion chunks, Responses events)."""

    def head(self) -> bytes: ...

    def delta(self, d: Delta, finish_reason: str | None) -> bytes: ...

    def tail(self, usage: dict, finish_reason: str) -> bytes: ...

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
    n: int = 1  # choices (``dynamo_lite.frontend.choices`` when more than one)
    include_stop: bool = False  # include_stop_str_in_output: a matched stop string stays in the text
    echo: str | None = None  # completions' ``echo``: the prompt's text, before the completion's
    functions: frozenset[str] = frozenset()  # the function tools the prompt declared (the only tool calls)
    budget: tuple[int, str] | None = None  # the reasoning budget asked for, and its field

    def new_logprobs(self) -> ChatLogprobs | CompletionLogprobs | None:
        """The collector of this request's token logprobs (None: not asked for)."""
        if self.request.sampling.logprobs is None:
            return None
        if self.endpoint == CHAT:
            return ChatLogprobs(token_bytes(self.pre))
        prompt = self.request.token_ids if self.echo is not None else None
        return CompletionLogprobs(token_bytes(self.pre), prompt)

    @property
    def model(self) -> str:
        return self.request.model

    def stream_format(self, index: int = 0) -> StreamFormat:
        if self.responses is not None:
            return self.responses.stream_format()
        cls = ChatStreamFormat if self.endpoint == CHAT else CompletionStreamFormat
        return cls(self.response_id, self.created, self.model, self.include_usage, index)

    def body(self, transcript: Transcript, finish: str, usage: dict, logprobs: dict | None = None) -> bytes:
        if self.responses is not None:
            return self.responses.body(transcript, finish, usage)
        build = chat_completion if self.endpoint == CHAT else text_completion
        return build(self.response_id, self.created, self.model, transcript, finish, usage, logprobs)

    def usage(self, out: OutputState | n_choices.Choices) -> dict:
        reasoning = out.reasoning_tokens if self.pre.has_reasoning else None
        return usage_dict(len(self.request.token_ids), out.completion_tokens, out.cached_tokens, reasoning)


def _message_dict(message: ChatMessage) -> dict[str, Any]:
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


class CompletionService:
    """Turns parsed requests into responses; holds the per-model preprocessors."""

    def __init__(self, backend: Backend, settings: FrontendSettings, metrics: FrontendMetrics) -> None:
        self._backend = backend
        self._settings = settings
        self._metrics = metrics
        self._models = PreprocessorCache(
            tokenize_in_thread_chars=settings.tokenize_in_thread_chars,
            files=getattr(backend, "card_files", None),  # the cards' model files, when published
        )
        self._responses = ResponseStore(settings.responses_store_size)
        self.active = 0  # requests between accepted and their last byte (the in-flight bound counts these)

    # -- preprocessing ---------------------------------------------------------------------------------------

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
            [_message_dict(m) for m in req.messages],
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
        min_tokens = _first(req.min_tokens, nv and nv.min_tokens, default=0)
        if min_tokens > max_tokens:
            raise bad_request(
                f"min_tokens ({min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens"
            )
        stop_ids = req.stop_token_ids or []
        if any(i < 0 or i >= pre.vocab_size for i in stop_ids):
            raise bad_request(f"stop_token_ids must be in [0, {pre.vocab_size})", param="stop_token_ids")
        ignore_eos = _first(req.ignore_eos, nv and nv.ignore_eos, default=False)
        if not ignore_eos:  # the model's own stop ids travel with the request to every engine
            stop_ids = [*stop_ids, *(i for i in pre.stop_token_ids if i not in stop_ids)]
        temperature = _first(req.temperature, default=1.0)
        if nv is not None and nv.greed_sampling:
            temperature = 0.0
        top_k = _first(req.top_k, nv and nv.top_k, default=0)
        sampling = SamplingOptions(
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            temperature=temperature,
            top_p=_first(req.top_p, default=1.0),
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
        if not 1 <= n <= n_choices.MAX_CHOICES:
            raise bad_request(f"n must be in [1, {n_choices.MAX_CHOICES}]", param="n")
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

    # -- generation ------------------------------------------------------------------------------------------

    def response(self, p: PreparedRequest, request_id: str) -> WatchedResponse:
        rid = (b"x-request-id", request_id.encode())

        async def produce(ex: Exchange) -> None:
            self.active += 1
            try:
                await self._serve(p, ex, rid)
            finally:
                self.active -= 1

        return WatchedResponse(produce)

    async def _serve(self, p: PreparedRequest, ex: Exchange, rid: tuple[bytes, bytes]) -> None:
        """Run ``p`` on the backend under its deadlines and answer it, streamed or whole; failures become an
        error response (before the first byte) or the stream's error event (after)."""
        out: OutputState | n_choices.Choices
        if p.n > 1:
            out = n_choices.Choices(p, p.n)
        else:
            out = OutputState(
                p.pre.new_parser(p.functions), p.stops, p.request.sampling.max_tokens, p.include_stop
            )
        mm = self._metrics.model(p.model)
        settings = self._settings
        start = asyncio.get_running_loop().time() - (time.perf_counter() - p.arrival)
        mm.inflight.inc()
        mm.input_sequence.observe(len(p.request.token_ids))
        fmt = p.stream_format() if p.stream else None
        logprobs = p.new_logprobs()
        status = 200
        stream = None
        ttft_s = None
        # The router adds its part (instances, queue, prefill, decode) to the task's RequestTiming: the access
        # log names the instances, nvext.extra_fields returns the rest.
        rt = RequestTiming(p.received or p.arrival, preprocessed=p.arrival)
        rt.bind()
        report = None
        if p.extra_fields:
            report = lambda: rt.report(p.extra_fields, out.completion_tokens)  # noqa: E731
        root = _request_span(p)
        token = tracing.activate(root)
        try:
            first_deadline = start + min(settings.timeouts.first_token_s, settings.timeouts.request_s)
            async with asyncio.timeout_at(first_deadline) as t:
                if isinstance(out, n_choices.Choices):
                    requests = n_choices.choice_requests(p.request, p.n)
                    stream = n_choices.MergedStreams([self._backend.generate(p.model, r) for r in requests])
                else:
                    stream = self._backend.generate(p.model, p.request)
                first = await anext(stream, None)
                t.reschedule(start + settings.timeouts.request_s)
                first_at = time.perf_counter()
                ttft_s = first_at - p.arrival
                mm.ttft.observe(ttft_s)
                rt.first_token = first_at
                if isinstance(out, n_choices.Choices):
                    write = n_choices.write_stream if p.stream else n_choices.write_whole
                    await write(p, ex, rid, stream, first, out)
                elif fmt is not None:
                    await self._write_stream(p, ex, rid, fmt, stream, first, out, mm.itl, report, logprobs)
                else:
                    await self._write_whole(p, ex, rid, stream, first, out, mm.itl, report, logprobs)
                if root is not None:  # the output loop: detokenizing, stop strings, writing
                    tracing.past_span("detokenize", time.perf_counter() - first_at, parent=root)
        except asyncio.CancelledError:
            status = 499 if ex.disconnected else 503
            raise
        except Exception as exc:
            status = await self._report_failure(exc, ex, rid, fmt)
        finally:
            await self._close_stream(stream, backend_finished=out.backend_finished)
            tracing.deactivate(token)
            if root is not None:
                root.set_attribute("http.status_code", status)
                root.set_attribute("completion.tokens", out.completion_tokens)
                root.end()
            self._done(p, mm, out, status, ex)
            log_access(
                request_id=p.request.request_id,
                endpoint=p.endpoint,
                model=p.model,
                status=499 if ex.disconnected else status,
                prompt_tokens=len(p.request.token_ids),
                completion_tokens=out.completion_tokens,
                cached_tokens=out.cached_tokens,
                ttft_s=ttft_s,
                duration_s=time.perf_counter() - p.arrival,
                finish_reason=out.finish_reason,
                instances=rt.instances(),
            )

    @staticmethod
    async def _write_stream(
        p: PreparedRequest,
        ex: Exchange,
        rid: tuple[bytes, bytes],
        fmt: StreamFormat,
        stream: Any,
        chunk: GenerateChunk | None,
        out: OutputState,
        itl: Any,
        report: Callable[[], dict] | None,
        logprobs: ChatLogprobs | CompletionLogprobs | None = None,
    ) -> None:
        perf_counter = time.perf_counter
        now = perf_counter()
        await ex.start(200, [*SSE_HEADERS, rid])
        body = BufferedBody(ex)
        head = fmt.head()
        if head:
            body.add(head)
        echo = p.echo
        try:
            while True:
                counted = out.completion_tokens
                delta = out.process(chunk) if chunk is not None else out.end()
                if echo:  # the prompt goes out with the first event
                    delta.content, echo = echo + delta.content, None
                finish = out.finish_reason
                if logprobs is not None and chunk is not None:
                    logprobs.add(chunk, out.completion_tokens - counted)
                if delta or finish:
                    data = fmt.delta(delta, finish)
                    if data and logprobs is not None:
                        taken = logprobs.take()  # what arrived since the last event, with this event's text
                        data = splice(data, taken) if taken is not None else data
                    if data:
                        body.add(with_usage(data, p.usage(out)) if p.continuous_usage else data)
                if finish:
                    break
                chunk = await body.next_of(stream)
                if chunk is not None and chunk.token_ids:
                    t_chunk = perf_counter()
                    itl.observe((t_chunk - now) / len(chunk.token_ids))
                    now = t_chunk
        except Exception:
            await body.flush()  # the events that were ready go out before the error event
            raise
        if report is not None:
            obj = "chat.completion.chunk" if p.endpoint == CHAT else "text_completion"
            body.add(nvext_chunk(p.response_id, p.created, p.model, obj, report()))
        body.add(fmt.tail(p.usage(out), out.finish_reason or "stop"))
        await ex.end(body.take())

    @staticmethod
    async def _write_whole(
        p: PreparedRequest,
        ex: Exchange,
        rid: tuple[bytes, bytes],
        stream: Any,
        chunk: GenerateChunk | None,
        out: OutputState,
        itl: Any,
        report: Callable[[], dict] | None,
        logprobs: ChatLogprobs | CompletionLogprobs | None = None,
    ) -> None:
        transcript = Transcript()
        if p.echo:
            transcript.add(Delta(content=p.echo))
        now = time.perf_counter()
        while True:
            counted = out.completion_tokens
            transcript.add(out.process(chunk) if chunk is not None else out.end())
            if logprobs is not None and chunk is not None:
                logprobs.add(chunk, out.completion_tokens - counted)
            if out.finish_reason:
                break
            chunk = await anext(stream, None)
            if chunk is not None and chunk.token_ids:
                t_chunk = time.perf_counter()
                itl.observe((t_chunk - now) / len(chunk.token_ids))
                now = t_chunk
        whole = logprobs.whole() if logprobs is not None else None
        body = p.body(transcript, out.finish_reason or "stop", p.usage(out), whole)
        if report is not None:
            body = with_nvext(body, report())
        await ex.respond(200, [*JSON_HEADERS, rid], body)

    async def _report_failure(
        self, exc: Exception, ex: Exchange, rid: tuple[bytes, bytes], stream: StreamFormat | None
    ) -> int:
        """Tell the client in OpenAI's shape — an error event if the stream already started, else an error
        response — and return the status. Bounded: a client that stopped reading must not keep us alive."""
        err = as_openai_error(exc)
        self._metrics.error(err.type)
        try:
            async with asyncio.timeout(_SEND_ERROR_TIMEOUT_S):
                if ex.started and stream is not None:  # its last event says what failed
                    await ex.end(stream.error(err.body()))
                else:
                    await ex.respond(err.status, [*JSON_HEADERS, rid, *err.header_pairs()], err.body())
        except Exception:
            pass
        return err.status

    async def _close_stream(self, stream: Any, *, backend_finished: bool) -> None:
        """Close the backend stream. After its final chunk a well-behaved stream simply ends: drain it rather
        than close it, so the backend doesn't see a cancellation. Anything else is closed (= cancelled)."""
        if stream is None:
            return
        try:
            async with asyncio.timeout(_DRAIN_TIMEOUT_S):
                if backend_finished:
                    try:
                        await stream.__anext__()
                    except StopAsyncIteration:
                        return
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
        except Exception as e:
            logger.warning("closing the backend stream failed: %r", e)

    def _done(
        self, p: PreparedRequest, mm: Any, out: OutputState | n_choices.Choices, status: int, ex: Exchange
    ) -> None:
        mm.inflight.dec()
        mm.output_tokens.inc(out.completion_tokens)
        mm.output_sequence.observe(out.completion_tokens)
        mm.duration.observe(time.perf_counter() - p.arrival)
        if ex.disconnected:
            self._metrics.disconnects.inc()
        self._metrics.request_done(p.model, p.endpoint, status, p.stream)


def _request_span(p: PreparedRequest) -> Any:
    """The trace's root span for ``p`` (from its arrival) with its ``preprocess`` child; None when tracing is
    off."""
    received = p.received or p.arrival
    now = time.perf_counter()
    root = tracing.start_span(
        "request",
        start_s_ago=now - received,
        attributes={"request.id": p.request.request_id, "model": p.model, "endpoint": p.endpoint},
    )
    if root is not None:
        tracing.past_span(
            "preprocess",
            p.arrival - received,
            {"prompt.tokens": len(p.request.token_ids)},
            parent=root,
            ended_s_ago=now - p.arrival,
        )
    return root


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
        "presence_penalty": _first(req.presence_penalty, default=0.0),
        "frequency_penalty": _first(req.frequency_penalty, default=0.0),
        "repetition_penalty": _first(req.repetition_penalty, default=1.0),
        "min_p": _first(req.min_p, default=0.0),
        "logit_bias": bias,
    }
