"""Incremental detokenization and stop strings, against the real SmolLM2 tokenizer."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models

from dynamo_lite.frontend.detokenize import (
    ByteLevelDetokenizer,
    StopMatcher,
    StreamDetokenizer,
    WindowDetokenizer,
    token_text_table,
)

TEXT = "Grüße aus Köln! 你好世界 🚀🎉 naïve café — «ok» 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 end."
KINDS = ["table", "stream", "window"]


@pytest.fixture(scope="module")
def texts(tokenizer: Tokenizer) -> list[str | None]:
    table = token_text_table(tokenizer)
    assert table is not None  # SmolLM2 is byte-level
    return table


def detokenizer(kind: str, tokenizer: Tokenizer, texts: list[str | None]):
    if kind == "table":
        return ByteLevelDetokenizer(tokenizer, texts)
    return StreamDetokenizer(tokenizer) if kind == "stream" else WindowDetokenizer(tokenizer)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("per_chunk", [1, 2, 3, 7])
def test_multibyte_text_roundtrips_in_any_chunking(
    tokenizer: Tokenizer, texts, kind: str, per_chunk: int
) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    # the premise: byte-level BPE splits some characters over several tokens
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok = detokenizer(kind, tokenizer, texts)
    pieces = [detok.step(ids[i : i + per_chunk]) for i in range(0, len(ids), per_chunk)]
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_are_skipped(tokenizer: Tokenizer, texts, kind: str) -> None:
    ids = tokenizer.encode("Hi there", add_special_tokens=False).ids
    detok = detokenizer(kind, tokenizer, texts)
    out = "".join(detok.step([i]) for i in [1, *ids, 2])  # <|im_start|> ... <|im_end|>
    assert out == "Hi there"


def test_table_detokenizer_matches_decode_on_random_chunkings(tokenizer: Tokenizer, texts) -> None:
    rng = random.Random(0)
    samples = [
        TEXT,
        "Ünïcödé ∑ ≠ ∞ ½ — ‘quotes’ “more” …",
        "日本語のテキストと한국어 텍스트 그리고 العربية",
        "😀😃😄😁🤖👾" * 3,
    ]
    for text in samples:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        for _ in range(20):
            detok, pos, out = ByteLevelDetokenizer(tokenizer, texts), 0, []
            while pos < len(ids):
                n = rng.randint(1, 5)
                out.append(detok.step(ids[pos : pos + n]))
                pos += n
            assert "".join(out) == tokenizer.decode(ids) == text


def test_table_is_only_used_for_byte_level_decoders() -> None:
    wordpiece = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    wordpiece.decoder = decoders.WordPiece()
    assert token_text_table(wordpiece) is None


def test_stop_string_split_over_chunks_is_held_back_then_dropped() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("abc S") == ("abc ", False)
    assert m.feed("T") == ("", False)
    assert m.feed("OP and more") == ("", True)


def test_held_back_text_is_released_when_it_is_not_a_stop() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("a ST") == ("a ", False)
    assert m.feed("ART") == ("START", False)
    assert m.feed("x S") == ("x ", False)
    assert m.flush() == "S"  # the stream ended: what was held back is released


def test_earliest_of_several_stops_wins() -> None:
    m = StopMatcher(["world", "lo w"])
    assert m.feed("hello world") == ("hel", True)


def test_stop_at_the_very_start() -> None:
    assert StopMatcher(["\n"]).feed("\nabc") == ("", True)


def test_text_without_stop_candidates_is_not_delayed() -> None:
    m = StopMatcher(["###"])
    assert m.feed("plain text") == ("plain text", False)
    assert m.flush() == ""


def test_include_stop_keeps_the_matched_stop_and_drops_the_rest() -> None:
    m = StopMatcher(["STOP", "ST"], include_stop=True)
    assert m.feed("abc S") == ("abc ", False)
    assert m.feed("TOP and more") == ("STOP", True)  # at one position, the longest stop is the match
