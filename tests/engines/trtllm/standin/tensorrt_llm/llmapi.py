"""STAND-IN (tests only): ``tensorrt_llm.llmapi`` — ``LLM``, its request outputs and config classes.

The "model" is a deterministic function of the context (:func:`next_token`), so a prefill → decode round trip
must produce exactly the tokens of one aggregated request: the adapter's bookkeeping is what is under test.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorrt_llm.disaggregated_params import DisaggregatedParams
from tensorrt_llm.executor.result import Logprob, TokenLogprobs
from tensorrt_llm.sampling_params import GuidedDecodingParams, SamplingParams  # noqa: F401 (llmapi exports it)

PENDING_KV: dict[int, int] = {}
"""ctx_request_id → prompt length of every context-only result whose KV no generation-only request has taken
yet (this process only; TensorRT-LLM would hold those KV blocks)."""

_OPAQUE_PREFIX = b"standin-kv/1:"


class RequestError(RuntimeError):
    """A request TensorRT-LLM failed (raised while iterating its output), as ``tensorrt_llm.executor``'s."""


# -- config sections (TensorRT-LLM's are pydantic models that refuse unknown fields) ---------------------


@dataclass(kw_only=True)
class KvCacheConfig:
    enable_block_reuse: bool = True
    max_tokens: int | None = None
    max_attention_window: list[int] | None = None
    sink_token_length: int | None = None
    free_gpu_memory_fraction: float | None = 0.9
    host_cache_size: int | None = None
    onboard_blocks: bool = True
    event_buffer_max_size: int = 0
    enable_partial_reuse: bool = True
    copy_on_partial_reuse: bool = True
    use_uvm: bool = False
    dtype: str = "auto"
    tokens_per_block: int = 32

    def __post_init__(self) -> None:
        fraction = self.free_gpu_memory_fraction
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError(f"free_gpu_memory_fraction must be in [0, 1], got {fraction}")


@dataclass(kw_only=True)
class CudaGraphConfig:
    batch_sizes: list[int] | None = None
    max_batch_size: int = 0
    enable_padding: bool = False


MOE_BACKENDS = ("CUTLASS", "CUTEDSL", "WIDEEP", "TRTLLM", "DEEPGEMM", "VANILLA", "TRITON")


@dataclass(kw_only=True)
class MoeConfig:
    backend: str = "CUTLASS"
    max_num_tokens: int | None = None
    load_balancer: Any = None
    disable_finalize_fusion: bool = False

    def __post_init__(self) -> None:
        if self.backend not in MOE_BACKENDS:
            raise ValueError(f"moe_config.backend must be one of {', '.join(MOE_BACKENDS)}: {self.backend}")


@dataclass(kw_only=True)
class CacheTransceiverConfig:
    backend: str | None = None
    max_tokens_in_buffer: int | None = None
    kv_transfer_timeout_ms: int | None = None

    def __post_init__(self) -> None:
        if self.backend is not None:
            self.backend = self.backend.upper()
            if self.backend not in ("DEFAULT", "UCX", "NIXL", "MPI"):
                raise ValueError(
                    f"cache_transceiver_config.backend must be DEFAULT, UCX, NIXL or MPI: {self.backend}"
                )


_SECTIONS: dict[str, type] = {
    "kv_cache_config": KvCacheConfig,
    "cuda_graph_config": CudaGraphConfig,
    "moe_config": MoeConfig,
    "cache_transceiver_config": CacheTransceiverConfig,
}

# TorchLlmArgs fields (a subset): anything else is refused, as pydantic's "extra inputs are not permitted".
_INT_ARGS = (
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "moe_expert_parallel_size",
    "moe_tensor_parallel_size",
    "max_batch_size",
    "max_num_tokens",
    "max_seq_len",
    "max_input_len",
    "max_beam_width",
    "stream_interval",
    "gpus_per_node",
    "num_postprocess_workers",
)
_BOOL_ARGS = (
    "trust_remote_code",
    "skip_tokenizer_init",
    "enable_attention_dp",
    "enable_chunked_prefill",
    "disable_overlap_scheduler",
    "enable_min_latency",
    "print_iter_log",
    "enable_iter_perf_stats",
    "return_perf_metrics",
    "enable_autotuner",
)
_OTHER_ARGS = (
    "tokenizer",
    "backend",
    "dtype",
    "revision",
    "load_format",
    "scheduler_config",
    "speculative_config",
    "attn_backend",
    "sampler_type",
    "torch_compile_config",
    "attention_dp_config",
    "reasoning_parser",
    "guided_decoding_backend",
)
KNOWN_ARGS = frozenset(_INT_ARGS + _BOOL_ARGS + _OTHER_ARGS + tuple(_SECTIONS))


