"""Conversations agents send, rendered for gpt-oss: earlier turns' reasoning dropped, the current tool-calling
turn's kept, empty assistant turns kept, parameterless functions as ``() => any``. The expected prompt is built
with openai-harmony's own classes."""

from __future__ import annotations

from datetime import date

import pytest
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    Role,
    SystemContent,
    ToolDescription,
)

from dynamo_lite.frontend.harmony import current_turn_start, encoding, render_prompt

TODAY = date(2026, 12, 1)
NOW_TOOL = {"type": "function", "function": {"name": "now", "description": "The time"}}


def call_of(call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": "now", "arguments": "{}"}}


def expected(*messages: Message, tools: list[ToolDescription] | None = None) -> list[int]:
    system = SystemContent.new().with_conversation_start_date(TODAY.isoformat())
    head = [Message.from_role_and_content(Role.SYSTEM, system)]
    if tools:
        head.append(
            Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_function_tools(tools))
        )
    conversation = Conversation.from_messages(head + list(messages))
    return encoding().render_conversation_for_completion(conversation, Role.ASSISTANT)


def user(text: str) -> Message:
    return Message.from_role_and_content(Role.USER, text)


def said(text: str, channel: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def called() -> Message:
    m = Message.from_role_and_content(Role.ASSISTANT, "{}").with_channel("commentary")
    return m.with_recipient("functions.now").with_content_type("json")


def answered(text: str) -> Message:
    author = Author.new(Role.TOOL, "functions.now")
    return (
        Message.from_author_and_content(author, text).with_channel("commentary").with_recipient("assistant")
    )


AGENT_LOOP = [
    {"role": "user", "content": "What time is it?"},
    {"role": "assistant", "content": None, "tool_calls": [call_of("c1")], "reasoning_content": "OLD-1"},
    {"role": "tool", "tool_call_id": "c1", "content": "11:00"},
    {"role": "assistant", "content": "It is 11:00.", "reasoning_content": "OLD-2"},
    {"role": "user", "content": "And now?"},
    {"role": "assistant", "content": None, "tool_calls": [call_of("c2")], "reasoning_content": "CUR-1"},
    {"role": "tool", "tool_call_id": "c2", "content": "11:05"},
]


def test_reasoning_of_finished_turns_is_dropped_the_current_turns_kept() -> None:
    got = render_prompt(AGENT_LOOP, tools=[NOW_TOOL], today=TODAY)
    want = expected(
        user("What time is it?"),
        called(),
        answered("11:00"),
        said("It is 11:00.", "final"),
        user("And now?"),
        said("CUR-1", "analysis"),
        called(),
        answered("11:05"),
        tools=[ToolDescription.new("now", "The time")],
    )
    text = encoding().decode_utf8(got)
    assert "OLD-1" not in text and "OLD-2" not in text and "CUR-1" in text
    assert got == want, text


def test_a_turn_that_ended_in_an_answer_keeps_none_of_its_reasoning() -> None:
    messages = [*AGENT_LOOP, {"role": "assistant", "content": "11:05.", "reasoning_content": "CUR-2"}]
    assert current_turn_start(messages) == len(messages)
    messages.append({"role": "user", "content": "Thanks"})
    text = encoding().decode_utf8(render_prompt(messages, tools=[NOW_TOOL], today=TODAY))
    assert "CUR-1" not in text and "CUR-2" not in text


def test_empty_assistant_turn_is_kept() -> None:
    messages = [
        {"role": "user", "content": "Say nothing."},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Now say hi."},
    ]
    want = expected(user("Say nothing."), said("", "final"), user("Now say hi."))
    assert render_prompt(messages, today=TODAY) == want


@pytest.mark.parametrize("parameters", [None, {}, {"type": "object"}, {"type": "object", "properties": {}}])
def test_function_without_parameters_renders_as_no_arguments(parameters: dict | None) -> None:
    tool = {
        "type": "function",
        "function": {"name": "now", "description": "The time", "parameters": parameters},
    }
    text = encoding().decode_utf8(
        render_prompt([{"role": "user", "content": "t?"}], tools=[tool], today=TODAY)
    )
    assert "type now = () => any;" in text
