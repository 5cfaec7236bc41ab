"""Our ``SamplingOptions`` as TensorRT-LLM ``SamplingParams`` keyword arguments.

TensorRT-LLM's conventions differ from the OpenAI ones in a few places, handled here:

- greedy is ``top_k=1`` (TensorRT-LLM accepts only ``temperature > 0``), so ``temperature <= 0`` maps to it;
- "off" is ``None``: ``top_k=0`` and ``top_p=1.0`` are left out rather than passed through;
- ``max_tokens`` comes from the caller: the phase decides it (1 for a context-only prefill, the request's
  total for a generation-only decode, whose output starts with the prefill's first token);
- ``detokenize=False``: the frontend turns ids into text, the engine need not;
- structured output is ``guided_decoding``, given here as ``GuidedDecodingParams`` keyword arguments (the engine
  builds the object): a choice becomes a regex (TensorRT-LLM has no choice guide).
- the OpenAI penalties and ``min_p`` pass through when set;
- ``logprobs`` / ``prompt_logprobs`` (how many alternatives per token) pass through as at least 1: releases
  before the TorchSampler change read 0 as "off" (``SamplingParams`` keeps ``logprobs and int(logprobs)``),
  later ones as "the chosen token only"; asking for 1 gets the chosen token's log-probability from both, and
  ``logprobs.py`` keeps only the alternatives the request asked for;
- reasoning models (``options.reasoning``): ``GuidedDecodingParams`` constrains the whole output from its
  first token (json / json_object / regex / grammar), which would constrain the reasoning too, and the LLM API
  has no per-request way to write forced tokens, so structured output for a reasoning model and a reasoning
  budget are refused (400 naming the request field); a ``ReasoningSpec`` without either is ignored;
- strict tools (``options.tool_grammars``) are not constrained: that too would need a grammar starting mid-output.
  They are ignored rather than refused, as agent SDKs mark every tool ``strict`` by default;
- ``logit_bias`` is refused (400): ``SamplingParams`` has no such field (``api_facts.yaml``); TensorRT-LLM's
  own server turns it into ``embedding_bias``, a vocabulary-sized float tensor, which this adapter does not
  build.
"""

from __future__ import annotations

from typing import Any

from dynamo_lite.engines.base import EngineError
from dynamo_lite.engines.guided import choice_regex
from dynamo_lite.protocol import GuidedKind, GuidedSpec, SamplingOptions


def sampling_kwargs(options: SamplingOptions, *, max_tokens: int) -> dict[str, Any]:
    """Keyword arguments for ``tensorrt_llm.SamplingParams`` generating at most ``max_tokens`` tokens;
    ``EngineError`` (400) for options this adapter cannot honour."""
    if options.logit_bias:
        raise EngineError(
            "logit_bias is not supported by the trtllm engine: TensorRT-LLM's SamplingParams has no logit_bias "
            "(only embedding_bias, a vocabulary-sized tensor this adapter does not build)",
            status=400,
            code="invalid_request",
        )
    if options.reasoning is not None and options.guided is not None:
        raise EngineError(
            "response_format / guided_*: the trtllm engine cannot constrain only the answer of a reasoning model "
            "(TensorRT-LLM's guided decoding starts at the first generated token, inside the reasoning)",
            status=400,
            code="invalid_request",
        )
    if options.reasoning is not None and options.reasoning.budget >= 0:
        raise EngineError(
            "thinking_token_budget (reasoning budget): the trtllm engine cannot force the answer open "
            "(TensorRT-LLM's LLM API has no per-request forced tokens)",
            status=400,
            code="invalid_request",
        )
    kwargs: dict[str, Any] = {"max_tokens": max_tokens, "detokenize": False, "ignore_eos": options.ignore_eos}
    if options.temperature <= 0.0:
        kwargs["top_k"] = 1
    else:
        kwargs["temperature"] = options.temperature
        if options.top_p < 1.0:
            kwargs["top_p"] = options.top_p
        if options.top_k > 0:
            kwargs["top_k"] = options.top_k
    if options.seed is not None:
        kwargs["seed"] = options.seed
    if options.min_tokens > 0:
        kwargs["min_tokens"] = min(options.min_tokens, max_tokens)
    if options.stop_token_ids:
        kwargs["stop_token_ids"] = list(options.stop_token_ids)
    if options.guided is not None:
        kwargs["guided_decoding"] = guided_decoding_kwargs(options.guided)
    for name, off in (
        ("presence_penalty", 0.0),
        ("frequency_penalty", 0.0),
        ("repetition_penalty", 1.0),
        ("min_p", 0.0),
    ):
        if getattr(options, name) != off:
            kwargs[name] = getattr(options, name)
    for name in ("logprobs", "prompt_logprobs"):
        if getattr(options, name) is not None:
            kwargs[name] = max(getattr(options, name), 1)
    return kwargs


def guided_decoding_kwargs(spec: GuidedSpec) -> dict[str, Any]:
    """Keyword arguments for ``tensorrt_llm.llmapi.GuidedDecodingParams`` (exactly one guide set)."""
    if spec.kind is GuidedKind.JSON_SCHEMA:
        return {"json": spec.value}
    if spec.kind is GuidedKind.JSON_OBJECT:
        return {"json_object": True}
    if spec.kind is GuidedKind.REGEX:
        return {"regex": spec.value}
    return {"regex": choice_regex(spec.choices)}
