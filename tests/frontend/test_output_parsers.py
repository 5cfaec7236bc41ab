"""Output parsers: harmony channels, <think> tags, hermes tool calls — fed token by token and in coalesced
chunks, and never raising on output that is not in their format."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from dynamo_lite.frontend.detokenize import make_detokenizer
from dynamo_lite.frontend.output import OutputState, Transcript
from dynamo_lite.frontend.parsers import parser_factory
from dynamo_lite.frontend.parsers.text import HermesToolCalls, ThinkTags
from dynamo_lite.gpt_oss import vocab
from dynamo_lite.protocol import GenerateChunk

ANALYSIS = "User wants a short explanation. Keep it clear."
FINAL = "Disaggregated serving splits prefill and decode onto different workers — 快速 🙂."
SCRIPTED = (
    f"<|channel|>analysis<|message|>{ANALYSIS}<|end|>"
    f"<|start|>assistant<|channel|>final<|message|>{FINAL}<|return|>"
)
CALL = (
    "<|channel|>analysis<|message|>Need weather.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"city":"Paris"}<|call|>'
)


@pytest.fixture(scope="module")
def gpt_oss_tokenizer(gpt_oss_folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(gpt_oss_folder / "tokenizer.json"))


def harmony_parser(tok: Tokenizer):  # noqa: ANN201
    """The request declared ``get_weather``."""
    return parser_factory("gpt_oss", "harmony", tok, lambda: make_detokenizer(tok))(
        frozenset({"get_weather"})
    )


def run(parser, ids: list[int], chunk: int, max_tokens: int = 10_000, finish: str = "stop"):  # noqa: ANN001, ANN201
    """Feed ``ids`` in chunks through an ``OutputState``; (transcript, finish reason, state)."""
    out = OutputState(parser, [], max_tokens)
    transcript = Transcript()
    for i in range(0, len(ids), chunk):
        last = i + chunk >= len(ids)
        transcript.add(out.process(GenerateChunk(ids[i : i + chunk], finish if last else None)))
        if out.finish_reason:
            break
    return transcript, out.finish_reason, out


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_harmony_splits_reasoning_from_answer(gpt_oss_tokenizer: Tokenizer, chunk: int) -> None:
    ids = gpt_oss_tokenizer.encode(SCRIPTED, add_special_tokens=False).ids
    transcript, finish, out = run(harmony_parser(gpt_oss_tokenizer), ids, chunk)
    assert transcript.text("reasoning") == ANALYSIS
    assert transcript.text("content") == FINAL
    assert not transcript.tool_calls and finish == "stop"
    analysis_tokens = len(gpt_oss_tokenizer.encode(ANALYSIS, add_special_tokens=False).ids)
    assert analysis_tokens <= out.reasoning_tokens <= analysis_tokens + 2


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_harmony_tool_call(gpt_oss_tokenizer: Tokenizer, chunk: int) -> None:
    ids = gpt_oss_tokenizer.encode(CALL, add_special_tokens=False).ids
    transcript, finish, _ = run(harmony_parser(gpt_oss_tokenizer), ids, chunk)
    [call] = transcript.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    assert transcript.text("reasoning") == "Need weather." and transcript.text("content") == ""
    assert finish == "tool_calls"


def test_harmony_tool_call_streams_name_first_then_arguments(gpt_oss_tokenizer: Tokenizer) -> None:
    parser = harmony_parser(gpt_oss_tokenizer)
    parts = []
    for token in gpt_oss_tokenizer.encode(CALL, add_special_tokens=False).ids:
        parts.extend(parser.feed([token]).tool_calls)
    assert parts[0].id and parts[0].name == "get_weather"
    assert all(p.id is None and p.index == 0 for p in parts[1:])
    assert "".join(p.arguments for p in parts) == '{"city":"Paris"}'


def test_output_without_harmony_header_is_plain_answer(gpt_oss_tokenizer: Tokenizer) -> None:
    text = "Hello there, I skipped the header entirely."
    ids = gpt_oss_tokenizer.encode(text, add_special_tokens=False).ids
    for chunk in (1, 1000):
        transcript, finish, _ = run(harmony_parser(gpt_oss_tokenizer), ids, chunk)
        assert transcript.text("content") == text and finish == "stop"


def test_long_unclosed_header_degrades_while_streaming(gpt_oss_tokenizer: Tokenizer) -> None:
    text = "word " * 200
    ids = gpt_oss_tokenizer.encode(text, add_special_tokens=False).ids
    parser = harmony_parser(gpt_oss_tokenizer)
    shown = "".join(parser.feed([t]).content for t in ids[:100])
    assert shown and text.startswith(shown)  # released before the end, not held for the whole answer
    assert shown + "".join(parser.feed([t]).content for t in ids[100:]) + parser.flush().content == text


def test_harmony_never_raises_on_random_tokens(gpt_oss_tokenizer: Tokenizer) -> None:
    rng = random.Random(3)
    specials = [
        vocab.CHANNEL,
        vocab.START,
        vocab.END,
        vocab.MESSAGE,
        vocab.RETURN,
        vocab.CALL,
        vocab.CONSTRAIN,
    ]
    for trial in range(300):
        ids = [
            rng.choice(specials) if rng.random() < 0.15 else rng.randrange(vocab.VOCAB_SIZE)
            for _ in range(rng.randint(1, 120))
        ]
        transcript, finish, _ = run(harmony_parser(gpt_oss_tokenizer), ids, rng.choice([1, 2, 7, 50]))
        assert finish in ("stop", "tool_calls"), trial
        assert "<|" not in transcript.text("content") + transcript.text("reasoning")


def test_stop_string_ends_the_answer_not_the_reasoning(gpt_oss_tokenizer: Tokenizer) -> None:
    ids = gpt_oss_tokenizer.encode(SCRIPTED, add_special_tokens=False).ids
    out = OutputState(harmony_parser(gpt_oss_tokenizer), ["prefill and"], 10_000)
    transcript = Transcript()
    for token in ids:
        transcript.add(out.process(GenerateChunk([token])))
        if out.finish_reason:
            break
    assert out.finish_reason == "stop"
    assert transcript.text("reasoning") == ANALYSIS  # "prefill" never appears there; the answer is cut
    assert transcript.text("content") == "Disaggregated serving splits "


@pytest.mark.parametrize("starts_in_reasoning", [False, True])
@pytest.mark.parametrize("piece", [1, 2, 5, 100])
def test_think_tags(starts_in_reasoning: bool, piece: int) -> None:
    raw = ("" if starts_in_reasoning else "<think>") + "Let me think: 2+2 is 4.</think>\n\nThe answer is 4."
    parser = ThinkTags(starts_in_reasoning=starts_in_reasoning)
    reasoning = answer = ""
    for i in range(0, len(raw), piece):
        r, a = parser.feed(raw[i : i + piece])
        reasoning, answer = reasoning + r, answer + a
    r, a = parser.flush()
    assert (reasoning + r, answer + a) == ("Let me think: 2+2 is 4.", "The answer is 4.")


def test_think_tags_absent_for_qwen3_means_all_answer() -> None:
    parser = ThinkTags(starts_in_reasoning=False)
    assert parser.feed("  <thi") == ("", "")
    assert parser.feed("s is not a tag") == ("", "  <this is not a tag")


@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_hermes_tool_calls(piece: int) -> None:
    raw = (
        'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>not json</tool_call>'
    )
    parser = HermesToolCalls()
    answer, calls = "", []
    for i in range(0, len(raw), piece):
        a, c = parser.feed(raw[i : i + piece])
        answer, calls = answer + a, calls + c
    a, c = parser.flush()
    answer, calls = answer + a, calls + c
    assert answer == "Checking.<tool_call>not json</tool_call>"
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Oslo"}),
        (1, "get_time", {}),
    ]


def test_tagged_text_counts_reasoning_tokens_and_finds_calls(card, tokenizer: Tokenizer) -> None:  # noqa: ANN001
    raw = '<think>plan it</think>Sure.<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    ids = tokenizer.encode(raw, add_special_tokens=False).ids
    parser = parser_factory("qwen3", "hermes", tokenizer, lambda: make_detokenizer(tokenizer))(
        frozenset({"f"})
    )
    transcript, finish, out = run(parser, ids, 2)
    assert transcript.text("reasoning") == "plan it" and transcript.text("content") == "Sure."
    assert [c.name for c in transcript.tool_calls] == ["f"] and finish == "tool_calls"
    think_ids = tokenizer.encode("<think>plan it</think>", add_special_tokens=False).ids
    assert abs(out.reasoning_tokens - len(think_ids)) <= 1


def test_hermes_call_to_an_undeclared_function_stays_text() -> None:
    undeclared = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    raw = undeclared + '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    parser = HermesToolCalls(frozenset({"f"}))
    answer, calls = parser.feed(raw)
    assert answer == undeclared and [c.name for c in calls] == ["f"]
