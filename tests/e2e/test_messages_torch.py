"""The Anthropic Messages API against SmolLM2 on the torch engine, prefill and decode workers in separate processes
over etcd + NATS, through the official ``anthropic`` SDK: whole and streamed agree (greedy), count_tokens and usage
agree with the prompt."""

from __future__ import annotations

import pytest

from .test_torch_disagg import MODEL, stack  # noqa: F401  (the fixture)

anthropic = pytest.importorskip("anthropic")


def test_messages_create_and_stream_on_the_torch_engine(stack) -> None:  # noqa: ANN001, F811
    launch, _, _ = stack
    url, _, _ = launch()
    client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=120)
    ask = {
        "model": MODEL,
        "max_tokens": 16,
        "extra_body": {"temperature": 0.0},  # greedy (this SDK release has no temperature argument)
        "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Name three colors."}],
    }
    msg = client.messages.create(**ask)
    [block] = msg.content
    assert block.type == "text" and block.text.strip()
    assert msg.stop_reason in ("end_turn", "max_tokens") and 0 < msg.usage.output_tokens <= 16
    counted = client.messages.count_tokens(
        **{k: v for k, v in ask.items() if k not in ("max_tokens", "extra_body")}
    )
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == counted.input_tokens
    with client.messages.stream(**ask) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == block.text and final.usage.output_tokens == msg.usage.output_tokens
