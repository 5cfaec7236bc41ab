"""OpenAI chat → harmony prompt ids: each conversation is also built by hand with openai-harmony's own classes,
and both must render to the same ids."""

from __future__ import annotations

import json
from datetime import date

import pytest
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
)

from dynamo_lite.frontend.harmony import HarmonyRequestError, encoding, render_prompt

TODAY = date(2026, 12, 1)
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"],
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": WEATHER_SCHEMA,
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "Current time"}}


def system(effort: ReasoningEffort = ReasoningEffort.MEDIUM) -> Message:
    content = (
        SystemContent.new().with_reasoning_effort(effort).with_conversation_start_date(TODAY.isoformat())
    )
    return Message.from_role_and_content(Role.SYSTEM, content)


def developer(instructions: str | None = None, tools: list[ToolDescription] | None = None) -> Message:
    content = DeveloperContent.new()
    if instructions:
        content = content.with_instructions(instructions)
    if tools:
        content = content.with_function_tools(tools)
    return Message.from_role_and_content(Role.DEVELOPER, content)


def user(text: str) -> Message:
    return Message.from_role_and_content(Role.USER, text)


def assistant(text: str, channel: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def call(name: str, args: dict) -> Message:
    return (
        Message.from_role_and_content(Role.ASSISTANT, json.dumps(args))
        .with_channel("commentary")
        .with_recipient(f"functions.{name}")
        .with_content_type("json")
    )


def result(name: str, text: str) -> Message:
    return (
        Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), text)
        .with_channel("commentary")
        .with_recipient("assistant")
    )


WEATHER_DESC = ToolDescription.new("get_weather", "Current weather in a city", parameters=WEATHER_SCHEMA)
TIME_DESC = ToolDescription.new("get_time", "Current time")

SEED_SYSTEM = "You are a helpful assistant."
SEED_USER = "Explain the concept of disaggregated serving in LLM inference."
PARIS_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}

CASES = [
    # (name, request messages, tools, effort, expected harmony messages)
    ("user only", [{"role": "user", "content": "hi"}], None, None, [system(), user("hi")]),
    (
        "seed request",
        [{"role": "system", "content": SEED_SYSTEM}, {"role": "user", "content": SEED_USER}],
        None,
        None,
        [system(), developer(SEED_SYSTEM), user(SEED_USER)],
    ),
    (
        "developer role",
        [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "hello"}],
        None,
        "low",
        [system(ReasoningEffort.LOW), developer("Answer in French."), user("hello")],
    ),
    (
        "system and developer together",
        [
            {"role": "system", "content": "Be terse."},
            {"role": "developer", "content": "Use metric units."},
            {"role": "user", "content": "How tall is Everest?"},
        ],
        None,
        "high",
        [
            system(ReasoningEffort.HIGH),
            developer("Be terse.\n\nUse metric units."),
            user("How tall is Everest?"),
        ],
    ),
    (
        "tools without instructions",
        [{"role": "user", "content": "Weather in Paris?"}],
        [WEATHER_TOOL],
        None,
        [system(), developer(tools=[WEATHER_DESC]), user("Weather in Paris?")],
    ),
    (
        "tools with instructions, two tools",
        [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Time and weather?"}],
        [WEATHER_TOOL, TIME_TOOL],
        "low",
        [
            system(ReasoningEffort.LOW),
            developer("Use tools.", [WEATHER_DESC, TIME_DESC]),
            user("Time and weather?"),
        ],
    ),
    (
        "multi-turn with earlier reasoning",
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Simple sum."},
            {"role": "user", "content": "and 3+3?"},
        ],
        None,
        None,
        [
            system(),
            user("2+2?"),
            assistant("Simple sum.", "analysis"),
            assistant("4", "final"),
            user("and 3+3?"),
        ],
    ),
    (
        "tool call and its result",
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "Need the tool.",
                "tool_calls": [PARIS_CALL],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        ],
        [WEATHER_TOOL],
        None,
        [
            system(),
            developer(tools=[WEATHER_DESC]),
            user("Weather in Paris?"),
            assistant("Need the tool.", "analysis"),
            call("get_weather", {"city": "Paris"}),
            result("get_weather", '{"temp": 21}'),
        ],
    ),
    (
        "two parallel calls, two results",
        [
            {"role": "user", "content": "Paris and time"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    PARIS_CALL,
                    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
        ],
        [WEATHER_TOOL, TIME_TOOL],
        "high",
        [
            system(ReasoningEffort.HIGH),
            developer(tools=[WEATHER_DESC, TIME_DESC]),
            user("Paris and time"),
            call("get_weather", {"city": "Paris"}),
            call("get_time", {}),
            result("get_weather", "sunny"),
            result("get_time", "12:00"),
        ],
    ),
    (
        "answer after a tool result, then a new question",
        [
            {"role": "system", "content": SEED_SYSTEM},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [PARIS_CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny in Paris.", "reasoning_content": "Report it."},
            {"role": "user", "content": "Thanks! And tomorrow?"},
        ],
        [WEATHER_TOOL],
        "medium",
        [
            system(),
            developer(SEED_SYSTEM, [WEATHER_DESC]),
            user("Weather in Paris?"),
            call("get_weather", {"city": "Paris"}),
            result("get_weather", "sunny"),
            assistant("Report it.", "analysis"),
            assistant("It is sunny in Paris.", "final"),
            user("Thanks! And tomorrow?"),
        ],
    ),
    (
        "content parts and a preamble next to a call",
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}],
            },
            {"role": "assistant", "content": "Let me check.", "tool_calls": [PARIS_CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "rain"}]},
        ],
        [WEATHER_TOOL],
        None,
        [
            system(),
            developer(tools=[WEATHER_DESC]),
            user("part one\npart two"),
            assistant("Let me check.", "commentary"),
            call("get_weather", {"city": "Paris"}),
            result("get_weather", "rain"),
        ],
    ),
]


@pytest.mark.parametrize("name,messages,tools,effort,expected", CASES, ids=[c[0] for c in CASES])
def test_renders_like_openai_harmony(name, messages, tools, effort, expected) -> None:  # noqa: ANN001
    want = encoding().render_conversation_for_completion(Conversation.from_messages(expected), Role.ASSISTANT)
    got = render_prompt(messages, tools=tools, reasoning_effort=effort, today=TODAY)
    assert got == want, encoding().decode_utf8(got)


@pytest.mark.parametrize(
    "messages,tools,effort,param",
    [
        ([{"role": "user", "content": "x"}], None, "extreme", "reasoning_effort"),
        (
            [{"role": "user", "content": "x"}],
            [{"type": "function", "function": {"description": "no name"}}],
            None,
            "tools[0].function.name",
        ),
        (
            [{"role": "user", "content": "x"}],
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
            None,
            "tools[0].function.parameters",
        ),
        (
            [{"role": "user", "content": "x"}],
            [{"type": "function", "function": {"name": "f", "parameters": [1]}}],
            None,
            "tools[0].function.parameters",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "r"}],
            None,
            None,
            "messages[1].tool_call_id",
        ),
        ([{"role": "wizard", "content": "x"}], None, None, "messages[0].role"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            None,
            None,
            "messages[0].content",
        ),
    ],
)
def test_bad_input_names_the_field(messages, tools, effort, param) -> None:  # noqa: ANN001
    with pytest.raises(HarmonyRequestError) as err:
        render_prompt(messages, tools=tools, reasoning_effort=effort, today=TODAY)
    assert err.value.param == param
