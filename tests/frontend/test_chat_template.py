"""Chat template rendering (sandboxed jinja2, HF semantics)."""

from __future__ import annotations

import pytest

from dynamo_lite.frontend.chat_template import ChatTemplate, ChatTemplateError
from dynamo_lite.protocol import ModelCard

SMOL_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
)


def test_smollm2_template_renders_with_generation_prompt(card: ModelCard) -> None:
    t = ChatTemplate(card.chat_template, bos_token=card.bos_token, eos_token=card.eos_token)
    assert t.render([{"role": "user", "content": "Hi"}]) == SMOL_PROMPT
    assert (
        t.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
        == SMOL_PROMPT[: -len("<|im_start|>assistant\n")]
    )


def test_special_tokens_and_tools_reach_the_template() -> None:
    source = (
        "{{ bos_token }}{% if tools %}[{% for t in tools %}{{ t.function.name }}{% endfor %}]{% endif %}"
        "{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}"
    )
    t = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    assert t.render([{"role": "user", "content": "x"}], tools=tools) == "<s>[get_weather]x</s>"
    assert t.render([{"role": "user", "content": "x"}]) == "<s>x</s>"


def test_raise_exception_becomes_a_template_error() -> None:
    t = ChatTemplate(
        "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="first must be user"):
        t.render([{"role": "assistant", "content": "x"}])


def test_tojson_keeps_unicode_and_extra_kwargs_are_visible() -> None:
    t = ChatTemplate("{{ messages[0].content | tojson }}|{{ reasoning_effort }}")
    assert (
        t.render([{"role": "user", "content": "héllo"}], extra={"reasoning_effort": "low"}) == '"héllo"|low'
    )


def test_sandbox_blocks_attribute_escapes() -> None:
    t = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        t.render([{"role": "user", "content": "x"}])
