"""gpt-oss across the whole disaggregated path: frontend, prefill and decode workers in separate processes over
etcd + NATS, the mocker playing scripted harmony answers; the official openai SDK as the client."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import openai
import pytest
import yaml

from tests.conftest import Services, start_frontend, start_worker

from .test_distributed_mocker import worker_requests

MODEL = "gpt-oss-tiny"
SEED_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Explain the concept of disaggregated serving in LLM inference."},
]
ANALYSIS = "The user wants an explanation of disaggregated serving: prefill and decode on different workers."
FINAL = (
    "Disaggregated serving splits LLM inference into two phases on separate workers: a prefill worker computes "
    "the prompt's KV cache, and a decode worker pulls that cache and generates the answer token by token."
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _analysis_channel_call() -> str:
    """gpt-oss's frequent form of a call, rendered by openai-harmony: addressed on the analysis channel."""
    from openai_harmony import Message, Role

    from dynamo_lite.frontend.harmony import encoding

    thought = Message.from_role_and_content(Role.ASSISTANT, "Look up Tokyo.").with_channel("analysis")
    call = (
        Message.from_role_and_content(Role.ASSISTANT, '{"city": "Tokyo"}')
        .with_channel("analysis to=functions.get_weather")
        .with_content_type("<|constrain|>json")
    )
    ids = encoding().render(thought)[2:] + encoding().render(call)  # the prompt already wrote the first role
    return encoding().decode_utf8(ids[:-1]) + "<|call|>"


SCRIPT = [
    {"match": "What is the weather in Tokyo?", "answer": _analysis_channel_call()},
    {  # the follow-up carrying the tool's result (first: its prompt also contains the question)
        "match": '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"sky": "sunny"}',
        "answer": "<|channel|>analysis<|message|>Report the result.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>It is sunny in Paris.<|return|>",
    },
    {
        "match": "What is the weather in Paris?",
        "answer": "<|channel|>analysis<|message|>I should call get_weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city": "Paris"}<|call|>',
    },
    {
        "match": "disaggregated serving",
        "answer": f"<|channel|>analysis<|message|>{ANALYSIS}<|end|>"
        f"<|start|>assistant<|channel|>final<|message|>{FINAL}<|return|>",
    },
]


@pytest.fixture
def gpt_stack(services: Services, gpt_oss_folder: Path, tmp_path: Path):
    script = tmp_path / "script.yaml"
    script.write_text(yaml.safe_dump({"script": SCRIPT}))
    ns = f"t{uuid.uuid4().hex[:8]}"
    args = (
        "--model-path",
        str(gpt_oss_folder),
        "--served-model-name",
        MODEL,
        "--speedup-ratio",
        "0",
        "--extra-engine-args",
        str(script),
    )
    procs = []
    try:
        procs.append(start_worker(services, ns, "prefill", *args))
        procs.append(start_worker(services, ns, "decode", *args))
        procs.append(start_frontend(services, ns))
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{procs[2].port}/v1", api_key="none", max_retries=0, timeout=30
        )
        yield client, procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.popen.wait(10)


def test_seed_request_disaggregated(gpt_stack) -> None:  # noqa: ANN001
    client, (prefill, decode, _) = gpt_stack
    r = client.chat.completions.create(model=MODEL, messages=SEED_MESSAGES, max_tokens=200)
    msg = r.choices[0].message
    assert msg.content == FINAL
    assert msg.model_extra["reasoning_content"] == ANALYSIS
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens_details.reasoning_tokens > 0

    stream = client.chat.completions.create(model=MODEL, messages=SEED_MESSAGES, max_tokens=200, stream=True)
    content = reasoning = ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
    assert (content, reasoning) == (FINAL, ANALYSIS)
    assert "<|" not in content + reasoning
    # Both phases ran on their own workers.
    assert worker_requests(prefill.port, "prefill") >= 2 and worker_requests(decode.port, "decode") >= 2


def test_tool_call_round_trip_disaggregated(gpt_stack) -> None:  # noqa: ANN001
    client, _ = gpt_stack
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    follow_up = [
        *messages,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'},
    ]
    r2 = client.chat.completions.create(model=MODEL, messages=follow_up, tools=[WEATHER_TOOL])
    assert r2.choices[0].message.content == "It is sunny in Paris."
    assert r2.choices[0].finish_reason == "stop"

    response = client.responses.create(
        model=MODEL, input=SEED_MESSAGES[1]["content"], instructions="Be helpful."
    )
    assert response.output_text == FINAL


def test_unscripted_random_tokens_never_fail(gpt_stack) -> None:  # noqa: ANN001
    client, _ = gpt_stack
    for i in range(5):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"unscripted question {i}"}], max_tokens=40
        )
        assert r.choices[0].finish_reason == "length"
        assert "<|" not in (r.choices[0].message.content or "")


def test_analysis_channel_call_is_a_tool_call_everywhere(gpt_stack) -> None:  # noqa: ANN001
    client, _ = gpt_stack
    messages = [{"role": "user", "content": "What is the weather in Tokyo?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Tokyo"}
    assert choice.message.model_extra["reasoning_content"] == "Look up Tokyo."

    stream = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], stream=True)
    names, arguments, finish = [], "", None
    for chunk in stream:
        for c in chunk.choices:
            for part in c.delta.tool_calls or []:
                if part.function.name:
                    names.append(part.function.name)
                arguments += part.function.arguments or ""
            finish = c.finish_reason or finish
    assert names == ["get_weather"] and json.loads(arguments) == {"city": "Tokyo"} and finish == "tool_calls"

    tool = {"type": "function", **WEATHER_TOOL["function"]}
    response = client.responses.create(model=MODEL, input=messages[0]["content"], tools=[tool])
    [fc] = [item for item in response.output if item.type == "function_call"]
    assert fc.name == "get_weather" and json.loads(fc.arguments) == {"city": "Tokyo"}

    import anthropic

    claude = anthropic.Anthropic(
        base_url=str(client.base_url).removesuffix("/v1/"), api_key="x", max_retries=0
    )
    tool = {"name": "get_weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}
    msg = claude.messages.create(model=MODEL, max_tokens=200, messages=messages, tools=[tool])
    assert [b.type for b in msg.content] == ["thinking", "tool_use"] and msg.stop_reason == "tool_use"
    assert msg.content[1].name == "get_weather" and msg.content[1].input == {"city": "Tokyo"}
    with claude.messages.stream(model=MODEL, max_tokens=200, messages=messages, tools=[tool]) as stream:
        final = stream.get_final_message()
    assert final.content[1].input == {"city": "Tokyo"} and final.stop_reason == "tool_use"

    # Without the tool declared, the call is never returned as one: it is the model's reasoning.
    r = client.chat.completions.create(model=MODEL, messages=messages)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert "Tokyo" in r.choices[0].message.model_extra["reasoning_content"]


def test_responses_stream_disaggregated(gpt_stack) -> None:  # noqa: ANN001
    client, (prefill, decode, _) = gpt_stack
    before = worker_requests(decode.port, "decode")
    with client.responses.stream(model=MODEL, input=SEED_MESSAGES[1]["content"]) as stream:
        kinds = [event.type for event in stream]
        response = stream.get_final_response()
    assert response.output_text == FINAL
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert worker_requests(decode.port, "decode") > before and worker_requests(prefill.port, "prefill") >= 1
