"""A parsed OpenAI request → token ids → the backend's stream → text, stop strings, usage → SSE or JSON.

The per-chunk path (``_stream``) is kept lean: one detokenizer call, one stop-string scan (only when the
request has stop strings), one preformatted byte chunk, one ``send``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from dynamo_lite.frontend.backend import Backend
from dynamo_lite.frontend.chunks import (
    DONE,
    ChatStreamFormat,
    CompletionStreamFormat,
    chat_completion,
    error_event,
    text_completion,
    usage_dict,
)
from dynamo_lite.frontend.detokenize import Detokenizer, StopMatcher
from dynamo_lite.frontend.errors import OpenAIError, as_openai_error, bad_request
from dynamo_lite.frontend.metrics import FrontendMetrics
from dynamo_lite.frontend.openai_protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from dynamo_lite.frontend.preprocess import ModelPreprocessor, PreprocessorCache
from dynamo_lite.frontend.settings import FrontendSettings
from dynamo_lite.frontend.sse import JSON_HEADERS, SSE_HEADERS, Exchange, WatchedResponse
from dynamo_lite.protocol import (
    ErrorInfo,
    GenerateChunk,
    GenerateRequest,
    ModelCard,
    SamplingOptions,
    StreamError,
)

logger = logging.getLogger(__name__)

CHAT, COMPLETIONS = "chat", "completions"
_DRAIN_TIMEOUT_S = 5.0  # closing a backend stream must not hold a finished response hostage
_SEND_ERROR_TIMEOUT_S = 5.0  # delivering an error to a client that may have stopped reading


@dataclass(slots=True)
class PreparedRequest:
    """A validated request, tokenized and ready for the backend."""

    endpoint: str  # CHAT | COMPLETIONS
    response_id: str
    created: int
    arrival: float  # time.perf_counter() when the request arrived
    request: GenerateRequest
    stops: list[str]
    stream: bool
    include_usage: bool
    pre: ModelPreprocessor

    @property
    def model(self) -> str:
        return self.request.model


def _finish_reason(reason: str) -> str:
    if reason == "length":
        return "length"
    if reason == "error":
        raise StreamError(ErrorInfo(500, "generation failed on the worker", "engine_error"))
    if reason == "cancelled":
        raise StreamError(ErrorInfo(503, "the worker cancelled the request", "cancelled"))
    return "stop"


class OutputState:
    """What a request has produced so far: tokens counted, text released, why it finished."""

    __slots__ = (
        "_detok",
        "_stops",
        "_remaining",
        "completion_tokens",
        "cached_tokens",
        "finish_reason",
        "backend_finished",
    )

    def __init__(self, detok: Detokenizer, stops: list[str], max_tokens: int) -> None:
        self._detok = detok
        self._stops = StopMatcher(stops) if stops else None
        self._remaining = max_tokens
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finish_reason: str | None = None
        self.backend_finished = False  # the backend said it is done (vs. a stop string or max_tokens here)

    def process(self, chunk: GenerateChunk) -> str:
        """The text ``chunk`` releases; sets ``finish_reason`` when the request is done."""
        ids = chunk.token_ids
        finish = None
        text = ""
        if ids:
            n = len(ids)
            if n >= self._remaining:  # the backend should stop by itself; never exceed max_tokens anyway
                ids = ids[: self._remaining]
                n = self._remaining
                finish = "length"
            self._remaining -= n
            self.completion_tokens += n
            text = self._detok.step(ids)
        if chunk.cached_tokens:
            self.cached_tokens = chunk.cached_tokens
        if chunk.finish_reason is not None:
            self.backend_finished = True
            finish = _finish_reason(chunk.finish_reason)
        if self._stops is not None:
            text, hit = self._stops.feed(text)
            if hit:
                finish = "stop"
            elif finish is not None:
                text += self._stops.flush()
        self.finish_reason = finish
        return text

    def end(self) -> str:
        """The backend's stream ended without a finish reason: release what is held back."""
        self.finish_reason = "stop"
        self.backend_finished = True
        return self._stops.flush() if self._stops is not None else ""


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
        self._models = PreprocessorCache(tokenize_in_thread_chars=settings.tokenize_in_thread_chars)
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

    def known_model(self, model: str | None) -> str:
        """``model`` if it is served (a safe metrics label), else ""."""
        if model and any(card.served_name == model for card in self._backend.model_cards()):
            return model
        return ""

    async def prepare_chat(self, req: ChatCompletionRequest, request_id: str) -> PreparedRequest:
        _check_common(req)
        if req.logprobs:
            raise bad_request("logprobs are not supported", param="logprobs")
        if req.top_logprobs:
            raise bad_request("top_logprobs are not supported", param="top_logprobs")
        if req.response_format and req.response_format.get("type", "text") != "text":
            # structured output would be silently ignored: refuse it instead
            raise bad_request("only response_format type 'text' is supported", param="response_format")
        card = self.find_card(req.model)
        pre = await self._models.get(card)
        prompt = pre.render_chat(
            [_message_dict(m) for m in req.messages],
            add_generation_prompt=req.add_generation_prompt,
            tools=req.tools,
            extra=req.chat_template_kwargs,
        )
        # The template already wrote the special tokens (bos, role markers) as text.
        ids = await pre.encode(prompt, add_special_tokens=False)
        max_tokens = _first(req.max_completion_tokens, req.max_tokens, default=None)
        return self._prepare(CHAT, f"chatcmpl-{request_id}", request_id, req, card, pre, ids, max_tokens)

    async def prepare_completion(self, req: CompletionRequest, request_id: str) -> PreparedRequest:
        _check_common(req)
        if req.logprobs is not None:
            raise bad_request("logprobs are not supported", param="logprobs")
        if req.echo:
            raise bad_request("echo is not supported", param="echo")
        if req.best_of not in (None, 1):
            raise bad_request("best_of must be 1", param="best_of")
        if req.suffix:
            raise bad_request("suffix is not supported", param="suffix")
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
        return self._prepare(COMPLETIONS, f"cmpl-{request_id}", request_id, req, card, pre, ids, max_tokens)

    def _prepare(
        self,
        endpoint: str,
        response_id: str,
        request_id: str,
        req: ChatCompletionRequest | CompletionRequest,
        card: ModelCard,
        pre: ModelPreprocessor,
        ids: list[int],
        max_tokens: int | None,
    ) -> PreparedRequest:
        param = "messages" if endpoint == CHAT else "prompt"
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
            ignore_eos=_first(req.ignore_eos, nv and nv.ignore_eos, default=False),
            stop_token_ids=list(stop_ids),
        )
        stream = bool(req.stream)
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
            include_usage=stream and req.stream_options is not None and req.stream_options.include_usage,
            pre=pre,
        )

    # -- generation ------------------------------------------------------------------------------------------

    def response(self, p: PreparedRequest, request_id: str) -> WatchedResponse:
        rid = (b"x-request-id", request_id.encode())

        async def produce(ex: Exchange) -> None:
            self.active += 1
            try:
                if p.stream:
                    await self._stream(p, ex, rid)
                else:
                    await self._complete(p, ex, rid)
            finally:
                self.active -= 1

        return WatchedResponse(produce)

    async def _stream(self, p: PreparedRequest, ex: Exchange, rid: tuple[bytes, bytes]) -> None:
        fmt_cls = ChatStreamFormat if p.endpoint == CHAT else CompletionStreamFormat
        fmt = fmt_cls(p.response_id, p.created, p.model)
        out = OutputState(p.pre.detokenizer(), p.stops, p.request.sampling.max_tokens)
        mm = self._metrics.model(p.model)
        itl = mm.itl
        perf_counter = time.perf_counter
        settings = self._settings
        loop = asyncio.get_running_loop()
        start = loop.time() - (perf_counter() - p.arrival)
        mm.inflight.inc()
        mm.input_tokens.inc(len(p.request.token_ids))
        status = 200
        started = False
        stream = None
        try:
            first_deadline = start + min(settings.first_token_timeout_s, settings.request_timeout_s)
            async with asyncio.timeout_at(first_deadline) as t:
                stream = self._backend.generate(p.model, p.request)
                try:
                    chunk: GenerateChunk | None = await stream.__anext__()
                except StopAsyncIteration:
                    chunk = None
                t.reschedule(start + settings.request_timeout_s)
                now = perf_counter()
                mm.ttft.observe(now - p.arrival)
                await ex.start(200, [*SSE_HEADERS, rid])
                started = True
                first = True
                while True:
                    text = out.process(chunk) if chunk is not None else out.end()
                    finish = out.finish_reason
                    if text or finish:
                        await ex.body(fmt.chunk(text, finish, first))
                        first = False
                    if finish:
                        break
                    try:
                        chunk = await stream.__anext__()
                    except StopAsyncIteration:
                        chunk = None
                        continue
                    n = len(chunk.token_ids)
                    if n:
                        t_chunk = perf_counter()
                        itl.observe((t_chunk - now) / n)
                        now = t_chunk
                if p.include_usage:
                    usage = usage_dict(len(p.request.token_ids), out.completion_tokens, out.cached_tokens)
                    await ex.body(fmt.usage(usage))
                await ex.end(DONE)
        except asyncio.CancelledError:
            status = 499 if ex.disconnected else 503
            raise
        except Exception as exc:
            status = await self._report_failure(exc, ex, rid, stream_started=started)
        finally:
            await self._close_stream(stream, backend_finished=out.backend_finished)
            self._done(p, mm, out, status, ex)

    async def _complete(self, p: PreparedRequest, ex: Exchange, rid: tuple[bytes, bytes]) -> None:
        out = OutputState(p.pre.detokenizer(), p.stops, p.request.sampling.max_tokens)
        mm = self._metrics.model(p.model)
        settings = self._settings
        loop = asyncio.get_running_loop()
        start = loop.time() - (time.perf_counter() - p.arrival)
        mm.inflight.inc()
        mm.input_tokens.inc(len(p.request.token_ids))
        status = 200
        stream = None
        parts: list[str] = []
        try:
            first_deadline = start + min(settings.first_token_timeout_s, settings.request_timeout_s)
            async with asyncio.timeout_at(first_deadline) as t:
                stream = self._backend.generate(p.model, p.request)
                now = 0.0
                while True:
                    try:
                        chunk = await stream.__anext__()
                    except StopAsyncIteration:
                        parts.append(out.end())
                        break
                    t_chunk = time.perf_counter()
                    if now == 0.0:
                        t.reschedule(start + settings.request_timeout_s)
                        mm.ttft.observe(t_chunk - p.arrival)
                    elif chunk.token_ids:
                        mm.itl.observe((t_chunk - now) / len(chunk.token_ids))
                    now = t_chunk
                    parts.append(out.process(chunk))
                    if out.finish_reason:
                        break
                usage = usage_dict(len(p.request.token_ids), out.completion_tokens, out.cached_tokens)
                build = chat_completion if p.endpoint == CHAT else text_completion
                body = build(
                    p.response_id, p.created, p.model, "".join(parts), out.finish_reason or "stop", usage
                )
                await ex.respond(200, [*JSON_HEADERS, rid], body)
        except asyncio.CancelledError:
            status = 499 if ex.disconnected else 503
            raise
        except Exception as exc:
            status = await self._report_failure(exc, ex, rid, stream_started=False)
        finally:
            await self._close_stream(stream, backend_finished=out.backend_finished)
            self._done(p, mm, out, status, ex)

    async def _report_failure(
        self, exc: Exception, ex: Exchange, rid: tuple[bytes, bytes], *, stream_started: bool
    ) -> int:
        """Tell the client in OpenAI's shape — an error event if the stream already started, else an error
        response — and return the status. Bounded: a client that stopped reading must not keep us alive."""
        err = as_openai_error(exc)
        self._metrics.error(err.type)
        try:
            async with asyncio.timeout(_SEND_ERROR_TIMEOUT_S):
                if stream_started:
                    await ex.body(error_event(err.body()))
                    await ex.end(DONE)
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

    def _done(self, p: PreparedRequest, mm: Any, out: OutputState, status: int, ex: Exchange) -> None:
        mm.inflight.dec()
        mm.output_tokens.inc(out.completion_tokens)
        mm.duration.observe(time.perf_counter() - p.arrival)
        if ex.disconnected:
            mm.disconnects.inc()
        self._metrics.request_done(p.model, p.endpoint, status)


def _check_common(req: ChatCompletionRequest | CompletionRequest) -> None:
    if req.n not in (None, 1):
        raise bad_request("n must be 1: one choice per request is supported", param="n")
