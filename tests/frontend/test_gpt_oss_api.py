"""gpt-oss through the HTTP API with the official openai SDK: harmony prompts in, reasoning / answer / tool calls
out (chat and the Responses API), stop ids on every request, 400s that name the field. The backend is scripted;
the frontend is real."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    Role,
    SystemContent,
    ToolDescription,
)
from tokenizers import Tokenizer

from dynamo_lite.frontend import FrontendSettings
from dynamo_lite.frontend.harmony import encoding
from dynamo_lite.gpt_oss import vocab
from dynamo_lite.model_files import default_reasoning_parser, default_tool_call_parser, resolve_model
from dynamo_lite.protocol import GenerateChunk, ModelCard
from dynamo_lite.runtime.config import Timeouts

from .conftest import FakeBackend, serving

GPT = "gpt-oss-tiny"
SEED_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Explain the concept of disaggregated serving in LLM inference."},
]
ANALYSIS = "The user asks about disaggregated serving. Explain prefill vs decode separation."
FINAL = (
    "Disaggregated serving runs the prompt's prefill and the token-by-token decode on separate workers, "
    "handing the KV cache from one to the other."
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def gpt_card(gpt_oss_folder: Path) -> ModelCard:
    files = resolve_model(gpt_oss_folder)
    return ModelCard(
        served_name=GPT,
        model_path=str(files.folder),
        tokenizer_path=str(files.tokenizer_json),
        context_length=files.context_length,
        eos_token_ids=files.eos_token_ids,
        vocab_size=files.vocab_size,
        model_type=files.model_type,
        reasoning_parser=default_reasoning_parser(files.model_type),
        tool_call_parser=default_tool_call_parser(files.model_type),
    )


@pytest.fixture(scope="module")
def gpt_tok(gpt_oss_folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(gpt_oss_folder / "tokenizer.json"))


# One server for the module: loading gpt-oss's 201k-token tokenizer takes seconds; the backend is reset per test.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def shared_backend(gpt_card: ModelCard, card: ModelCard) -> FakeBackend:
    return FakeBackend([gpt_card, card])


@pytest.fixture
def gpt_backend(shared_backend: FakeBackend) -> FakeBackend:
    shared_backend.script, shared_backend.requests = [], []
    return shared_backend


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gpt_client(shared_backend: FakeBackend) -> AsyncIterator[openai.AsyncOpenAI]:
    settings = FrontendSettings(http_port=0, timeouts=Timeouts(shutdown_s=1))
    async with serving(shared_backend, settings) as srv:
        client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=20)
        try:
            yield client
        finally:
            await client.close()


def play(backend: FakeBackend, tok: Tokenizer, raw: str, per_chunk: int = 3) -> list[int]:
    """Script the backend to answer with ``raw`` (harmony markup) as the engine would: the stop id last."""
    ids = tok.encode(raw, add_special_tokens=False).ids
    backend.script = [GenerateChunk(token_ids=ids[i : i + per_chunk]) for i in range(0, len(ids), per_chunk)]
    backend.script[-1].finish_reason = "stop"
    return ids


def answer(analysis: str, final: str) -> str:
    return (
        f"<|channel|>analysis<|message|>{analysis}<|end|>"
        f"<|start|>assistant<|channel|>final<|message|>{final}<|return|>"
    )


def tool_call(analysis: str, name: str, args: str) -> str:
    return (
        f"<|channel|>analysis<|message|>{analysis}<|end|>"
        f"<|start|>assistant<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>{args}<|call|>"
    )


async def test_seed_request_separates_reasoning_from_answer(
    gpt_client: openai.AsyncOpenAI, gpt_backend: FakeBackend, gpt_tok: Tokenizer
) -> None:
    play(gpt_backend, gpt_tok, answer(ANALYSIS, FINAL))
    r = await gpt_client.chat.completions.create(model=GPT, messages=SEED_MESSAGES, max_tokens=200)
    msg = r.choices[0].message
    assert msg.content == FINAL
    assert msg.model_extra["reasoning_content"] == ANALYSIS
    assert r.choices[0].finish_reason == "stop"
    analysis_ids = len(gpt_tok.encode(ANALYSIS, add_special_tokens=False).ids)
    assert analysis_ids <= r.usage.completion_tokens_details.reasoning_tokens <= analysis_ids + 2
    # The prompt is openai-harmony's rendering; the model's stop ids travel with the request.
    sent = gpt_backend.requests[-1]
    conversation = Conversation.from_messages(
        [
            Message.from_role_and_content(
                Role.SYSTEM, SystemContent.new().with_conversation_start_date(date.today().isoformat())
            ),
            Message.from_role_and_content(
                Role.DEVELOPER, DeveloperContent.new().with_instructions("You are a helpful assistant.")
            ),
            Message.from_role_and_content(Role.USER, SEED_MESSAGES[1]["content"]),
        ]
    )
    assert sent.token_ids == encoding().render_conversation_for_completion(conversation, Role.ASSISTANT)
    assert {vocab.RETURN, vocab.CALL, vocab.ENDOFTEXT} <= set(sent.sampling.stop_token_ids)


async def test_seed_request_streamed(
    gpt_client: openai.AsyncOpenAI, gpt_backend: FakeBackend, gpt_tok: Tokenizer
) -> None:
    play(gpt_backend, gpt_tok, answer(ANALYSIS, FINAL), per_chunk=2)
    stream = await gpt_client.chat.completions.create(
        model=GPT, messages=SEED_MESSAGES, max_tokens=200, stream=True, stream_options={"include_usage": True}
    )
    content, reasoning, finish, usage = "", "", None, None
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            finish = choice.finish_reason or finish
    assert (content, reasoning, finish) == (FINAL, ANALYSIS, "stop")
    assert "<|" not in content + reasoning
    assert usage.completion_tokens_details.reasoning_tokens > 0


async def test_ignore_eos_sends_no_stop_ids(
    gpt_client: openai.AsyncOpenAI, gpt_backend: FakeBackend, gpt_tok: Tokenizer
) -> None:
    play(gpt_backend, gpt_tok, answer("a", "b"))
    await gpt_client.chat.completions.create(
        model=GPT, messages=SEED_MESSAGES, max_tokens=20, extra_body={"ignore_eos": True}
    )
    assert gpt_backend.requests[-1].sampling.stop_token_ids == []


async def test_tool_call_round_trip(
    gpt_client: openai.AsyncOpenAI, gpt_backend: FakeBackend, gpt_tok: Tokenizer
) -> None:
    play(gpt_backend, gpt_tok, tool_call("Need the weather tool.", "get_weather", '{"city":"Paris"}'))
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = await gpt_client.chat.completions.create(model=GPT, messages=messages, tools=[WEATHER_TOOL])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_") and choice.message.content is None

    # Follow-up with the tool's result: the prompt is exactly openai-harmony's rendering of that conversation.
    play(gpt_backend, gpt_tok, answer("Report it.", "It is sunny in Paris."))
    follow_up = [
        *messages,
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": choice.message.model_extra["reasoning_content"],
            "tool_calls": [call.model_dump()],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'},
    ]
    r2 = await gpt_client.chat.completions.create(model=GPT, messages=follow_up, tools=[WEATHER_TOOL])
    assert r2.choices[0].message.content == "It is sunny in Paris."
    schema = WEATHER_TOOL["function"]
    expected = Conversation.from_messages(
        [
            Message.from_role_and_content(
                Role.SYSTEM, SystemContent.new().with_conversation_start_date(date.today().isoformat())
            ),
            Message.from_role_and_content(
                Role.DEVELOPER,
                DeveloperContent.new().with_function_tools(
                    [
                        ToolDescription.new(
                            schema["name"], schema["description"], parameters=schema["parameters"]
                        )
                    ]
                ),
            ),
            Message.from_role_and_content(Role.USER, "What is the weather in Paris?"),
            Message.from_role_and_content(Role.ASSISTANT, "Need the weather tool.").with_channel("analysis"),
            Message.from_role_and_content(Role.ASSISTANT, '{"city":"Paris"}')
            .with_channel("commentary")
            .with_recipient("functions.get_weather")
            .with_content_type("json"),
            Message.from_author_and_content(
                Author.new(Role.TOOL, "functions.get_weather"), '{"sky": "sunny"}'
            )
            .with_channel("commentary")
            .with_recipient("assistant"),
        ]
    )
    want = encoding().render_conversation_for_completion(expected, Role.ASSISTANT)
    assert gpt_backend.requests[-1].token_ids == want


async def test_tool_call_streamed_deltas(
    gpt_client: openai.AsyncOpenAI, gpt_backend: FakeBackend, gpt_tok: Tokenizer
) -> None:
    play(gpt_backend, gpt_tok, tool_call("Tool.", "get_weather", '{"city": "Rome"}'), per_chunk=1)
    stream = await gpt_client.chat.completions.create(
        model=GPT, messages=[{"role": "user", "content": "Rome?"}], tools=[WEATHER_TOOL], stream=True
    )
    name, args, ids, finish = "", "", set(), None
    async for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                assert tc.index == 0
                ids.add(tc.id) if tc.id else None
                name += tc.function.name or ""
                args += tc.function.arguments or ""
    assert name == "get_weather" and json.loads(args) == {"city": "Rome"}
    assert len(ids) == 1 and finish == "tool_calls"


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"reasoning_effort": "maximal"}, "reasoning_effort"),
        ({"chat_template_kwargs": {"reasoning_effort": "none"}}, "reasoning_effort"),
        ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools[0].function.parameters",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "tool", "tool_call_id": "c1", "content": "r"},
                ]
            },
            "messages[1].tool_call_id",
        ),
    ],
)
async def test_bad_input_is_400_naming_the_field(
    gpt_client: openai.AsyncOpenAI, gpt_backend: FakeBackend, extra: dict, param: str
) -> None:
    body = {"messages": SEED_MESSAGES, **extra}
    known = {k: body.pop(k) for k in ("messages", "tools", "reasoning_effort") if k in body}
    with pytest.raises(openai.BadRequestError) as err:
        await gpt_client.chat.completions.create(model=GPT, **known, extra_body=body)
    assert err.value.body["param"] == param
    assert not gpt_backend.requests


@pytest.mark.parametrize("where", ["top", "chat_template_kwargs", "chat_template_args"])
async def test_reasoning_effort_reaches_the_system_message(
    gpt_client: openai.AsyncOpenAI, gpt_backend: FakeBackend, gpt_tok: Tokenizer, where: str
) -> None:
    play(gpt_backend, gpt_tok, answer("a", "b"))
    extra = {"reasoning_effort": "high"} if where == "top" else {where: {"reasoning_effort": "high"}}
    await gpt_client.chat.completions.create(model=GPT, messages=SEED_MESSAGES, extra_body=extra)
    prompt = gpt_tok.decode(gpt_backend.requests[-1].token_ids, skip_special_tokens=False)
    assert "Reasoning: high" in prompt


async def test_random_tokens_never_fail(gpt_client: openai.AsyncOpenAI, gpt_backend: FakeBackend) -> None:
    import random

    rng = random.Random(11)
    for trial in range(20):
        ids = [rng.randrange(vocab.VOCAB_SIZE) for _ in range(rng.randint(1, 80))]
        gpt_backend.script = [GenerateChunk(token_ids=ids[i : i + 5]) for i in range(0, len(ids), 5)]
        gpt_backend.script[-1].finish_reason = "length"
        r = await gpt_client.chat.completions.create(model=GPT, messages=SEED_MESSAGES, max_tokens=100)
        assert r.choices[0].finish_reason == "length", trial
        assert "<|" not in (r.choices[0].message.content or "")


async def test_responses_api_gpt_oss(
    gpt_client: openai.AsyncOpenAI, gpt_backend: FakeBackend, gpt_tok: Tokenizer
) -> None:
    play(gpt_backend, gpt_tok, answer(ANALYSIS, FINAL))
    chat = await gpt_client.chat.completions.create(model=GPT, messages=SEED_MESSAGES, max_tokens=200)
    r = await gpt_client.responses.create(
        model=GPT,
        instructions=SEED_MESSAGES[0]["content"],
        input=SEED_MESSAGES[1]["content"],
        max_output_tokens=200,
    )
    assert r.status == "completed" and r.output_text == chat.choices[0].message.content == FINAL
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == ANALYSIS
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    # The same conversation renders to the same prompt as the chat request.
    assert gpt_backend.requests[-1].token_ids == gpt_backend.requests[-2].token_ids

    async with gpt_client.responses.stream(
        model=GPT, instructions=SEED_MESSAGES[0]["content"], input=SEED_MESSAGES[1]["content"]
    ) as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == FINAL
    assert final.id == r.id or final.id.startswith("resp_")


async def test_responses_function_call_and_its_output(
    gpt_client: openai.AsyncOpenAI, gpt_backend: FakeBackend, gpt_tok: Tokenizer
) -> None:
    tools = [{"type": "function", **WEATHER_TOOL["function"]}]
    play(gpt_backend, gpt_tok, tool_call("Use the tool.", "get_weather", '{"city":"Oslo"}'))
    async with gpt_client.responses.stream(model=GPT, input="Weather in Oslo?", tools=tools) as stream:
        final = await stream.get_final_response()
    [fc] = [item for item in final.output if item.type == "function_call"]
    assert fc.name == "get_weather" and json.loads(fc.arguments) == {"city": "Oslo"}

    play(gpt_backend, gpt_tok, answer("Done.", "Cold in Oslo."))
    r = await gpt_client.responses.create(
        model=GPT,
        previous_response_id=final.id,
        input=[{"type": "function_call_output", "call_id": fc.call_id, "output": '{"temp": -3}'}],
        tools=tools,
    )
    assert r.output_text == "Cold in Oslo."
    prompt = gpt_tok.decode(gpt_backend.requests[-1].token_ids, skip_special_tokens=False)
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": -3}' in prompt

    with pytest.raises(openai.BadRequestError) as err:
        await gpt_client.responses.create(model=GPT, previous_response_id="resp_unknown", input="hi")
    assert err.value.body["param"] == "previous_response_id"


async def test_responses_api_smollm2_matches_chat(
    gpt_client: openai.AsyncOpenAI, gpt_backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    gpt_backend.say(tokenizer, "Paris is the capital of France.")
    chat = await gpt_client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Capital of France?"}], temperature=0
    )
    gpt_backend.say(tokenizer, "Paris is the capital of France.")
    r = await gpt_client.responses.create(model="smollm2", input="Capital of France?", temperature=0)
    assert r.output_text == chat.choices[0].message.content == "Paris is the capital of France."
    assert gpt_backend.requests[-1].token_ids == gpt_backend.requests[-2].token_ids
    gpt_backend.say(tokenizer, "Paris is the capital of France.", per_chunk=2)
    async with gpt_client.responses.stream(model="smollm2", input="Capital of France?") as stream:
        final = await stream.get_final_response()
    assert final.output_text == "Paris is the capital of France."


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
async def test_tool_choice_none_keeps_the_tools_out_of_the_prompt(
    gpt_client: openai.AsyncOpenAI, gpt_backend: FakeBackend, gpt_tok: Tokenizer, endpoint: str
) -> None:
    prompts = []
    for choice in ("auto", "none"):
        play(gpt_backend, gpt_tok, answer("a", "b"))
        if endpoint == "chat":
            await gpt_client.chat.completions.create(
                model=GPT, messages=SEED_MESSAGES, tools=[WEATHER_TOOL], tool_choice=choice
            )
        else:
            tool = {"type": "function", **WEATHER_TOOL["function"]}
            await gpt_client.responses.create(model=GPT, input="Rome?", tools=[tool], tool_choice=choice)
        prompts.append(gpt_tok.decode(gpt_backend.requests[-1].token_ids, skip_special_tokens=False))
    assert "get_weather" in prompts[0]
    assert "get_weather" not in prompts[1]


@pytest.mark.parametrize(
    "extra",
    [
        {"tool_choice": "required"},
        {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        {"parallel_tool_calls": False},
    ],
)
async def test_tool_choices_not_implemented_are_400_naming_the_field(
    gpt_client: openai.AsyncOpenAI, gpt_backend: FakeBackend, extra: dict
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await gpt_client.chat.completions.create(
            model=GPT, messages=SEED_MESSAGES, tools=[WEATHER_TOOL], **extra
        )
    assert err.value.body["param"] == next(iter(extra))
    assert not gpt_backend.requests


async def test_tokenize_a_chat_goes_through_harmony(
    gpt_client: openai.AsyncOpenAI, gpt_backend: FakeBackend, gpt_tok: Tokenizer
) -> None:
    play(gpt_backend, gpt_tok, answer("a", "b"))
    await gpt_client.chat.completions.create(model=GPT, messages=SEED_MESSAGES, tools=[WEATHER_TOOL])
    sent = gpt_backend.requests[-1].token_ids
    base = str(gpt_client.base_url).removesuffix("/").removesuffix("/v1")
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        r = await http.post(
            "/tokenize", json={"model": GPT, "messages": SEED_MESSAGES, "tools": [WEATHER_TOOL]}
        )
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == sent
        back = await http.post("/detokenize", json={"model": GPT, "tokens": sent})
    assert back.json()["prompt"].startswith("<|start|>system<|message|>")


# -- the reasoning budget and structured output for a reasoning model (frontend/reasoning.py) -------------------


@pytest.mark.parametrize(
    "endpoint,extra",
    [
        ("chat", {"thinking_token_budget": 7}),
        ("chat", {"nvext": {"max_thinking_tokens": 7}}),
        ("responses", {"reasoning": {"effort": "low", "max_tokens": 7}}),
        ("responses", {"thinking_token_budget": 7}),
    ],
)
async def test_reasoning_budget_reaches_the_engine(
    gpt_client: openai.AsyncOpenAI, gpt_backend: FakeBackend, gpt_tok: Tokenizer, endpoint: str, extra: dict
) -> None:
    play(gpt_backend, gpt_tok, answer("a", "b"))
    if endpoint == "chat":
        await gpt_client.chat.completions.create(model=GPT, messages=SEED_MESSAGES, extra_body=extra)
    else:
        await gpt_client.responses.create(model=GPT, input="hi", extra_body=extra)
    spec = gpt_backend.requests[0].sampling.reasoning
    assert spec is not None and spec.budget == 7
    enc = encoding()
    assert enc.decode_utf8(spec.forced_ids) == "<|end|><|start|>assistant<|channel|>final<|message|>"
    assert enc.decode_utf8(spec.answer_ids) == "<|channel|>final<|message|>"


@pytest.mark.parametrize(
    "model,extra,param",
    [
        (GPT, {"thinking_token_budget": -1}, "thinking_token_budget"),
        (GPT, {"thinking_token_budget": "9"}, "thinking_token_budget"),
        (
            GPT,
            {"thinking_token_budget": 5, "nvext": {"max_thinking_tokens": 5}},
            "nvext.max_thinking_tokens",
        ),
        ("smollm2", {"thinking_token_budget": 5}, "thinking_token_budget"),  # no reasoning to budget
    ],
)
async def test_bad_reasoning_budget_is_400_naming_the_field(
    gpt_client: openai.AsyncOpenAI, gpt_backend: FakeBackend, model: str, extra: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await gpt_client.chat.completions.create(model=model, messages=SEED_MESSAGES, extra_body=extra)
    assert err.value.body["param"] == param
    assert not gpt_backend.requests


async def test_structured_output_for_gpt_oss_constrains_the_answer_only(
    gpt_client: openai.AsyncOpenAI, gpt_backend: FakeBackend, gpt_tok: Tokenizer
) -> None:
    play(gpt_backend, gpt_tok, answer("Think.", '{"a": 1}'))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = await gpt_client.chat.completions.create(
        model=GPT,
        messages=SEED_MESSAGES,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert json.loads(r.choices[0].message.content) == {"a": 1}
    assert r.choices[0].message.model_extra["reasoning_content"] == "Think."
    sampling = gpt_backend.requests[0].sampling
    assert sampling.guided is not None and json.loads(sampling.guided.value) == schema
    # no budget: the spec only says where the answer (and so the grammar) starts
    assert sampling.reasoning is not None and sampling.reasoning.budget == -1


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
async def test_strict_tools_send_their_argument_grammar(
    gpt_client: openai.AsyncOpenAI, gpt_backend: FakeBackend, gpt_tok: Tokenizer, endpoint: str
) -> None:
    play(gpt_backend, gpt_tok, answer("a", "b"))
    strict = {**WEATHER_TOOL["function"], "strict": True}
    time_tool = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}  # not strict
    if endpoint == "chat":
        tools = [{"type": "function", "function": f} for f in (strict, time_tool)]
        await gpt_client.chat.completions.create(model=GPT, messages=SEED_MESSAGES, tools=tools)
    else:
        tools = [{"type": "function", **f} for f in (strict, time_tool)]
        await gpt_client.responses.create(model=GPT, input="hi", tools=tools)
    [grammar] = gpt_backend.requests[0].sampling.tool_grammars
    assert json.loads(grammar.schema) == WEATHER_TOOL["function"]["parameters"]
    assert grammar.open_id == vocab.MESSAGE
    headers = [encoding().decode_utf8(t) for t in grammar.triggers]
    assert headers == [
        " to=functions.get_weather<|channel|>",
        " to=functions.get_weather ",
        " to=functions.get_weather json",
    ]
