"""The fast byte-level BPE path must produce exactly the ids ``tokenizers`` produces."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from dynamo_lite.frontend.fast_bpe import FastBpeEncoder
from dynamo_lite.model_files import resolve_model


@pytest.fixture(scope="module")
def smollm2() -> tuple[str, Tokenizer]:
    path = str(resolve_model().tokenizer_json)
    return path, Tokenizer.from_file(path)


def test_same_ids_as_tokenizers_on_varied_text(smollm2) -> None:
    path, tok = smollm2
    fast = FastBpeEncoder.try_build(path, tok)
    assert fast is not None
    rng = random.Random(1234)
    pieces = [
        "<|im_start|>",
        "<|im_end|>",
        "\n",
        "  ",
        "\t",
        "123",
        "4.5e-3",
        "é",
        "ß",
        "🙂",
        "中文",
        "'s",
        "'ll",
        "https://example.org/a?b=c",
        "def f(x):\n    return x",
        "   \n\n  ",
    ]
    texts = []
    for _ in range(400):
        parts = [
            tok.decode([rng.randrange(tok.get_vocab_size())]) if rng.random() < 0.7 else rng.choice(pieces)
            for _ in range(rng.randint(0, 120))
        ]
        texts.append(("" if rng.random() < 0.5 else " ").join(parts))
    for text in texts:
        assert fast.encode(text) == tok.encode(text, add_special_tokens=False).ids, text


def test_other_tokenizer_shapes_are_not_taken(tmp_path) -> None:
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    assert json.loads(path.read_text())["pre_tokenizer"]["type"] == "Whitespace"
    assert FastBpeEncoder.try_build(path, tok) is None
