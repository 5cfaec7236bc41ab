"""What a step does to its logits besides choosing a token: OpenAI's penalties and ``logit_bias`` (batched over
the rows that ask for them), and the log-probabilities it reports.

Reported log-probabilities are those of the model's own distribution: ``log_softmax`` of the raw logits,
before penalties, bias, temperature or any truncation (OpenAI's and vLLM's default, ``raw_logprobs``), so
they score text the same whatever the sampling options.

Penalties follow vLLM (which follows OpenAI and transformers), applied in this order after ``logit_bias``:

- ``repetition_penalty`` (transformers' ``RepetitionPenaltyLogitsProcessor``): every token of the prompt or the
  output has its logit divided by the penalty if positive, multiplied if negative;
- ``frequency_penalty`` / ``presence_penalty`` (OpenAI): ``logit -= frequency * count + presence * (count > 0)``
  over the tokens generated so far (those produced by a prefill worker included).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Protocol

import torch

from dynamo_lite.protocol import SamplingOptions, TokenLogprobs


class _Row(Protocol):
    """What the processors read of a sequence (``scheduler.Sequence``)."""

    tokens: list[int]
    prompt_len: int
    sampling: SamplingOptions


def has_penalties(opts: SamplingOptions) -> bool:
    return bool(
        opts.logit_bias or opts.presence_penalty or opts.frequency_penalty or opts.repetition_penalty != 1.0
    )


def _counts(histories: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """``[len(histories), vocab]`` occurrence counts of each token id in each history."""
    width = max((len(h) for h in histories), default=0)
    ids = torch.full((len(histories), max(width, 1)), vocab, dtype=torch.long)  # pad: an extra column
    for i, h in enumerate(histories):
        if h:
            ids[i, : len(h)] = torch.tensor(h, dtype=torch.long)
    counts = torch.zeros(len(histories), vocab + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids.to(device), torch.ones(ids.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, rows: Seq[_Row]) -> None:
    """``logit_bias`` and the penalties of each row of ``logits`` ``[S, vocab]`` (in place); rows that ask for
    none are untouched, and a batch without any costs one scan of the options."""
    picked = [i for i, r in enumerate(rows) if has_penalties(r.sampling)]
    if not picked:
        return
    vocab, device = logits.shape[-1], logits.device
    for i in picked:
        bias = rows[i].sampling.logit_bias
        if bias:
            ids = torch.tensor(list(bias.keys()), dtype=torch.long, device=device)
            values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=device)
            logits[i].index_add_(0, ids, values)
    index = torch.tensor(picked, dtype=torch.long, device=device)
    sub = logits.index_select(0, index)
    opts = [rows[i].sampling for i in picked]
    if any(o.repetition_penalty != 1.0 for o in opts):
        seen = _counts([rows[i].tokens for i in picked], vocab, device) > 0
        penalty = torch.tensor([o.repetition_penalty for o in opts], dtype=sub.dtype, device=device)[:, None]
        sub = torch.where(seen, torch.where(sub < 0, sub * penalty, sub / penalty), sub)
    if any(o.presence_penalty or o.frequency_penalty for o in opts):
        counts = _counts([rows[i].tokens[rows[i].prompt_len :] for i in picked], vocab, device)
        frequency = torch.tensor([o.frequency_penalty for o in opts], dtype=sub.dtype, device=device)[:, None]
        presence = torch.tensor([o.presence_penalty for o in opts], dtype=sub.dtype, device=device)[:, None]
        sub = sub - frequency * counts - presence * (counts > 0).to(sub.dtype)
    logits.index_copy_(0, index, sub)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """``logits`` (temperature applied) with every token less likely than ``min_p`` times the most likely one
    masked out (transformers' ``MinPLogitsWarper``, vLLM's min_p)."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def raw_logprobs(logits: torch.Tensor, rows: Seq[_Row]) -> torch.Tensor | None:
    """``log_softmax`` of the rows whose request asks for logprobs (in their order), before anything changes
    ``logits``; None when none asks."""
    picked = [i for i, r in enumerate(rows) if r.sampling.logprobs is not None]
    if not picked:
        return None
    if len(picked) == len(rows):
        return torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(picked, dtype=torch.long, device=logits.device)
    return torch.log_softmax(logits.index_select(0, index).float(), dim=-1)


def pick_logprobs(raw: torch.Tensor | None, rows: Seq[_Row], tokens: list[int]) -> list[TokenLogprobs | None]:
    """Per row, the chosen token's log-probability and the top ``logprobs`` alternatives (None: not asked)."""
    out: list[TokenLogprobs | None] = [None] * len(rows)
    if raw is None:
        return out
    picked = [i for i, r in enumerate(rows) if r.sampling.logprobs is not None]
    chosen_ids = torch.tensor([tokens[i] for i in picked], dtype=torch.long, device=raw.device)
    chosen = raw.gather(1, chosen_ids[:, None])[:, 0].tolist()
    k = max(rows[i].sampling.logprobs or 0 for i in picked)
    top_values: list[list[float]] = []
    top_ids: list[list[int]] = []
    if k:
        values, ids = torch.topk(raw, k, dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    for j, i in enumerate(picked):
        n = rows[i].sampling.logprobs or 0
        out[i] = TokenLogprobs([chosen[j]], [top_ids[j][:n] if n else []], [top_values[j][:n] if n else []])
    return out


class _Scored(_Row, Protocol):
    prompt_scores: TokenLogprobs | None


def score_prompts(logits: torch.Tensor, spans: Seq[tuple[_Scored, int, int]]) -> None:
    """Prompt logprobs: ``logits`` rows are consecutive prompt positions of each ``(seq, start, count)`` span;
    position p scores prompt token p + 1 (raw ``log_softmax``, as generated tokens). Appended to
    ``seq.prompt_scores``."""
    row = 0
    for seq, start, count in spans:
        lp = torch.log_softmax(logits[row : row + count].float(), dim=-1)
        row += count
        targets = torch.tensor(seq.tokens[start + 1 : start + 1 + count], dtype=torch.long, device=lp.device)
        chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
        k = seq.sampling.prompt_logprobs or 0
        if k:
            values, ids = torch.topk(lp, k, dim=-1)
            top_ids, top_values = ids.tolist(), values.tolist()
        else:
            top_ids, top_values = [[] for _ in chosen], [[] for _ in chosen]
        part = TokenLogprobs(chosen, top_ids, top_values)
        if seq.prompt_scores is None:
            seq.prompt_scores = part
        else:
            seq.prompt_scores.extend(part)
