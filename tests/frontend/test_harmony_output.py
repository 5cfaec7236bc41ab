"""What gpt-oss really emits, parsed: tool calls on any channel, either header order, content type json or code,
drafts repeated, cut headers, a leading ``<|start|>assistant``, undeclared recipients.

Every completion is rendered by ``openai-harmony`` itself (its messages, the model's channel-first header written
as the channel ``analysis to=functions.NAME``), then fed to the parser whole, token by token and in random chunks.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai_harmony import Message, Role
from tokenizers import Tokenizer

from dynamo_lite.frontend.detokenize import make_detokenizer
from dynamo_lite.frontend.harmony import encoding
from dynamo_lite.frontend.output import OutputState, Transcript
from dynamo_lite.frontend.parsers import parser_factory
from dynamo_lite.gpt_oss import vocab
from dynamo_lite.protocol import FinishReason, GenerateChunk

DECLARED = frozenset({"get_weather", "python"})
ARGS = {"city": "Paris", "unit": "c"}


@pytest.fixture(scope="module")
def tok(gpt_oss_folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(gpt_oss_folder / "tokenizer.json"))


def msg(text: str, channel: str, recipient: str | None = None, content_type: str | None = None) -> Message:
    m = Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)
    if recipient:
        m = m.with_recipient(recipient)
    if content_type:
        m = m.with_content_type(content_type)
    return m


def completion(*messages: Message, stop: int | None = None, keep_start: bool = False) -> list[int]:
    """The ids gpt-oss generates after the prompt's ``<|start|>assistant``: the rendered messages, the first
    without its role (unless ``keep_start``), the last closed by ``stop`` (``<|return|>``, ``<|call|>``)."""
    ids: list[int] = []
    for m in messages:
        ids += encoding().render(m)
    if not keep_start:
        assert ids[:2] == [vocab.START, encoding().encode("assistant", allowed_special="all")[0]]
        ids = ids[2:]
    if stop is not None:
        assert ids[-1] in (vocab.END, vocab.CALL)
        ids[-1] = stop
    return ids


def chunkings(ids: list[int]) -> Iterator[list[list[int]]]:
    """``ids`` whole, token by token, and in random chunks (three seeds)."""
    yield [ids]
    yield [[t] for t in ids]
    for seed in range(3):
        rng = random.Random(seed)
        out, i = [], 0
        while i < len(ids):
            n = rng.randint(1, 6)
            out.append(ids[i : i + n])
            i += n
        yield out


def parse(
    tok: Tokenizer, chunks: list[list[int]], finish: FinishReason = FinishReason.STOP, max_tokens=10_000
):
    parser = parser_factory("gpt_oss", "harmony", tok, lambda: make_detokenizer(tok))(DECLARED)
    out = OutputState(parser, [], max_tokens)
    transcript = Transcript()
    for i, chunk in enumerate(chunks):
        transcript.add(out.process(GenerateChunk(chunk, finish if i == len(chunks) - 1 else None)))
        if out.finish_reason:
            break
    return transcript, out


def each(tok: Tokenizer, ids: list[int], **kw) -> Iterator[tuple[Transcript, OutputState]]:
    for chunks in chunkings(ids):
        yield parse(tok, chunks, **kw)


def assert_one_call(transcript: Transcript, out: OutputState, name: str, args: dict) -> None:
    [call] = transcript.tool_calls
    assert call.name == name and json.loads(call.arguments) == args and call.id.startswith("call_")
    assert out.finish_reason == "tool_calls"


@pytest.mark.parametrize("content_type", ["<|constrain|>json", "json"])
def test_call_addressed_on_the_analysis_channel(tok: Tokenizer, content_type: str) -> None:
    ids = completion(
        msg("Need the weather.", "analysis"),
        msg(json.dumps(ARGS), "analysis to=functions.get_weather", content_type=content_type),
        stop=vocab.CALL,
    )
    for transcript, out in each(tok, ids):
        assert_one_call(transcript, out, "get_weather", ARGS)
        assert transcript.text("reasoning") == "Need the weather."  # the arguments are not reasoning
        assert transcript.text("content") == ""


@pytest.mark.parametrize("channel", ["commentary", "analysis"])
def test_recipient_before_the_channel(tok: Tokenizer, channel: str) -> None:
    ids = completion(
        msg("Need the weather.", "analysis"),
        msg(json.dumps(ARGS), channel, "functions.get_weather", "<|constrain|>json"),
        stop=vocab.CALL,
    )
    assert encoding().decode_utf8(ids).count("<|start|>assistant to=functions.get_weather<|channel|>") == 1
    for transcript, out in each(tok, ids):
        assert_one_call(transcript, out, "get_weather", ARGS)


@pytest.mark.parametrize("header", ["recipient first", "channel first"])
def test_code_content_type(tok: Tokenizer, header: str) -> None:
    code = "print(sum(range(10)))"
    if header == "recipient first":
        call = msg(code, "commentary", "functions.python", "code")
    else:
        call = msg(code, "commentary to=functions.python", content_type="code")
    for transcript, out in each(tok, completion(call, stop=vocab.CALL)):
        [c] = transcript.tool_calls
        assert c.name == "python" and c.arguments == code and out.finish_reason == "tool_calls"


def test_call_drafted_on_analysis_then_repeated_on_commentary_is_one_call(tok: Tokenizer) -> None:
    draft = {"city": "paris"}
    ids = completion(
        msg(json.dumps(draft), "analysis to=functions.get_weather", content_type="<|constrain|>json"),
        msg("Use proper case.", "analysis"),
        msg(json.dumps(ARGS), "commentary to=functions.get_weather", content_type="<|constrain|>json"),
        stop=vocab.CALL,
    )
    for transcript, out in each(tok, ids):
        assert_one_call(transcript, out, "get_weather", ARGS)  # the repeat, not the draft
        assert transcript.text("reasoning") == "Use proper case."


def test_identical_repeat_on_commentary_after_an_analysis_call_is_one_call(tok: Tokenizer) -> None:
    args = json.dumps(ARGS)
    ids = completion(
        msg(args, "analysis to=functions.get_weather", content_type="<|constrain|>json"),
        msg(args, "commentary", "functions.get_weather", "<|constrain|>json"),
        stop=vocab.CALL,
    )
    ids[ids.index(vocab.CALL)] = vocab.END  # the analysis one ended as a message, the second one calls
    for transcript, out in each(tok, ids):
        assert_one_call(transcript, out, "get_weather", ARGS)


def test_analysis_call_cut_by_max_tokens_is_still_the_call(tok: Tokenizer) -> None:
    ids = completion(msg('{"city": "Par', "analysis to=functions.get_weather", content_type="json"))[:-1]
    for transcript, out in each(tok, ids, finish=FinishReason.LENGTH):
        [call] = transcript.tool_calls
        assert call.name == "get_weather" and call.arguments == '{"city": "Par'
        assert out.finish_reason == "length"


@pytest.mark.parametrize(
    "message", [msg("hi", "analysis"), msg("{}", "commentary", "functions.get_weather", "<|constrain|>json")]
)
def test_cut_inside_the_first_header_shows_no_header_words(tok: Tokenizer, message: Message) -> None:
    ids = completion(message)
    cut = ids[: ids.index(vocab.MESSAGE)]  # max_tokens ran out before <|message|>
    for n in range(1, len(cut) + 1):
        for transcript, out in each(tok, cut[:n], finish=FinishReason.LENGTH):
            assert transcript.items == [] and out.finish_reason == "length", n


def test_output_opening_with_start_assistant(tok: Tokenizer) -> None:
    ids = completion(msg("Think.", "analysis"), msg("Hello!", "final"), stop=vocab.RETURN, keep_start=True)
    assert ids[0] == vocab.START
    for transcript, out in each(tok, ids):
        assert not transcript.tool_calls and out.finish_reason == "stop"
        assert transcript.text("reasoning") == "Think." and transcript.text("content") == "Hello!"


@pytest.mark.parametrize("recipient", ["browser.search", "functions.delete_everything"])
@pytest.mark.parametrize("channel", ["analysis", "commentary"])
def test_undeclared_recipient_is_reasoning_never_a_call(tok: Tokenizer, recipient: str, channel: str) -> None:
    query = '{"query": "weather Paris"}'
    ids = completion(
        msg("Look it up.", "analysis"), msg(query, channel, recipient, "<|constrain|>json"), stop=vocab.CALL
    )
    for transcript, out in each(tok, ids):
        assert transcript.tool_calls == [] and out.finish_reason == "stop"
        assert transcript.text("reasoning") == "Look it up." + query
        assert transcript.text("content") == ""


def test_preamble_then_call_then_nothing_else(tok: Tokenizer) -> None:
    ids = completion(
        msg("Checking the weather for you.", "commentary"),
        msg(json.dumps(ARGS), "commentary", "functions.get_weather", "<|constrain|>json"),
        stop=vocab.CALL,
    )
    for transcript, out in each(tok, ids):
        assert_one_call(transcript, out, "get_weather", ARGS)
        assert transcript.text("content") == "Checking the weather for you."


def test_output_opening_with_start_assistant_and_a_recipient(tok: Tokenizer) -> None:
    call = msg(json.dumps(ARGS), "commentary", "functions.get_weather", "<|constrain|>json")
    ids = completion(call, stop=vocab.CALL, keep_start=True)
    assert encoding().decode_utf8(ids).startswith("<|start|>assistant to=functions.get_weather<|channel|>")
    for transcript, out in each(tok, ids):
        assert_one_call(transcript, out, "get_weather", ARGS)


def test_output_that_is_no_harmony_header_stays_answer_text(tok: Tokenizer) -> None:
    """Noise (a random model) with a stray special token is not a cut header: it is shown, without the special."""
    ids = encoding().encode("Hello<|constrain|> world", allowed_special="all")
    for transcript, out in each(tok, ids, finish=FinishReason.LENGTH):
        assert transcript.text("content") == "Hello world" and out.finish_reason == "length"
