"""The reasoning budget a request asks for, and the ``ReasoningSpec`` that tells engines where a reasoning model's
answer starts (for the budget, and for structured output constraining only the answer).

Where clients put the budget (the names other servers use):

- chat completions: ``thinking_token_budget`` (vLLM's, top level) or ``nvext.max_thinking_tokens`` (NVIDIA NIM's);
- Responses: ``reasoning.max_tokens`` (OpenRouter's shape of OpenAI's ``reasoning`` object) or
  ``thinking_token_budget``;
- Anthropic Messages: ``thinking.budget_tokens``.

After that many generated tokens of reasoning the engine writes the format's own tokens that close the reasoning
and open the answer (harmony: ``<|end|><|start|>assistant<|channel|>final<|message|>``; ``<think>`` models:
``\\n</think>``), so an answer always comes. A budget of 0 answers without reasoning. With a budget, a harmony
answer opens with the analysis channel (written by the engine), so the budget counts reasoning from its first
token. The budget counts generated tokens from the start of the reasoning to the end of the answer's opening,
the forced tokens and any header the model writes in between included, so
``usage.completion_tokens_details.reasoning_tokens`` never exceeds it (a budget smaller than the format's own
markers — 9 tokens for harmony — gets just those).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dynamo_lite.frontend.errors import bad_request
from dynamo_lite.protocol import GuidedSpec, ReasoningSpec, SamplingOptions

if TYPE_CHECKING:
    from dynamo_lite.frontend.preprocess import ModelPreprocessor


def requested_budget(req: Any) -> tuple[int, str] | None:
    """``(budget, field)`` from a chat or Responses request; None when it sets none. 400 on a bad value."""
    found: list[tuple[Any, str]] = []
    extra = req.model_extra or {}
    if extra.get("thinking_token_budget") is not None:
        found.append((extra["thinking_token_budget"], "thinking_token_budget"))
    nvext = getattr(req, "nvext", None)
    if nvext is not None and (nvext.model_extra or {}).get("max_thinking_tokens") is not None:
        found.append((nvext.model_extra["max_thinking_tokens"], "nvext.max_thinking_tokens"))
    # Declared by Responses requests only; getattr on a chat request would raise inside pydantic first.
    reasoning = req.reasoning if "reasoning" in type(req).model_fields else None
    if reasoning is not None and (reasoning.model_extra or {}).get("max_tokens") is not None:
        found.append((reasoning.model_extra["max_tokens"], "reasoning.max_tokens"))
    if not found:
        return None
    if len(found) > 1:
        raise bad_request(f"set one reasoning budget, not {found[0][1]} and {found[1][1]}", param=found[1][1])
    value, param = found[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad_request(f"{param} must be an integer >= 0", param=param)
    return value, param


def reasoning_spec(pre: ModelPreprocessor, budget: int = -1) -> ReasoningSpec | None:
    """The spec for ``pre``'s model (None: the model has no reasoning the frontend knows how to end)."""
    if pre.harmony:
        return harmony_spec(budget)
    parser = pre.card.reasoning_parser
    if parser not in ("deepseek_r1", "qwen3"):
        return None

    def ids(text: str) -> list[int]:
        return pre.tokenizer.encode(text, add_special_tokens=False).ids

    close = ids("</think>")
    return ReasoningSpec(
        budget=budget,
        answer_ids=close,
        forced_ids=ids("\n") + close,
        start_ids=ids("<think>") if parser == "qwen3" else [],  # R1's template opened it already
    )


def harmony_spec(budget: int = -1) -> ReasoningSpec:
    """gpt-oss's: the answer is the `final` channel; a `commentary` message (a tool call, a preamble) also ends the
    reasoning."""
    from dynamo_lite.frontend.harmony import encoding
    from dynamo_lite.gpt_oss import vocab

    enc = encoding()

    def word(text: str) -> list[int]:
        return enc.encode(text, allowed_special="all")

    answer = [vocab.CHANNEL, *word("final"), vocab.MESSAGE]
    return ReasoningSpec(
        budget=budget,
        answer_ids=answer,
        forced_ids=[vocab.END, vocab.START, *word("assistant"), *answer],
        end_ids=[[vocab.CHANNEL, *word("commentary")]],
        # A budgeted turn reasons first, on the analysis channel (as gpt-oss does anyway): the budget counts
        # it from its first token, and the forced close lands inside a message, not in a header.
        open_ids=[vocab.CHANNEL, *word("analysis"), vocab.MESSAGE] if budget > 0 else [],
    )


def apply(
    sampling: SamplingOptions,
    pre: ModelPreprocessor,
    budget: tuple[int, str] | None,
    guided: tuple[GuidedSpec, str] | None,
) -> None:
    """Set ``sampling``'s structured output and reasoning spec. A budget for a model without reasoning is a 400
    naming the field (it would silently do nothing); so is structured output for a reasoning model whose
    answer the engines can't find."""
    spec = reasoning_spec(pre, budget[0] if budget is not None else -1)
    if budget is not None:
        if spec is None:
            raise bad_request(f"{budget[1]}: model {pre.card.served_name!r} does not reason", param=budget[1])
        sampling.reasoning = spec
    if guided is not None:
        if pre.has_reasoning:
            if spec is None:
                raise bad_request(
                    f"{guided[1]}: structured output is not supported for this model", guided[1]
                )
            sampling.reasoning = spec  # the grammar constrains the answer only
        sampling.guided = guided[0]
