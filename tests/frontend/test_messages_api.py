"""The Anthropic Messages API through the official ``anthropic`` SDK: gpt-oss (harmony: thinking + tool_use, a
call addressed on the analysis channel, rendered by openai-harmony), a tool round trip, SmolLM2 text, the stream's
event sequence, count_tokens, the reasoning budget, what agent clients send (cache_control, beta headers), errors
in Anthropic's shape, x-api-key. The backend is scripted; the frontend is real."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from msgspec.structs import replace as msgspec_replace
from openai_harmony import Message, Role

from dynamo_lite.frontend import FrontendSettings
from dynamo_lite.frontend.harmony import encoding
from dynamo_lite.gpt_oss import vocab
from dynamo_lite.model_files import default_reasoning_parser, default_tool_call_parser, resolve_model
from dynamo_lite.protocol import GenerateChunk, ModelCard
from dynamo_lite.runtime.config import Timeouts

from .conftest import MODEL, FakeBackend, serving

anthropic = pytest.importorskip("anthropic")

GPT = "gpt-oss-tiny"
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
pytestmark = pytest.mark.asyncio(loop_scope="module")


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
def shared(gpt_card: ModelCard, card: ModelCard) -> FakeBackend:
    return FakeBackend([gpt_card, card])


@pytest.fixture
def backend(shared: FakeBackend) -> FakeBackend:
    shared.script, shared.requests = [], []
    return shared


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def url(shared: FakeBackend) -> AsyncIterator[str]:
    settings = FrontendSettings(http_port=0, api_key="sk-test", timeouts=Timeouts(shutdown_s=1))
    async with serving(shared, settings) as srv:
        yield srv.url


@pytest_asyncio.fixture(loop_scope="module")
async def client(url: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    c = anthropic.AsyncAnthropic(base_url=url, api_key="sk-test", max_retries=0, timeout=20)
    try:
        yield c
    finally:
        await c.close()


def harmony(*messages: Message, stop: int) -> list[int]:
    """gpt-oss's completion, rendered by openai-harmony (the first message without the prompt's role)."""
    ids = [t for m in messages for t in encoding().render(m)][2:]
    ids[-1] = stop
    return ids


def say(m: str, channel: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, m).with_channel(channel)


def play(backend: FakeBackend, ids: list[int], per_chunk: int = 3) -> None:
    backend.script = [GenerateChunk(token_ids=ids[i : i + per_chunk]) for i in range(0, len(ids), per_chunk)]
    backend.script[-1].finish_reason = "stop"


ANALYSIS_CALL = harmony(
    say("The user wants the weather; call the tool.", "analysis"),
    say('{"city": "Paris"}', "analysis to=functions.get_weather").with_content_type("<|constrain|>json"),
    stop=vocab.CALL,
)
ANSWER = harmony(say("Report it.", "analysis"), say("It is sunny in Paris.", "final"), stop=vocab.RETURN)
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


async def test_thinking_and_tool_use(client: anthropic.AsyncAnthropic, backend: FakeBackend) -> None:
    play(backend, ANALYSIS_CALL)
    msg = await client.messages.create(model=GPT, max_tokens=200, messages=ASK, tools=[WEATHER])
    assert [b.type for b in msg.content] == ["thinking", "tool_use"]
    assert msg.content[0].thinking == "The user wants the weather; call the tool."
    call = msg.content[1]
    assert call.name == "get_weather" and call.input == {"city": "Paris"}
    assert msg.stop_reason == "tool_use" and msg.role == "assistant" and msg.model == GPT
    assert msg.usage.input_tokens == len(backend.requests[0].token_ids)
    assert msg.usage.output_tokens == len(ANALYSIS_CALL)


async def test_streamed_has_anthropics_event_sequence(
    client: anthropic.AsyncAnthropic, backend: FakeBackend
) -> None:
    play(backend, ANALYSIS_CALL, per_chunk=1)
    async with client.messages.stream(model=GPT, max_tokens=200, messages=ASK, tools=[WEATHER]) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds[-2] == "message_delta"
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 2
    assert "thinking" in kinds and "input_json" in kinds  # the SDK's names for thinking / input_json deltas
    assert [b.type for b in final.content] == ["thinking", "tool_use"]
    assert final.content[1].input == {"city": "Paris"} and final.stop_reason == "tool_use"
    assert final.usage.output_tokens == len(ANALYSIS_CALL)
    assert final.usage.input_tokens == len(backend.requests[0].token_ids)


async def test_tool_round_trip(client: anthropic.AsyncAnthropic, backend: FakeBackend) -> None:
    play(backend, ANALYSIS_CALL)
    first = await client.messages.create(model=GPT, max_tokens=200, messages=ASK, tools=[WEATHER])
    call = first.content[1]
    play(backend, ANSWER)
    follow_up = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": '{"sky": "sunny"}'}],
        },
    ]
    msg = await client.messages.create(model=GPT, max_tokens=200, messages=follow_up, tools=[WEATHER])
    assert msg.content[-1].text == "It is sunny in Paris." and msg.stop_reason == "end_turn"
    prompt = encoding().decode_utf8(backend.requests[1].token_ids)
    assert (
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city":"Paris"}'
        in prompt
    )
    assert (
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"sky": "sunny"}'
        in prompt
    )
    assert "The user wants the weather" in prompt  # the current tool-calling turn keeps its thinking


async def test_count_tokens_matches_the_prompt(
    client: anthropic.AsyncAnthropic, backend: FakeBackend
) -> None:
    play(backend, ANSWER)
    await client.messages.create(model=GPT, max_tokens=50, messages=ASK, tools=[WEATHER], system="Be brief.")
    counted = await client.messages.count_tokens(model=GPT, messages=ASK, tools=[WEATHER], system="Be brief.")
    assert counted.input_tokens == len(backend.requests[0].token_ids)


async def test_thinking_budget_and_what_agents_send(
    client: anthropic.AsyncAnthropic, backend: FakeBackend
) -> None:
    play(backend, ANSWER)
    cached = {"type": "ephemeral"}
    msg = await client.beta.messages.create(  # ?beta=true and the anthropic-beta header
        model=GPT,
        max_tokens=300,
        system=[{"type": "text", "text": "Be brief.", "cache_control": cached}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Weather?", "cache_control": cached}]}
        ],
        thinking={"type": "enabled", "budget_tokens": 128},
        metadata={"user_id": "u-1"},
        betas=["interleaved-thinking-2025-05-14"],
    )
    assert msg.content[-1].text == "It is sunny in Paris."
    assert backend.requests[0].sampling.reasoning.budget == 128


async def test_smollm2_text_streamed_and_whole(
    client: anthropic.AsyncAnthropic, backend: FakeBackend
) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(backend.cards[1].tokenizer_path)
    ids = backend.say(tok, "Hello from SmolLM2!")
    msg = await client.messages.create(
        model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    )
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "Hello from SmolLM2!"
    assert msg.stop_reason == "end_turn" and msg.usage.output_tokens == len(ids) + 1  # + eos
    async with client.messages.stream(
        model=MODEL,
        max_tokens=50,
        messages=[{"role": "user", "content": "hi"}],
        thinking={"type": "disabled"},
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
    assert text == "Hello from SmolLM2!"
    assert backend.requests[-1].sampling.reasoning is None  # no reasoning to budget: thinking is ignored


async def test_a_matched_stop_sequence_is_reported(
    client: anthropic.AsyncAnthropic, backend: FakeBackend
) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(backend.cards[1].tokenizer_path)
    ask = {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    backend.say(tok, "Hello from SmolLM2! The end.")
    msg = await client.messages.create(**ask, stop_sequences=["END", "SmolLM2!"])
    assert msg.content[0].text == "Hello from "
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "SmolLM2!")
    backend.say(tok, "Hello from SmolLM2! The end.")
    async with client.messages.stream(**ask, stop_sequences=["SmolLM2!"]) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Hello from " and (final.stop_reason, final.stop_sequence) == ("stop_sequence", "SmolLM2!")
    backend.say(tok, "Hello from SmolLM2!")
    msg = await client.messages.create(**ask, stop_sequences=["nowhere"])
    assert (msg.stop_reason, msg.stop_sequence) == ("end_turn", None)


async def test_max_tokens_stop_reason(client: anthropic.AsyncAnthropic, backend: FakeBackend) -> None:
    play(backend, ANSWER[:5])
    backend.script[-1].finish_reason = "length"
    msg = await client.messages.create(model=GPT, max_tokens=5, messages=ASK)
    assert msg.stop_reason == "max_tokens"


async def test_errors_in_anthropics_shape(
    url: str, client: anthropic.AsyncAnthropic, backend: FakeBackend
) -> None:
    with pytest.raises(anthropic.NotFoundError) as nf:
        await client.messages.create(model="nope", max_tokens=5, messages=ASK)
    assert nf.value.body["type"] == "error" and nf.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        await client.messages.create(model=GPT, max_tokens=5, messages=ASK, tool_choice={"type": "any"})
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    assert "tool_choice" in bad.value.body["error"]["message"]
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.post(
            "/v1/messages", json={"model": GPT, "messages": ASK}, headers={"x-api-key": "sk-test"}
        )
        assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
        r = await http.post("/v1/messages", json={"model": GPT, "max_tokens": 5, "messages": ASK})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert not backend.requests
    wrong = anthropic.AsyncAnthropic(base_url=url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        await wrong.messages.create(model=GPT, max_tokens=5, messages=ASK)
    await wrong.close()


async def test_hermes_style_model_thinking_and_tool_use(url: str, card: ModelCard) -> None:
    """A ``<think>`` + ``<tool_call>`` model (qwen3 / hermes parsers over SmolLM2's tokenizer) through the SDK."""
    from tokenizers import Tokenizer

    hermes = msgspec_replace(
        card, served_name="hermes-tiny", reasoning_parser="qwen3", tool_call_parser="hermes"
    )
    backend = FakeBackend([hermes])
    tok = Tokenizer.from_file(card.tokenizer_path)
    settings = FrontendSettings(http_port=0, timeouts=Timeouts(shutdown_s=1))
    async with serving(backend, settings) as srv:
        c = anthropic.AsyncAnthropic(base_url=srv.url, api_key="x", max_retries=0, timeout=20)
        backend.say(
            tok,
            "<think>Need the tool.</think>\n"
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
        )
        msg = await c.messages.create(
            model="hermes-tiny",
            max_tokens=100,
            messages=ASK,
            tools=[WEATHER],
            thinking={"type": "enabled", "budget_tokens": 64},
        )
        await c.close()
    assert [b.type for b in msg.content] == ["thinking", "tool_use"]
    assert msg.content[0].thinking == "Need the tool." and msg.content[1].input == {"city": "Paris"}
    assert msg.stop_reason == "tool_use"
    spec = backend.requests[0].sampling.reasoning
    assert spec.budget == 64 and tok.decode(spec.answer_ids) == "</think>"
    assert tok.decode(spec.start_ids) == "<think>"  # qwen3: reasoning only once the output opens it


async def test_output_config_format_is_structured_output(
    client: anthropic.AsyncAnthropic, backend: FakeBackend
) -> None:
    play(backend, harmony(say("Think.", "analysis"), say('{"city": "Paris"}', "final"), stop=vocab.RETURN))
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    msg = await client.messages.create(
        model=GPT,
        max_tokens=100,
        messages=ASK,
        output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "low"},
        tools=[{**WEATHER, "strict": True}],
    )
    assert msg.content[-1].text == '{"city": "Paris"}'
    sampling = backend.requests[0].sampling
    assert sampling.guided is not None and sampling.reasoning is not None  # the grammar applies to the answer
    assert [g.schema for g in sampling.tool_grammars] and "Reasoning: low" in encoding().decode_utf8(
        backend.requests[0].token_ids
    )


async def test_a_failure_mid_stream_ends_it_with_an_error_event(
    client: anthropic.AsyncAnthropic, backend: FakeBackend
) -> None:
    play(backend, ANSWER, per_chunk=1)
    backend.fail_after = 3
    try:
        with pytest.raises(anthropic.APIError) as err:
            async with client.messages.stream(model=GPT, max_tokens=100, messages=ASK) as stream:
                async for _ in stream:
                    pass
        assert "worker lost" in str(err.value)
    finally:
        backend.fail_after = None