def next_token(context: Sequence[int], vocab_size: int, banned: frozenset[int] = frozenset()) -> int:
    """The stand-in model: a deterministic token of the context, never a special id (< 3) or a banned one."""
    tok = (len(context) * 2654435761 + context[-1] * 40503 + sum(context[-4:]) * 97) % vocab_size
    while tok < 3 or tok in banned:
        tok = (tok + 1) % vocab_size
    return tok


def position_logprobs(
    context: Sequence[int], vocab_size: int, banned: frozenset[int], k: int, sampled: int | None = None
) -> dict[int, Logprob]:
    """The stand-in model's log-probabilities after ``context``, in TensorRT-LLM's shape: the ``k`` most likely
    tokens (rank 1 is :func:`next_token`, then every 7919th id, each 0.5 less likely), plus ``sampled`` with its
    rank when it is not among them."""
    first = next_token(context, vocab_size, banned)
    base = -0.25 - (len(context) % 5) * 0.1
    out: dict[int, Logprob] = {}
    tok, rank = first, 1
    while rank <= max(k, 0) or (sampled is not None and sampled not in out and rank <= 64):
        if tok >= 3 and tok not in banned and tok not in out:
            if rank <= k or tok == sampled:
                out[tok] = Logprob(logprob=base - (rank - 1) * 0.5, rank=rank)
            rank += 1
        tok = (tok + 7919) % vocab_size
    if sampled is not None and sampled not in out:
        out[sampled] = Logprob(logprob=-30.0, rank=vocab_size // 2)
    return out


def opaque_state_for(ctx_request_id: int, prompt: Sequence[int], first_gen_tokens: Sequence[int]) -> bytes:
    """The stand-in's cache-transceiver state: binds a transfer to its request id, prompt and first token."""
    text = f"{ctx_request_id}|{','.join(map(str, prompt))}|{','.join(map(str, first_gen_tokens))}"
    return _OPAQUE_PREFIX + hashlib.sha256(text.encode()).digest()[:16]


@dataclass
class CompletionOutput:
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    disaggregated_params: DisaggregatedParams | None = None
    logprobs: TokenLogprobs = field(default_factory=list)  # one entry per generated token, when asked for
    prompt_logprobs: TokenLogprobs = field(default_factory=list)  # one per prompt position, when asked for


class RequestOutput:
    """One request's output: iterate it (``async for``) or ``await`` it; the object updates in place."""

    def __init__(
        self,
        llm: LLM,
        request_id: int,
        prompt: list[int],
        sampling_params: SamplingParams,
        disaggregated_params: DisaggregatedParams | None,
        streaming: bool,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt
        self.sampling_params = sampling_params
        self.disaggregated_params_in = disaggregated_params
        self.streaming = streaming
        self.outputs = [CompletionOutput()]
        self.finished = False
        self.aborted = False
        self._llm = llm
        self._queue: asyncio.Queue[tuple | BaseException] = asyncio.Queue()
        self._seen_last = False
        self._task = asyncio.get_running_loop().create_task(self._produce())

    def abort(self) -> None:
        """Cancel the request; for a finished context-only request whose KV is still held, free that KV (as
        TensorRT-LLM cancels a context request whose KV waits in its cache transceiver)."""
        self.aborted = True
        self._llm.aborted.append(self.request_id)
        PENDING_KV.pop(self.request_id, None)

    def __aiter__(self) -> RequestOutput:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._seen_last:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._seen_last = True
            raise item
        token_ids, finished, reason, disagg, logprobs, prompt_logprobs = item
        out = self.outputs[0]
        out.token_ids = list(token_ids)
        out.logprobs = list(logprobs)
        if prompt_logprobs:
            out.prompt_logprobs = list(prompt_logprobs)
        out.finish_reason = reason
        out.disaggregated_params = disagg
        self.finished = finished
        self._seen_last = finished
        return self

    async def aresult(self) -> RequestOutput:
        async for _ in self:
            pass
        return self

    def __await__(self):
        return self.aresult().__await__()

    # -- the fake executor --------------------------------------------------------------------------------

    async def _produce(self) -> None:
        try:
            await self._generate()
        except RequestError as e:
            self._queue.put_nowait(e)

    async def _generate(self) -> None:
        llm, params, disagg = self._llm, self.sampling_params, self.disaggregated_params_in
        kind = disagg.request_type if disagg is not None else None
        if kind in ("context_only", "generation_only") and llm.cache_transceiver_config is None:
            raise RequestError(f"{kind} requests need cache_transceiver_config")
        generated: list[int] = []
        logprobs: TokenLogprobs = []
        # Prompt logprobs as TensorRT-LLM computes them from the context logits: the top k of every position
        # (the last one's is the first generated token's distribution), the prompt's own token only if among them.
        scored: TokenLogprobs = (
            [
                position_logprobs(
                    self.prompt_token_ids[: t + 1], llm.vocab_size, llm.banned, params.prompt_logprobs
                )
                for t in range(len(self.prompt_token_ids))
            ]
            if params.prompt_logprobs
            else []
        )
        max_tokens = params.max_tokens
        if kind == "context_only":
            max_tokens = (
                1  # TensorRT-LLM stops a context-only request after its first token, whatever max_tokens
            )
        elif kind == "generation_only":
            generated = list(self._check_generation_only(disagg))
            logprobs = list(disagg.first_gen_log_probs or [])  # the first token's, if the caller passed them
        await asyncio.sleep(0)
        reason: str | None = None
        since_emit = 0
        while reason is None:
            if self.aborted:
                reason = "cancelled"
                break
            if len(generated) >= max_tokens:
                reason = "length"
                break
            if llm.step_delay_s:
                await asyncio.sleep(llm.step_delay_s)
            else:
                await asyncio.sleep(0)
            position = len(generated) + 1
            min_tokens = params.min_tokens or 0
            if llm.eos_after == position and position > min_tokens:
                if not params.ignore_eos:
                    reason = "stop"  # TensorRT-LLM leaves the end token out of the output
                    break
                tok = llm.eos_ids[0] if llm.eos_ids else 2
            else:
                tok = next_token(self.prompt_token_ids + generated, llm.vocab_size, llm.banned)
            if params.logprobs is not None:
                logprobs.append(
                    position_logprobs(
                        self.prompt_token_ids + generated, llm.vocab_size, llm.banned, params.logprobs, tok
                    )
                )
            generated.append(tok)
            since_emit += 1
            if params.stop_token_ids and tok in params.stop_token_ids:
                reason = "stop"
                break
            if self.streaming and since_emit >= llm.stream_interval and len(generated) < max_tokens:
                since_emit = 0
                self._queue.put_nowait((tuple(generated), False, None, None, tuple(logprobs), scored))
        out_params = None
        if kind == "context_only":
            out_params = DisaggregatedParams(
                request_type="context_only",
                first_gen_tokens=list(generated),
                ctx_request_id=self.request_id,
                disagg_request_id=disagg.disagg_request_id,
                opaque_state=opaque_state_for(self.request_id, self.prompt_token_ids, generated),
            )
            if reason == "length":
                PENDING_KV[self.request_id] = len(self.prompt_token_ids)
        self._queue.put_nowait((tuple(generated), True, reason, out_params, tuple(logprobs), scored))

    def _check_generation_only(self, disagg: DisaggregatedParams) -> list[int]:
        first = disagg.first_gen_tokens
        if not first or not all(isinstance(t, int) for t in first):
            raise RequestError("generation_only request without first_gen_tokens")
        if not isinstance(disagg.ctx_request_id, int):
            raise RequestError(f"generation_only request without ctx_request_id: {disagg.ctx_request_id!r}")
        state = disagg.opaque_state
        if not isinstance(state, bytes):
            raise RequestError(f"opaque_state must be bytes, got {type(state).__name__}")
        if state != opaque_state_for(disagg.ctx_request_id, self.prompt_token_ids, first):
            raise RequestError(
                f"opaque_state does not match ctx_request_id {disagg.ctx_request_id} on this prompt: "
                "no KV to transfer"
            )
        PENDING_KV.pop(disagg.ctx_request_id, None)
        return first


class LLM:
    """The stand-in ``tensorrt_llm.LLM`` (PyTorch backend)."""

    instances: list[LLM] = []

    def __init__(self, model: str, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - KNOWN_ARGS)
        if unknown:
            raise ValueError(f"LLM(): extra inputs are not permitted: {', '.join(unknown)}")
        for name in _INT_ARGS:
            value = kwargs.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"LLM(): {name} must be a positive integer, got {value!r}")
        for name in _BOOL_ARGS:
            if name in kwargs and not isinstance(kwargs[name], bool):
                raise ValueError(f"LLM(): {name} must be a boolean, got {kwargs[name]!r}")
        if kwargs.get("backend") not in (None, "pytorch"):
            raise ValueError(f"LLM(): this stand-in only has the pytorch backend, got {kwargs['backend']!r}")
        for name, cls in _SECTIONS.items():
            value = kwargs.get(name)
            if isinstance(value, dict):
                try:
                    kwargs[name] = cls(**value)
                except TypeError as e:
                    raise ValueError(f"LLM(): {name}: {e}") from None
            elif value is not None and not isinstance(value, cls):
                raise ValueError(f"LLM(): {name} must be a {cls.__name__} or a mapping")
        folder = Path(model)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{model}: no config.json (not a Hugging Face model folder)")
        config = json.loads(config_file.read_text())
        eos = config.get("eos_token_id")
        self.model = model
        self.args = kwargs
        self.vocab_size = int(config.get("vocab_size") or 32000)
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.banned = frozenset(self.eos_ids)
        self.cache_transceiver_config: CacheTransceiverConfig | None = kwargs.get("cache_transceiver_config")
        self.stream_interval = int(kwargs.get("stream_interval") or 1)
        self.step_delay_s = float(os.environ.get("TRTLLM_STANDIN_STEP_DELAY_S", "0") or 0)
        eos_after = os.environ.get("TRTLLM_STANDIN_EOS_AFTER", "")
        self.eos_after = int(eos_after) if eos_after else None
        self.requests: list[RequestOutput] = []
        self.aborted: list[int] = []
        self.is_shutdown = False
        self._ids = itertools.count(random.randrange(1, 1 << 20) << 20)
        LLM.instances.append(self)

    def generate_async(
        self,
        inputs: Sequence[int],
        sampling_params: SamplingParams | None = None,
        disaggregated_params: DisaggregatedParams | None = None,
        streaming: bool = False,
        **kwargs: Any,
    ) -> RequestOutput:
        if self.is_shutdown:
            raise RuntimeError("LLM is shut down")
        if not isinstance(inputs, list | tuple) or not inputs or not all(isinstance(t, int) for t in inputs):
            raise ValueError("this stand-in takes a non-empty list of token ids as inputs")
        if sampling_params is not None and not isinstance(sampling_params, SamplingParams):
            raise TypeError("sampling_params must be a SamplingParams")
        if disaggregated_params is not None and not isinstance(disaggregated_params, DisaggregatedParams):
            raise TypeError("disaggregated_params must be a DisaggregatedParams")
        max_seq_len = self.args.get("max_seq_len")
        if max_seq_len is not None and len(inputs) > max_seq_len:
            raise ValueError(f"prompt of {len(inputs)} tokens exceeds max_seq_len {max_seq_len}")
        # A disaggregated request id, when given, is the request's id on both sides (TensorRT-LLM >= 1.2).
        disagg_id = disaggregated_params.disagg_request_id if disaggregated_params is not None else None
        result = RequestOutput(
            self,
            disagg_id if disagg_id is not None else next(self._ids),
            list(inputs),
            sampling_params or SamplingParams(),
            disaggregated_params,
            streaming,
        )
        self.requests.append(result)
        return result

    def shutdown(self) -> None:
        self.is_shutdown = True
        for result in self.requests:
            result._task.cancel()
