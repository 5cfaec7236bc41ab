"""Choosing each sequence's next token from its logits: greedy, or temperature / top-k / top-p sampling.

Every request draws from its own ``torch.Generator`` (seeded from ``SamplingOptions.seed`` when given), so a
seeded request yields the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch

from dynamo_lite.engines.reference.logits_processors import min_p_filter
from dynamo_lite.protocol import MAX_LOGPROBS, SamplingOptions


class SamplingError(ValueError):
    """Sampling options that make no sense (negative temperature, top_p outside (0, 1], ...)."""


def validate(opts: SamplingOptions, vocab_size: int) -> None:
    if opts.temperature < 0:
        raise SamplingError(f"temperature must be >= 0, got {opts.temperature}")
    if not 0.0 < opts.top_p <= 1.0:
        raise SamplingError(f"top_p must be in (0, 1], got {opts.top_p}")
    if opts.top_k < 0:
        raise SamplingError(f"top_k must be >= 0, got {opts.top_k}")
    if opts.max_tokens < 1:
        raise SamplingError(f"max_tokens must be >= 1, got {opts.max_tokens}")
    if opts.min_tokens < 0:
        raise SamplingError(f"min_tokens must be >= 0, got {opts.min_tokens}")
    bad = [t for t in opts.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise SamplingError(f"stop_token_ids out of the vocabulary: {bad[:5]}")
    validate_processing(opts, vocab_size)


def validate_processing(opts: SamplingOptions, vocab_size: int) -> None:
    """Logprobs, penalties, min_p and logit_bias: the ranges OpenAI and vLLM accept."""
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(opts, name)
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise SamplingError(f"{name} must be in [0, {MAX_LOGPROBS}], got {k}")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= getattr(opts, name) <= 2.0:
            raise SamplingError(f"{name} must be in [-2, 2], got {getattr(opts, name)}")
    if not opts.repetition_penalty > 0:
        raise SamplingError(f"repetition_penalty must be > 0, got {opts.repetition_penalty}")
    if not 0.0 <= opts.min_p <= 1.0:
        raise SamplingError(f"min_p must be in [0, 1], got {opts.min_p}")
    bad = [t for t in opts.logit_bias if not 0 <= t < vocab_size]
    if bad:
        raise SamplingError(f"logit_bias token ids out of the vocabulary: {bad[:5]}")


class Sampler:
    """One request's sampling state."""

    __slots__ = ("temperature", "top_k", "top_p", "min_p", "greedy", "generator")

    def __init__(self, opts: SamplingOptions, device: torch.device) -> None:
        self.temperature = float(opts.temperature)
        self.top_k = int(opts.top_k)
        self.top_p = float(opts.top_p)
        self.min_p = float(opts.min_p)  # never changes the argmax: greedy ignores it
        self.greedy = self.temperature == 0.0 or self.top_k == 1
        self.generator: torch.Generator | None = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            if opts.seed is not None:
                self.generator.manual_seed(opts.seed & 0xFFFF_FFFF_FFFF_FFFF)
            else:
                self.generator.seed()

    def sample(self, logits: torch.Tensor) -> int:
        """Draw one token from ``logits`` ``[vocab]`` (fp32)."""
        if self.greedy:
            return int(logits.argmax())
        logits = logits / self.temperature
        if self.min_p > 0.0:
            logits = min_p_filter(logits, self.min_p)
        candidates: torch.Tensor | None = None  # token ids of ``logits`` when narrowed to the top k
        if self.top_k > 0 and self.top_k < logits.shape[-1]:
            logits, candidates = torch.topk(logits, self.top_k)  # sorted, descending
        if self.top_p < 1.0:
            if candidates is None:
                logits, candidates = torch.sort(logits, descending=True)
            probs = torch.softmax(logits, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            outside = (torch.cumsum(probs, dim=-1) - probs) >= self.top_p
            logits = logits.masked_fill(outside, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        index = int(torch.multinomial(probs, 1, generator=self.generator))
        return index if candidates is None else int(candidates[index])


def sample_batch(
    logits: torch.Tensor, samplers: list[Sampler], suppress: list[list[int] | None]
) -> list[int]:
    """Next token for each row of ``logits`` ``[S, vocab]``; ``suppress[i]`` are ids row i must not produce
    (eos and stop ids before ``min_tokens``)."""
    for i, ids in enumerate(suppress):
        if ids:
            logits[i, ids] = float("-inf")
    out: list[int] = [0] * len(samplers)
    greedy_rows = [i for i, s in enumerate(samplers) if s.greedy]
    if greedy_rows:
        if len(greedy_rows) == len(samplers):
            picked = logits.argmax(dim=-1).tolist()
        else:
            picked = logits[greedy_rows].argmax(dim=-1).tolist()
        for row, token in zip(greedy_rows, picked, strict=True):
            out[row] = token
    for i, s in enumerate(samplers):
        if not s.greedy:
            out[i] = s.sample(logits[i])
    return out
