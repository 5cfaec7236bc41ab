"""The mocker with a reasoning model (gpt-oss, harmony): the reasoning budget forces the answer open and the script
resumes at its answer, across prefill and decode; structured output is checked against the scripted answer."""

from __future__ import annotations

import json
from contextlib import aclosing
from pathlib import Path

import pytest
from openai_harmony import Message, Role

from dynamo_lite.engines.base import EngineError, EngineSettings
from dynamo_lite.engines.mocker import MockerEngine
from dynamo_lite.frontend.harmony import encoding, render_prompt, stop_token_ids
from dynamo_lite.frontend.reasoning import harmony_spec
from dynamo_lite.model_files import resolve_model
from dynamo_lite.protocol import (
    FinishReason,
    GenerateChunk,
    GenerateRequest,
    GuidedKind,
    GuidedSpec,
    Phase,
    SamplingOptions,
)

LONG_THOUGHT = "Let me think about this very carefully. " * 20
ANSWER = '{"city": "Paris", "days": [1, 2]}'
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "array", "items": {"type": "integer"}}},
    "required": ["city", "days"],
}


def scripted(final: str) -> list[int]:
    """gpt-oss's answer as openai-harmony renders it, as generated after the prompt's ``<|start|>assistant``."""
    enc = encoding()
    thought = enc.render(Message.from_role_and_content(Role.ASSISTANT, LONG_THOUGHT).with_channel("analysis"))
    answer = enc.render(Message.from_role_and_content(Role.ASSISTANT, final).with_channel("final"))
    return thought[2:] + answer[:-1] + [stop_token_ids()[0]]  # <|return|> ends a final answer


def called(arguments: str) -> list[int]:
    """A call on the analysis channel (gpt-oss's frequent form), rendered by openai-harmony."""
    call = (
        Message.from_role_and_content(Role.ASSISTANT, arguments)
        .with_channel("analysis to=functions.plan")
        .with_content_type("<|constrain|>json")
    )
    return encoding().render(call)[2:-1] + [stop_token_ids()[1]]  # <|call|>


@pytest.fixture
async def engine(gpt_oss_folder: Path):
    script = [
        {"match": "weather plan", "answer_ids": scripted(ANSWER)},
        {"match": "broken plan", "answer_ids": scripted('{"city": 3}')},
        {"match": "good call", "answer_ids": called('{"city": "Paris", "days": [1]}')},
        {"match": "bad call", "answer_ids": called('{"city": "Paris"}')},
    ]
    eng = MockerEngine(
        EngineSettings(speedup_ratio=0, extra={"script": script}), resolve_model(gpt_oss_folder)
    )
    await eng.start()
    try:
        yield eng
    finally:
        await eng.stop()


def request(text: str, phase: Phase = Phase.AGGREGATED, **sampling: object) -> GenerateRequest:
    prompt = render_prompt([{"role": "user", "content": text}])
    opts = SamplingOptions(max_tokens=500, stop_token_ids=stop_token_ids(), **sampling)
    return GenerateRequest(f"r-{phase}", "gpt", prompt, opts, phase)


async def collect(engine: MockerEngine, req: GenerateRequest) -> list[GenerateChunk]:
    async with aclosing(engine.generate(req)) as chunks:
        return [c async for c in chunks]


def played(chunks: list[GenerateChunk]) -> str:
    return encoding().decode_utf8([t for c in chunks for t in c.token_ids])


async def test_budget_forces_the_final_channel_then_the_script_answers(engine: MockerEngine) -> None:
    chunks = await collect(engine, request("weather plan", reasoning=harmony_spec(10)))
    text = played(chunks)
    thought = text.removeprefix("<|channel|>analysis<|message|>").split("<|end|>")[0]
    assert len(encoding().encode(thought, allowed_special="all")) <= 10 and LONG_THOUGHT.startswith(thought)
    assert text.endswith(f"<|end|><|start|>assistant<|channel|>final<|message|>{ANSWER}<|return|>")
    assert chunks[-1].finish_reason == FinishReason.STOP


async def test_budget_across_prefill_and_decode(engine: MockerEngine) -> None:
    whole = played(await collect(engine, request("weather plan", reasoning=harmony_spec(10))))
    first = await collect(engine, request("weather plan", Phase.PREFILL, reasoning=harmony_spec(10)))
    decode = request("weather plan", Phase.DECODE, reasoning=harmony_spec(10))
    decode.kv, decode.generated_ids = first[-1].kv, first[-1].token_ids
    assert played(first) + played(await collect(engine, decode)) == whole


async def test_budget_zero_answers_at_once(engine: MockerEngine) -> None:
    text = played(await collect(engine, request("weather plan", reasoning=harmony_spec(0))))
    assert text == f"<|channel|>final<|message|>{ANSWER}<|return|>"


async def test_guided_scripted_answer_is_checked(engine: MockerEngine) -> None:
    guided = GuidedSpec(GuidedKind.JSON_SCHEMA, json.dumps(SCHEMA))
    ok = played(await collect(engine, request("weather plan", guided=guided, reasoning=harmony_spec())))
    assert ok.endswith(ANSWER + "<|return|>")
    with pytest.raises(EngineError) as err:  # the script breaks the schema: the mocker says so
        await collect(engine, request("broken plan", guided=guided, reasoning=harmony_spec()))
    assert err.value.status == 500 and "breaks the grammar" in str(err.value)
    with pytest.raises(EngineError) as err:  # no script: it cannot make up tokens that follow a grammar
        await collect(engine, request("unscripted", guided=guided, reasoning=harmony_spec()))
    assert err.value.status == 400


async def test_strict_tool_calls_in_the_script_are_checked(engine: MockerEngine) -> None:
    from dynamo_lite.frontend import strict_tools

    class Pre:
        harmony = True

    sampling = SamplingOptions()
    tool = {"type": "function", "function": {"name": "plan", "parameters": SCHEMA, "strict": True}}
    strict_tools.apply(sampling, Pre(), [tool])  # type: ignore[arg-type]
    grammars = sampling.tool_grammars
    played(await collect(engine, request("good call", tool_grammars=grammars)))
    with pytest.raises(EngineError) as err:
        await collect(engine, request("bad call", tool_grammars=grammars))
    assert err.value.status == 500 and "strict tool" in str(err.value)
