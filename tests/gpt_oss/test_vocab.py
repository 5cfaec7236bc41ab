"""The o200k_harmony tokenizer.json we build offline encodes and decodes exactly as openai-harmony does."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from dynamo_lite.frontend.harmony import encoding
from dynamo_lite.gpt_oss import vocab


@pytest.fixture(scope="module")
def tokenizer(gpt_oss_folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(gpt_oss_folder / "tokenizer.json"))


def _corpus() -> list[str]:
    fixed = [
        "Hello, world!",
        "don't won't I'll we've they're it's DON'T",
        "Numbers 1234567890 and 3.14159, 1,000,000",
        "emoji 🙂🚀👩‍👩‍👧 accents héllo wörld CJK 你好，世界 日本語のテキスト 한국어",
        "def f(x):\n    return x**2  # comment\n\n\n\tindented",
        "https://example.com/a/b?c=d&e=f#frag user@example.org",
        "   many    spaces\t\ttabs\r\nwindows\r\n",
        "ÀÉÎÕÜ ÇçñÑ ßẞ Ωμέγα Кириллица",
        "x" * 3000,
        "The QUICK brown FOX's tail; camelCaseWords and snake_case_words",
        '{"json": [1, 2.5, "three"], "nested": {"k": null}}',
    ]
    rng = random.Random(7)
    pools = [(32, 126), (0xA0, 0x2FF), (0x400, 0x4FF), (0x4E00, 0x9FFF), (0x1F300, 0x1F64F)]
    for _ in range(300):
        chars = []
        for _ in range(rng.randint(1, 120)):
            lo, hi = rng.choice(pools)
            chars.append(chr(rng.randint(lo, hi)) if rng.random() > 0.1 else rng.choice(" \n\t"))
        fixed.append("".join(chars))
    return fixed


def test_bundled_vocabulary_is_o200k_base() -> None:
    assert hashlib.sha256(vocab.VOCAB_FILE.read_bytes()).hexdigest() == vocab.VOCAB_SHA256
    assert len(vocab.load_ranks()) == vocab.NUM_BPE_RANKS


def test_encodes_like_openai_harmony(tokenizer: Tokenizer) -> None:
    enc = encoding()
    assert tokenizer.get_vocab_size(with_added_tokens=True) == vocab.VOCAB_SIZE
    for text in _corpus():
        assert tokenizer.encode(text, add_special_tokens=False).ids == enc.encode(text), repr(text[:60])


def test_special_tokens_sit_at_harmony_ids(tokenizer: Tokenizer) -> None:
    enc = encoding()
    markup = "<|start|>assistant<|channel|>final<|message|>Hi<|return|>"
    assert tokenizer.encode(markup, add_special_tokens=False).ids == enc.encode(markup, allowed_special="all")
    for token_id in (vocab.RETURN, vocab.CALL, vocab.CHANNEL, vocab.START, vocab.END, vocab.MESSAGE):
        assert tokenizer.id_to_token(token_id) == enc.decode([token_id])
    assert set(enc.stop_tokens_for_assistant_actions()) == set(vocab.STOP_TOKENS_FOR_ASSISTANT_ACTIONS)


def test_decodes_like_openai_harmony(tokenizer: Tokenizer) -> None:
    enc = encoding()
    for text in _corpus()[:50]:
        ids = enc.encode(text)
        assert tokenizer.decode(ids, skip_special_tokens=False) == enc.decode_utf8(ids)
