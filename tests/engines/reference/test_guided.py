"""Structured output in the reference engine (xgrammar): regex, choice, JSON schema and json_object requests
sampled from SmolLM2 follow their grammar, aggregated and across the prefill → decode handoff; specs that don't
compile are refused with 400."""

from __future__ import annotations

import json
import re

import pytest
import pytest_asyncio
from reference_testing import THREADS, chat, collect, needs_smollm2, request, started_engines, tokens

from dynamo_lite.engines.base import EngineError, EngineSettings
from dynamo_lite.protocol import FinishReason, GuidedKind, GuidedSpec, Phase

pytest.importorskip("xgrammar")
pytestmark = [needs_smollm2, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

EOS = 2  # SmolLM2's <|im_end|>
REGEX = r"[0-9]{3}-[a-z]{2,5}"
CHOICES = ["Paris", "London", "Berlin", "Rome"]
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "sunny": {"type": "boolean"}},
    "required": ["city", "sunny"],
}


def settings(mode: str) -> EngineSettings:
    return EngineSettings(
        role=mode, dtype="float32", threads=THREADS, max_batch_size=8, max_num_tokens=512, max_seq_len=512,
        extra_source="test",
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    from dynamo_lite.model_files import resolve_model

    return Tokenizer.from_file(str(resolve_model().tokenizer_json))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines():
    async with started_engines(settings) as built:
        yield built


def guided(kind: GuidedKind, value: str = "", choices: list[str] | None = None, **sampling: object):
    return dict(guided=GuidedSpec(kind, value, choices or []), stop_token_ids=[EOS], **sampling)


def text(tokenizer, chunks) -> str:  # noqa: ANN001
    return tokenizer.decode([t for t in tokens(chunks) if t != EOS])


async def test_regex_output_matches_the_whole_pattern(engines, tokenizer) -> None:
    ids = tokenizer.encode(chat("Give me a product code."), add_special_tokens=False).ids
    for seed in range(4):
        req = request(
            ids, f"re{seed}", max_tokens=20, **guided(GuidedKind.REGEX, REGEX, temperature=1.0, seed=seed)
        )
        chunks = await collect(engines["agg"], req)
        assert chunks[-1].finish_reason is FinishReason.STOP
        assert re.fullmatch(REGEX, text(tokenizer, chunks)), text(tokenizer, chunks)


async def test_choice_output_is_one_of_the_choices(engines, tokenizer) -> None:
    ids = tokenizer.encode(chat("Which city is the capital of France?"), add_special_tokens=False).ids
    greedy = await collect(
        engines["agg"], request(ids, "c", max_tokens=10, **guided(GuidedKind.CHOICE, choices=CHOICES))
    )
    assert text(tokenizer, greedy) in CHOICES
    for seed in range(4):
        req = request(
            ids,
            f"c{seed}",
            max_tokens=10,
            **guided(GuidedKind.CHOICE, choices=CHOICES, temperature=1.0, seed=seed),
        )
        chunks = await collect(engines["agg"], req)
        assert chunks[-1].finish_reason is FinishReason.STOP
        assert text(tokenizer, chunks) in CHOICES


async def test_a_grammar_that_must_end_wins_over_min_tokens(engines, tokenizer) -> None:
    """Once "Paris" is complete only a stop token is allowed; min_tokens must not mask that away too (a row
    with no allowed token would fail the whole step)."""
    ids = tokenizer.encode(chat("Which city is the capital of France?"), add_special_tokens=False).ids
    for temperature in (0.0, 1.0):
        spec = guided(GuidedKind.CHOICE, choices=CHOICES, temperature=temperature, seed=1, min_tokens=8)
        chunks = await collect(engines["agg"], request(ids, f"m{temperature}", max_tokens=10, **spec))
        assert chunks[-1].finish_reason is FinishReason.STOP
        assert text(tokenizer, chunks) in CHOICES


async def test_json_schema_and_json_object(engines, tokenizer) -> None:
    ids = tokenizer.encode(chat("Describe the weather in a city as JSON."), add_special_tokens=False).ids
    for seed in range(3):
        req = request(
            ids,
            f"j{seed}",
            max_tokens=40,
            **guided(GuidedKind.JSON_SCHEMA, json.dumps(SCHEMA), temperature=1.0, seed=seed),
        )
        chunks = await collect(engines["agg"], req)
        assert chunks[-1].finish_reason is FinishReason.STOP
        value = json.loads(text(tokenizer, chunks))
        assert set(value) == {"city", "sunny"} and isinstance(value["sunny"], bool)
    chunks = await collect(engines["agg"], request(ids, "o", max_tokens=60, **guided(GuidedKind.JSON_OBJECT)))
    if chunks[-1].finish_reason is FinishReason.STOP:
        assert isinstance(json.loads(text(tokenizer, chunks)), dict)
    assert text(tokenizer, chunks).startswith("{")


async def disaggregated(engines, ids: list[int], name: str, **spec) -> list[int]:
    prefill_req = request(ids, f"p{name}", max_tokens=20, **spec)
    prefill_req.phase = Phase.PREFILL
    [first] = await collect(engines["prefill"], prefill_req)
    assert first.kv is not None
    decode_req = request(ids, f"d{name}", max_tokens=20, **spec)
    decode_req.phase, decode_req.kv, decode_req.generated_ids = Phase.DECODE, first.kv, list(first.token_ids)
    rest = await collect(engines["decode"], decode_req)
    assert rest[-1].finish_reason is FinishReason.STOP
    return [*first.token_ids, *tokens(rest)]


async def test_grammar_state_crosses_the_prefill_decode_handoff(engines, tokenizer) -> None:
    """The prefill samples the first token under the grammar; the decode worker replays it into a fresh
    matcher and continues: greedy, the same tokens as one aggregated run; sampled, still within the grammar."""
    ids = tokenizer.encode(chat("Give me a product code."), add_special_tokens=False).ids
    spec = guided(GuidedKind.REGEX, REGEX)
    agg = await collect(engines["agg"], request(ids, "a", max_tokens=20, **spec))
    assert await disaggregated(engines, ids, "g", **spec) == tokens(agg)
    for seed in range(3):
        spec = guided(GuidedKind.REGEX, REGEX, temperature=1.0, seed=seed)
        out = await disaggregated(engines, ids, str(seed), **spec)
        assert re.fullmatch(REGEX, tokenizer.decode([t for t in out if t != EOS]))


async def test_decode_refuses_generated_tokens_outside_the_grammar(engines, tokenizer) -> None:
    ids = tokenizer.encode(chat("Give me a product code."), add_special_tokens=False).ids
    req = request(ids, "bad", max_tokens=8, **guided(GuidedKind.REGEX, REGEX))
    req.phase, req.generated_ids = Phase.DECODE, tokenizer.encode("abc", add_special_tokens=False).ids
    with pytest.raises(EngineError) as e:
        await collect(engines["decode"], req)
    assert e.value.status == 400


@pytest.mark.parametrize(
    "spec",
    [
        GuidedSpec(GuidedKind.JSON_SCHEMA, '{"type": "nope"}'),
        GuidedSpec(GuidedKind.JSON_SCHEMA, "not json"),
        GuidedSpec(GuidedKind.REGEX, "(ab"),
        GuidedSpec(GuidedKind.CHOICE),
    ],
)
async def test_specs_that_do_not_compile_are_refused_with_400(engines, tokenizer, spec: GuidedSpec) -> None:
    req = request([1, 2, 3], "inv", max_tokens=4, guided=spec)
    with pytest.raises(EngineError) as e:
        await collect(engines["agg"], req)
    assert e.value.status == 400


async def test_think_model_budget_then_grammar_on_the_answer_only(engines, tokenizer) -> None:
    """A ``<think>`` model (deepseek_r1's spec, built by the frontend over SmolLM2's tokenizer): past the budget the
    engine writes ``\\n</think>``, then the regex constrains the answer; reasoning stays free. Aggregated and
    across the handoff (the gate and the grammar replay the prefill's token)."""
    from types import SimpleNamespace

    from dynamo_lite.frontend.reasoning import reasoning_spec

    pre = SimpleNamespace(
        harmony=False, card=SimpleNamespace(reasoning_parser="deepseek_r1"), tokenizer=tokenizer
    )
    budget = 6
    spec = reasoning_spec(pre, budget)  # type: ignore[arg-type]
    ids = tokenizer.encode(chat("Give me a product code."), add_special_tokens=False).ids
    kw = guided(GuidedKind.REGEX, REGEX, temperature=1.0, reasoning=spec)
    for seed in range(3):
        whole = tokens(
            await collect(engines["agg"], request(ids, f"t{seed}", max_tokens=40, seed=seed, **kw))
        )
        split = await disaggregated(engines, ids, f"t{seed}", seed=seed, **kw)
        n = len(spec.answer_ids)
        for out in (whole, split):
            end = max(
                i for i in range(n, len(out) + 1) if out[i - n : i] == spec.answer_ids
            )  # </think> ends here
            thought, answer = out[:end], out[end:]
            assert len(thought) <= budget  # the closing tokens within the budget
            assert thought[-len(spec.forced_ids) :] == spec.forced_ids  # the engine closed the reasoning
            assert re.fullmatch(REGEX, tokenizer.decode([t for t in answer if t != EOS])), tokenizer.decode(
                out
            )
