"""The torch engine, tiny gpt-oss (random weights), in one process: a strict tool's call arguments follow its
schema once the call's header is written (here replayed as already generated), and a json_schema answer is
constrained only after the final channel opens; sampled with several seeds."""

from __future__ import annotations

import json
from contextlib import aclosing

import jsonschema
import pytest
from gpt_oss_testing import tiny_folder

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.reference import build_engine
from dynamo_lite.frontend.harmony import encoding, render_prompt, stop_token_ids
from dynamo_lite.frontend.reasoning import harmony_spec
from dynamo_lite.gpt_oss import vocab
from dynamo_lite.protocol import (
    GenerateRequest,
    GuidedKind,
    GuidedSpec,
    Phase,
    SamplingOptions,
    ToolArgsGrammar,
)

pytest.importorskip("xgrammar")
pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)

SCHEMA = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Tokyo"]}, "days": {"enum": [1, 2, 3]}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
PROMPT = render_prompt([{"role": "user", "content": "Weather?"}])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):  # noqa: ANN001
    return tiny_folder(tmp_path_factory)


@pytest.fixture
async def engine(folder):  # noqa: ANN001
    settings = EngineSettings(
        role="agg", model_path=str(folder), dtype="float32", threads=2, max_batch_size=4, max_seq_len=256
    )
    eng = build_engine(settings)
    await eng.start()
    try:
        yield eng
    finally:
        await eng.stop()


async def generate(engine, req: GenerateRequest) -> list[int]:  # noqa: ANN001
    async with aclosing(engine.generate(req)) as chunks:
        return [t async for c in chunks for t in c.token_ids]


def strict_tool() -> ToolArgsGrammar:
    from dynamo_lite.frontend import strict_tools
    from dynamo_lite.protocol import SamplingOptions as S

    class Pre:  # what strict_tools reads of a preprocessor
        harmony = True

    sampling = S()
    fn = {"name": "get_weather", "parameters": SCHEMA, "strict": True}
    strict_tools.apply(sampling, Pre(), [{"type": "function", "function": fn}])  # type: ignore[arg-type]
    [grammar] = sampling.tool_grammars
    return grammar


@pytest.mark.parametrize(
    "header",
    [
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>",
        "<|channel|>analysis to=functions.get_weather json<|message|>",
        "<|channel|>analysis<|message|>x<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary"
        " json<|message|>",
    ],
)
async def test_strict_tool_arguments_follow_the_schema(engine, header: str) -> None:  # noqa: ANN001
    written = encoding().encode(header, allowed_special="all")
    for seed in range(3):
        opts = SamplingOptions(
            max_tokens=len(written) + 40, temperature=1.0, seed=seed, stop_token_ids=stop_token_ids(),
            tool_grammars=[strict_tool()],
        )  # fmt: skip
        req = GenerateRequest(f"t{seed}", "tiny", PROMPT, opts, Phase.AGGREGATED, generated_ids=written)
        out = await generate(engine, req)
        assert out[-1] in {*stop_token_ids(), vocab.ENDOFTEXT}, encoding().decode_utf8(out)  # a stop token
        jsonschema.validate(json.loads(encoding().decode_utf8(out[:-1])), SCHEMA)


async def test_answer_grammar_applies_after_the_final_channel_only(engine) -> None:  # noqa: ANN001
    for seed in range(3):
        opts = SamplingOptions(
            max_tokens=60, temperature=1.0, seed=seed, stop_token_ids=stop_token_ids(),
            guided=GuidedSpec(GuidedKind.JSON_SCHEMA, json.dumps(SCHEMA)), reasoning=harmony_spec(8),
        )  # fmt: skip
        out = await generate(engine, GenerateRequest(f"a{seed}", "tiny", PROMPT, opts))
        text = encoding().decode_utf8(out)
        assert text.startswith("<|channel|>analysis<|message|>")
        thought, answer = text.split("<|start|>assistant<|channel|>final<|message|>")
        assert thought.endswith("<|end|>")
        answer, stop = answer[: answer.rindex("<|")], answer[answer.rindex("<|") :]
        assert stop in ("<|return|>", "<|call|>", "<|endoftext|>")  # a stop token, once the JSON is complete
        jsonschema.validate(json.loads(answer), SCHEMA)
