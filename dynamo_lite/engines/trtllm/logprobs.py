"""TensorRT-LLM's log-probabilities as our ``TokenLogprobs``.

TensorRT-LLM reports them per position as ``dict[token_id, Logprob(logprob, rank)]`` (``TokenLogprobs`` in
``tensorrt_llm.executor.result``; rank 1 = most likely): the top ``k`` tokens, plus the sampled one when it
is not among them. Older paths give a bare float per generated token (the chosen one's only). We keep the
chosen token's log-probability and the alternatives of rank 1..``top`` (most likely first).

A chosen token TensorRT-LLM did not report gets ``nan`` (``null`` in the response): prompt logprobs come from
the context logits' top ``k`` only (``compute_logprobs`` without the prompt's tokens), so a prompt token
outside them has no value there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from dynamo_lite.protocol import TokenLogprobs

MISSING = math.nan


def _value(entry: Any) -> float:
    return float(getattr(entry, "logprob", entry))


def _rank(entry: Any) -> int | None:
    return getattr(entry, "rank", None)


def _position(entry: Any, token: int, top: int) -> tuple[float, list[int], list[float]]:
    if entry is None:
        return MISSING, [], []
    if not isinstance(entry, dict):  # a bare float: the chosen token's only
        return _value(entry), [], []
    chosen = _value(entry[token]) if token in entry else MISSING
    if top <= 0:
        return chosen, [], []
    ranked = sorted(
        entry.items(),
        key=lambda item: (_rank(item[1]) or math.inf, -_value(item[1])),
    )
    # An entry ranked beyond ``top`` is there only because it was sampled: not an alternative.
    picked = [(t, v) for t, v in ranked if (_rank(v) or 0) <= top][:top]
    return chosen, [int(t) for t, _ in picked], [_value(v) for _, v in picked]


def to_token_logprobs(entries: Sequence[Any], tokens: Sequence[int], top: int) -> TokenLogprobs:
    """``entries[i]`` (TensorRT-LLM's, or None when it gave none) describes ``tokens[i]``."""
    out = TokenLogprobs()
    for entry, token in zip(entries, tokens, strict=True):
        chosen, ids, values = _position(entry, token, top)
        out.logprobs.append(chosen)
        out.top_ids.append(ids)
        out.top_logprobs.append(values)
    return out


def generated_logprobs(completion: Any, token_ids: Sequence[int], start: int, top: int) -> TokenLogprobs:
    """Entries of ``token_ids[start:]`` from a completion's cumulative ``logprobs``.

    They line up with ``token_ids`` from the first token; a shorter list (a generation-only request that was not
    given the prefill's first-token log-probabilities) lines up from the last token; a longer one (a stop token
    TensorRT-LLM cut from ``token_ids``) has entries past the end, left out."""
    entries = list(getattr(completion, "logprobs", None) or [])
    offset = max(0, len(token_ids) - len(entries))
    picked = [entries[i - offset] if i >= offset else None for i in range(start, len(token_ids))]
    return to_token_logprobs(picked, token_ids[start:], top)


def prompt_logprobs(completion: Any, prompt: Sequence[int], top: int) -> TokenLogprobs | None:
    """The prompt's tokens from the second on (as ``GenerateChunk.prompt_logprobs``): TensorRT-LLM's entry ``t``
    is the context logits' row ``t``, the distribution of prompt token ``t + 1`` (its last row, that of the first
    generated token, is not the prompt's). None while the completion has none."""
    entries = list(getattr(completion, "prompt_logprobs", None) or [])
    if not entries:
        return None
    targets = list(prompt[1:])
    entries = entries[: len(targets)] + [None] * (len(targets) - len(entries))
    return to_token_logprobs(entries, targets, top)
