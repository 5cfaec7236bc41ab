"""The TensorRT-LLM engine: one ``LLM`` (PyTorch backend), one ``generate_async`` per request.

What each phase asks of TensorRT-LLM:

- ``PREFILL``: a ``context_only`` request with ``max_tokens=1``. Its one output carries the first token and
  ``disaggregated_params``; we return them as ``GenerateChunk(token_ids=[first], kv=KvDescriptor(...))``, the
  params encoded in ``kv.opaque`` (``disagg.py``). TensorRT-LLM keeps the prompt's KV until the decode side
  pulls it. If the request ends on that token (EOS or a stop token) the chunk has ``finish_reason`` and no
  ``kv``. A request whose ``max_tokens`` is 1 runs as a plain request: nothing is kept for a transfer that
  would never come.
- ``DECODE``: a ``generation_only`` request built from ``kv.opaque``, on the same prompt; TensorRT-LLM pulls
  the KV from the prefill worker (UCX/NIXL) and streams. Its output starts with the prefill's first token,
  which the caller already has (``request.generated_ids``): we skip it and stream the rest as deltas. A
  missing or unusable descriptor, or a request that fails before its first output (the transfer failed), is
  recomputed from the prompt when ``kv_failure_policy`` is ``recompute``, else refused with 503.
- ``AGGREGATED``: a plain streaming request.

TensorRT-LLM reports cumulative ``token_ids`` per output (several new tokens at a time with
``stream_interval``); each chunk we yield carries exactly the new ones, and outputs closer together than the
worker's pacing interval (``StreamPacing``: ``--stream-interval-ms``, raised under load to stay within
``--max-messages-per-s``) travel as one chunk. Closing the ``generate()`` iterator,
or cancelling its consumer, calls ``abort()`` on the request — for a generation-only request only after its
first output, because aborting one whose KV is still in flight can leave the transfer half done (bounded by
``TrtllmLimits``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import msgspec

from dynamo_lite.engines.base import EngineError, EngineSettings, EngineStats, StreamPacing
from dynamo_lite.engines.trtllm.api import TrtllmApi
from dynamo_lite.engines.trtllm.args import describe_sources
from dynamo_lite.engines.trtllm.disagg import (
    DisaggParamsError,
    decode_disaggregated_params,
    encode_disaggregated_params,
    field_names,
    generation_only_params,
)
from dynamo_lite.engines.trtllm.logprobs import generated_logprobs, prompt_logprobs
from dynamo_lite.engines.trtllm.sampling import sampling_kwargs
from dynamo_lite.kv.blocks import KvEventSink
from dynamo_lite.model_files import ModelFiles
from dynamo_lite.protocol import (
    EngineKind,
    FinishReason,
    GenerateChunk,
    GenerateRequest,
    KvDescriptor,
    Phase,
    TokenLogprobs,
)

logger = logging.getLogger(__name__)

_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "cancelled": FinishReason.CANCELLED,
}


@dataclass(frozen=True, slots=True)
class TrtllmLimits:
    """Time limits of the TensorRT-LLM engine."""

    deferred_abort_timeout_s: float = 60.0
    """A generation-only request closed before its KV arrived is aborted after its first output, or then."""


@dataclass(slots=True)
class _Plan:
    """One ``generate_async`` call and how to turn its outputs into chunks."""

    inputs: list[int]
    params: Any  # tensorrt_llm.SamplingParams
    max_tokens: int
    disagg: Any = None  # tensorrt_llm.DisaggregatedParams
    streaming: bool = True
    skip: int = 0  # leading output tokens the caller already has
    cached_tokens: int = 0
    context_only: bool = False
    kv_import: bool = False
    logprobs: int | None = None  # alternatives per generated token the request asked for (None: no logprobs)
    prompt_logprobs: int | None = None  # alternatives per prompt token (None: the prompt is not scored)
    prompt_len: int = 0  # the request's prompt: ``inputs[:prompt_len]``


class _KvImportFailed(Exception):
    """A generation-only request could not get its KV (raised before any token was yielded)."""


class TrtllmEngine:
    """Engine over TensorRT-LLM's LLM API. Build it with ``dynamo_lite.engines.trtllm.build_engine``."""

    name = EngineKind.TRTLLM

    def __init__(
        self,
        settings: EngineSettings,
        llm_args: dict[str, Any],
        api: TrtllmApi,
        model_files: ModelFiles,
        limits: TrtllmLimits | None = None,
    ) -> None:
        self.settings = settings
        self.llm_args = llm_args
        self.model_files = model_files  # tokenizer, chat template and config for the worker's model card
        self.pacing = StreamPacing()  # the worker's (adapted to the load); by default every output
        self.on_kv_event: KvEventSink | None = None  # TensorRT-LLM's KV events are not forwarded (yet)
        self._api = api
        self._limits = limits or TrtllmLimits()
        self._llm: Any = None
        self._stats = EngineStats()
        self._inflight: set[Any] = set()
        self._background: set[asyncio.Task[None]] = set()
        # Finished context-only requests whose KV TensorRT-LLM holds for a decode worker: transfer id →
        # (request output, when we stop tracking it). ``release_kv`` aborts one nobody will pull.
        self._held: dict[str, tuple[Any, float]] = {}
        self.kv_release_subject = ""  # set by the worker: where routers send ``KvRelease`` for our KV
        self.on_kv_unused: Callable[[KvDescriptor], None] | None = None  # set by the worker (decode side)
        self.kv_releases = 0
        params_fields = field_names(api.DisaggregatedParams)
        self._sets_disagg_request_id = "disagg_request_id" in params_fields

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model. Blocks the event loop while TensorRT-LLM loads (minutes for a large model): it
        starts its MPI workers from the calling thread, as TensorRT-LLM's own servers do. Start it before
        registering in discovery."""
        if self._llm is not None:
            return
        logger.info(
            "trtllm %s engine args: %s", self._api.version, describe_sources(self.settings, self.llm_args)
        )
        kwargs = self._api.materialize(self.llm_args)
        try:
            self._llm = self._api.LLM(**kwargs)
        except Exception as e:
            detail = " ".join(str(e).split())[:500]
            raise EngineError(
                f"TensorRT-LLM could not load {self.llm_args.get('model')}: {type(e).__name__}: {detail}",
                status=503,
                code="engine_start_failed",
            ) from e

    async def stop(self) -> None:
        for result in list(self._inflight):
            _abort_now(result)
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()

    def stats(self) -> EngineStats:
        return dataclasses.replace(self._stats)

    # -- requests --------------------------------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        return self._generate(request)

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        if self._llm is None:
            raise EngineError("the TensorRT-LLM engine is not started", status=503, code="engine_not_ready")
        plan = self._plan(request)
        while True:
            if isinstance(plan, GenerateChunk):
                yield plan
                return
            try:
                async with aclosing(self._run(self._llm, plan)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                return
            except _KvImportFailed as e:
                plan = self._after_kv_failure(request, str(e))

    def _plan(self, request: GenerateRequest) -> _Plan | GenerateChunk:
        if not request.token_ids:
            raise EngineError("the prompt is empty", status=400, code="invalid_request")
        if request.phase == Phase.PREFILL:
            return self._prefill_plan(request)
        if request.phase == Phase.DECODE:
            return self._decode_plan(request)
        return self._full_plan(request)

    def _full_plan(self, request: GenerateRequest) -> _Plan | GenerateChunk:
        """Prompt plus any tokens already generated, computed from scratch."""
        max_tokens = request.sampling.max_tokens - len(request.generated_ids)
        if max_tokens <= 0:
            return GenerateChunk(finish_reason=FinishReason.LENGTH)
        inputs = [*request.token_ids, *request.generated_ids]
        # With tokens already generated the prompt was scored where they were (a prefill): not again.
        scored = not request.generated_ids
        return self._with_logprobs(
            _Plan(inputs, self._sampling(request, max_tokens, scored), max_tokens), request, scored
        )

    def _prefill_plan(self, request: GenerateRequest) -> _Plan | GenerateChunk:
        if request.generated_ids:
            raise EngineError(
                "a prefill request carries no generated tokens", status=400, code="invalid_request"
            )
        if request.sampling.max_tokens <= 0:
            return GenerateChunk(finish_reason=FinishReason.LENGTH)
        inputs = list(request.token_ids)
        params = self._sampling(request, 1)
        if request.sampling.max_tokens == 1:
            return self._with_logprobs(_Plan(inputs, params, 1, streaming=False), request)
        fields: dict[str, Any] = {"request_type": "context_only"}
        if self._sets_disagg_request_id:
            # Newer releases (1.2 on) identify a disaggregated request by one id on both sides.
            fields["disagg_request_id"] = secrets.randbits(62) or 1
        disagg = self._api.DisaggregatedParams(**fields)
        plan = _Plan(inputs, params, 1, disagg=disagg, streaming=False, context_only=True)
        return self._with_logprobs(plan, request)  # the first token's ride on the prefill result

    def _decode_plan(self, request: GenerateRequest) -> _Plan | GenerateChunk:
        kv = request.kv
        if kv is None or kv.engine != self.name or not kv.opaque:
            what = (
                "no KV descriptor"
                if kv is None
                else f"a {str(kv.engine)!r} KV descriptor without TensorRT-LLM state"
            )
            return self._after_kv_failure(request, what)
        try:
            fields = decode_disaggregated_params(kv.opaque)
        except DisaggParamsError as e:
            return self._after_kv_failure(request, f"KV descriptor {kv.transfer_id}: {e}")
        first = fields["first_gen_tokens"]
        generated = list(request.generated_ids)
        if generated != first[: len(generated)] or len(generated) > len(first):
            return self._after_kv_failure(request, "generated_ids do not match the prefill's first token")
        if request.sampling.max_tokens <= len(generated):
            return GenerateChunk(finish_reason=FinishReason.LENGTH)
        max_tokens = request.sampling.max_tokens  # the output includes the first token(s), as does max_tokens
        plan = _Plan(
            list(request.token_ids),
            self._sampling(request, max_tokens, scored=False),  # the prefill scored the prompt
            max_tokens,
            disagg=generation_only_params(self._api.DisaggregatedParams, fields),
            skip=len(generated),
            cached_tokens=len(request.token_ids),
            kv_import=True,
        )
        return self._with_logprobs(plan, request, scored=False)

    def _after_kv_failure(self, request: GenerateRequest, reason: str) -> _Plan | GenerateChunk:
        if request.kv is not None and request.kv.release_subject and self.on_kv_unused is not None:
            self.on_kv_unused(request.kv)  # whatever happens now, nobody will pull that prefill's KV
        if self.settings.kv_failure_policy != "recompute":
            raise EngineError(f"KV import failed: {reason}", status=503, code="kv_transfer_failed")
        logger.warning(
            "request %s: KV import failed (%s); recomputing the prompt", request.request_id, reason
        )
        self._stats.kv_recomputes += 1
        return self._full_plan(request)

    @staticmethod
    def _with_logprobs(plan: _Plan, request: GenerateRequest, scored: bool = True) -> _Plan:
        plan.logprobs = request.sampling.logprobs
        plan.prompt_logprobs = request.sampling.prompt_logprobs if scored else None
        plan.prompt_len = len(request.token_ids)
        return plan

    def _sampling(self, request: GenerateRequest, max_tokens: int, scored: bool = True) -> Any:
        options = request.sampling
        if not scored and options.prompt_logprobs is not None:
            options = msgspec.structs.replace(options, prompt_logprobs=None)
        kwargs = sampling_kwargs(options, max_tokens=max_tokens)
        try:
            if "guided_decoding" in kwargs:
                kwargs["guided_decoding"] = self._guided_decoding(kwargs["guided_decoding"])
            return self._api.SamplingParams(**kwargs)
        except (TypeError, ValueError) as e:
            raise EngineError(f"invalid sampling options: {e}", status=400, code="invalid_request") from e

    def _guided_decoding(self, kwargs: dict[str, Any]) -> Any:
        """TensorRT-LLM's ``GuidedDecodingParams``; refused (400) unless the LLM was built with a grammar
        backend (``guided_decoding_backend: xgrammar`` in the engine args), which TensorRT-LLM needs to honour it."""
        if self._api.GuidedDecodingParams is None:
            raise EngineError(
                f"structured output: TensorRT-LLM {self._api.version} has no GuidedDecodingParams",
                status=400,
                code="invalid_request",
            )
        if not self.llm_args.get("guided_decoding_backend"):
            raise EngineError(
                "structured output is off on this worker: start it with guided_decoding_backend: xgrammar "
                "in --extra-engine-args",
                status=400,
                code="invalid_request",
            )
        return self._api.GuidedDecodingParams(**kwargs)

    async def _run(self, llm: Any, plan: _Plan) -> AsyncIterator[GenerateChunk]:
        started = time.perf_counter()
        try:
            result = llm.generate_async(
                plan.inputs,
                sampling_params=plan.params,
                disaggregated_params=plan.disagg,
                streaming=plan.streaming,
            )
        except ValueError as e:  # TensorRT-LLM's input checks: prompt too long for max_seq_len, ...
            raise EngineError(
                f"TensorRT-LLM refused the request: {e}", status=400, code="invalid_request"
            ) from e
        except Exception as e:
            raise EngineError(f"TensorRT-LLM: {type(e).__name__}: {e}", status=500) from e
        self._stats.active_seqs += 1
        self._inflight.add(result)
        sent = plan.skip
        got_output = False
        over = False
        # The worker's pacing (--stream-interval-ms, adapted to --max-messages-per-s): outputs that come sooner
        # than the interval after the last chunk wait and go with the next one (the first and last never wait).
        held: list[int] = []
        held_logprobs: TokenLogprobs | None = None
        scored: TokenLogprobs | None = None  # the prompt's logprobs, until a chunk takes them
        scored_once = plan.prompt_logprobs is None
        next_chunk_at = 0.0
        loop = asyncio.get_running_loop()
        try:
            async for out in result:
                if not got_output:
                    got_output = True
                    if plan.kv_import:
                        self._stats.kv_transfers += 1
                        self._stats.kv_transfer_seconds += time.perf_counter() - started
                completion = out.outputs[0]
                ids = completion.token_ids
                new = list(ids[sent:])
                if plan.logprobs is not None and new:
                    lp = generated_logprobs(completion, ids, sent, plan.logprobs)
                    held_logprobs = lp if held_logprobs is None else _joined(held_logprobs, lp)
                if not scored_once:
                    scored = prompt_logprobs(
                        completion, plan.inputs[: plan.prompt_len], plan.prompt_logprobs or 0
                    )
                    scored_once = scored is not None
                sent = max(sent, len(ids))
                self._stats.total_tokens += len(new)
                if out.finished:
                    over = True
                    chunk = self._final_chunk(plan, out, completion, held + new, len(ids))
                    chunk.logprobs, chunk.prompt_logprobs = (
                        _trimmed(held_logprobs, len(chunk.token_ids)),
                        scored,
                    )
                    if chunk.kv is not None:
                        self._hold(chunk.kv.transfer_id, result)
                    yield chunk
                    return
                held += new
                if held and loop.time() >= next_chunk_at:
                    chunk = GenerateChunk(
                        token_ids=held,
                        cached_tokens=plan.cached_tokens,
                        logprobs=held_logprobs,
                        prompt_logprobs=scored,
                    )
                    held, held_logprobs, scored = [], None, None
                    next_chunk_at = loop.time() + self.pacing.interval_s
                    yield chunk
            over = True
            raise EngineError("TensorRT-LLM ended the stream before the request finished", status=500)
        except (EngineError, _KvImportFailed):
            over = True
            raise
        except Exception as e:  # tensorrt_llm.executor.utils.RequestError and friends
            over = True
            if plan.kv_import and not got_output:
                raise _KvImportFailed(f"{type(e).__name__}: {e}") from e
            raise EngineError(f"TensorRT-LLM: {type(e).__name__}: {e}", status=500) from e
        finally:
            self._stats.active_seqs -= 1
            self._inflight.discard(result)
            if not over:
                self._abort(result, after_first_output=plan.kv_import and not got_output)

    def _final_chunk(
        self, plan: _Plan, out: Any, completion: Any, new: list[int], produced: int
    ) -> GenerateChunk:
        reason = completion.finish_reason
        if reason == "timeout":
            if plan.kv_import and produced <= plan.skip:
                raise _KvImportFailed("TensorRT-LLM timed out waiting for the KV")
            raise EngineError("TensorRT-LLM timed out the request", status=504, code="engine_timeout")
        finish = _FINISH_REASONS.get(reason)
        if finish is None:
            finish = FinishReason.LENGTH if produced >= plan.max_tokens else FinishReason.STOP
        if plan.context_only and finish not in (FinishReason.STOP, FinishReason.CANCELLED):
            return GenerateChunk(token_ids=new, kv=self._kv_descriptor(plan, out, completion))
        return GenerateChunk(token_ids=new, finish_reason=finish, cached_tokens=plan.cached_tokens)

    def _kv_descriptor(self, plan: _Plan, out: Any, completion: Any) -> KvDescriptor:
        params = getattr(completion, "disaggregated_params", None) or getattr(
            out, "disaggregated_params", None
        )
        if params is None:
            raise EngineError(
                "TensorRT-LLM returned no disaggregated_params for a context-only request "
                "(is cache_transceiver_config set?)",
                status=500,
            )
        try:
            opaque = encode_disaggregated_params(params)
        except DisaggParamsError as e:
            raise EngineError(str(e), status=500) from e
        request_id = params.ctx_request_id
        if request_id is None:
            request_id = getattr(params, "disagg_request_id", None)
        return KvDescriptor(
            transfer_id=str(request_id),
            engine=self.name,
            num_tokens=len(plan.inputs),
            nbytes=0,
            opaque=opaque,
            lease_s=self.settings.kv_lease_s,
            release_subject=self.kv_release_subject,
        )

    # -- KV held for decode workers --------------------------------------------------------------------------

    def _hold(self, transfer_id: str, result: Any) -> None:
        now = time.monotonic()
        for key in [k for k, (_, until) in self._held.items() if until < now]:
            del self._held[key]  # pulled, or freed by TensorRT-LLM's kv_transfer_timeout_ms by now
        self._held[transfer_id] = (result, now + self.settings.kv_lease_s)

    def release_kv(self, transfer_id: str) -> bool:
        """Nobody will pull this context-only result's KV: abort the request, so TensorRT-LLM frees it now
        rather than at ``cache_transceiver_config.kv_transfer_timeout_ms``. False if we hold no such KV."""
        held = self._held.pop(transfer_id, None)
        if held is None:
            return False
        _abort_now(held[0])
        self.kv_releases += 1
        logger.info("released unpulled KV %s (context request aborted)", transfer_id)
        return True

    # -- cancellation ----------------------------------------------------------------------------------------

    def _abort(self, result: Any, *, after_first_output: bool) -> None:
        if after_first_output:
            try:
                task = asyncio.get_running_loop().create_task(self._abort_after_first_output(result))
            except RuntimeError:  # no running loop (the generator was finalized late): abort now
                _abort_now(result)
                return
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        _abort_now(result)

    async def _abort_after_first_output(self, result: Any) -> None:
        try:
            async with asyncio.timeout(self._limits.deferred_abort_timeout_s):
                async for _ in result:
                    break
        except Exception:  # the request failed or timed out: abort() below is all that is left to do
            pass
        finally:
            _abort_now(result)


def _joined(first: TokenLogprobs, then: TokenLogprobs) -> TokenLogprobs:
    first.extend(then)
    return first


def _trimmed(logprobs: TokenLogprobs | None, count: int) -> TokenLogprobs | None:
    """``logprobs`` of a chunk's ``count`` tokens (fewer when TensorRT-LLM cut a stop token at the end)."""
    if logprobs is None or len(logprobs.logprobs) <= count:
        return logprobs
    return TokenLogprobs(logprobs.logprobs[:count], logprobs.top_ids[:count], logprobs.top_logprobs[:count])


def _abort_now(result: Any) -> None:
    try:
        result.abort()
    except Exception:
        logger.exception("TensorRT-LLM abort() failed")
