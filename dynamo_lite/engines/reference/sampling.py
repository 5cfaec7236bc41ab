"""Choosing each sequence's next token from its logits: greedy, or temperature / top-k / top-p sampling.

Every request draws from its own ``torch.Generator`` (seeded from ``SamplingOptions.seed`` when given), so a
seeded request yields the same tokens whatever else shares its batch.

A token is drawn by inverse CDF: one uniform number from the request's generator against the cumulative sum of
its probabilities. ``torch.multinomial`` draws one exponential number per vocabulary entry instead (its
one-sample path), ~0.85 ms a row for SmolLM2's 49k tokens on this repo's 2-core EPYC: 8 ms of a 26 ms 8-row
bf16 decode step (``benchmarks/README.md``, issue 29). Rows with temperature alone, the API's default, are
drawn together in one softmax and one cumulative sum; each row's result is the same alone or in a batch.
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

    __slots__ = ("temperature", "top_k", "top_p", "min_p", "greedy", "plain", "generator")

    def __init__(self, opts: SamplingOptions, device: torch.device) -> None:
        self.temperature = float(opts.temperature)
        self.top_k = int(opts.top_k)
        self.top_p = float(opts.top_p)
        self.min_p = float(opts.min_p)  # never changes the argmax: greedy ignores it
        self.greedy = self.temperature == 0.0 or self.top_k == 1
        # Temperature alone (no truncation): drawn with the batch's other such rows (``sample_batch``).
        self.plain = not self.greedy and self.top_k == 0 and self.top_p >= 1.0 and self.min_p == 0.0
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
        if self.plain:
            return _draw_plain(logits.unsqueeze(0), [self])[0]
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
        index = draw(probs.unsqueeze(0), [self.generator])[0]
        return index if candidates is None else int(candidates[index])


BLOCK = 256  # vocabulary entries summed together in ``draw``'s first level


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> list[int]:
    """One index per row of ``probs`` ``[rows, n]`` (non-negative, any positive total), row i drawn with
    ``generators[i]`` by inverse CDF; an index of zero probability is never drawn.

    In two levels, so that nothing vocabulary-sized is written in fp64 (a fresh 3 MB buffer a step costs more
    than the sums): the cumulative mass of blocks of ``BLOCK`` entries picks a block, then the cumulative mass
    inside that block an entry. Cumulative sums in fp64: fp32 ones drift over a 49k-200k vocabulary."""
    rows, n = probs.shape
    whole = n // BLOCK * BLOCK
    # Block sums in fp32 (the models' logits are fp32; 256 terms lose nothing that matters); the tail, if any,
    # is one more block.
    sums = probs[:, :whole].view(rows, whole // BLOCK, BLOCK).sum(-1, dtype=torch.float32)
    if whole < n:
        sums = torch.cat([sums, probs[:, whole:].sum(-1, keepdim=True, dtype=torch.float32)], dim=1)
    cum = torch.cumsum(sums, dim=-1, dtype=torch.float64)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=probs.device) for g in generators])
    # 1 - u is in (0, 1]: the first position whose cumulative mass reaches the target adds mass of its own.
    target = (1.0 - u) * cum[:, -1]
    block = torch.searchsorted(cum, target.unsqueeze(1)).clamp_(max=cum.shape[1] - 1)  # [rows, 1]
    before = torch.where(block > 0, cum.gather(1, (block - 1).clamp_(min=0)), 0.0)
    index = block * BLOCK + torch.arange(BLOCK, device=probs.device)  # the block's entries, [rows, BLOCK]
    inside = probs.gather(1, index.clamp(max=n - 1)).masked_fill_(index >= n, 0.0)
    inner = torch.cumsum(inside, dim=-1, dtype=torch.float64)
    # The block's two sums differ in their last bits: never aim past the mass it has inside.
    rest = torch.minimum(target.unsqueeze(1) - before, inner[:, -1:])
    picked = block * BLOCK + torch.searchsorted(inner, rest).clamp_(max=BLOCK - 1)
    return picked.squeeze(1).tolist()


def _draw_plain(logits: torch.Tensor, samplers: list[Sampler]) -> list[int]:
    """Rows ``[k, vocab]`` of temperature-only samplers, drawn together (each row's result independent of the
    others: row-wise division, softmax and sums)."""
    if any(s.temperature != 1.0 for s in samplers):  # 1.0 is the API's default: no division then
        temps = torch.tensor([s.temperature for s in samplers], dtype=logits.dtype, device=logits.device)
        logits = logits / temps.unsqueeze(1)
    return draw(torch.softmax(logits, dim=-1), [s.generator for s in samplers])


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
    plain_rows = [i for i, s in enumerate(samplers) if s.plain]
    if plain_rows:
        rows = logits if len(plain_rows) == len(samplers) else logits[plain_rows]
        drawn = _draw_plain(rows, [samplers[i] for i in plain_rows])
        for row, token in zip(plain_rows, drawn, strict=True):
            out[row] = token
    for i, s in enumerate(samplers):
        if not s.greedy and not s.plain:
            out[i] = s.sample(logits[i])
    return out
