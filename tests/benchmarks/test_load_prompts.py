"""Synthetic prompts: token lengths within tolerance, deterministic by seed, chat template overhead."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from benchmarks.load.config import BenchmarkConfig
from benchmarks.load.openai_api import build_payload
from benchmarks.load.prompts import (
    SyntheticPrompts,
    build_dataset,
    chat_template_overhead,
    load_tokenizer,
    sample_length,
)


@pytest.fixture(scope="module")
def tok(tokenizer_json: Path):  # noqa: ANN201
    return load_tokenizer(tokenizer_json)


@pytest.mark.parametrize("n", [1, 7, 64, 200, 1000, 4000])
def test_prompt_token_count_within_tolerance(tok, n: int) -> None:  # noqa: ANN001
    prompts = SyntheticPrompts(tok, seed=n)
    for _ in range(5):
        text = prompts.make(n)
        count = len(tok.encode(text, add_special_tokens=False).ids)
        assert abs(count - n) <= max(1, n // 100), (n, count)


def test_prompts_deterministic_by_seed_and_distinct(tok) -> None:  # noqa: ANN001
    a = [SyntheticPrompts(tok, seed=3).make(50) for _ in range(2)]
    b = SyntheticPrompts(tok, seed=3)
    assert a[0] == a[1]
    first, second = b.make(50), b.make(50)
    assert first == a[0] and second != first
    assert SyntheticPrompts(tok, seed=4).make(50) != first


def test_folder_or_file_path(tokenizer_json: Path) -> None:
    a = load_tokenizer(tokenizer_json.parent)
    b = load_tokenizer(tokenizer_json)
    assert a.get_vocab_size() == b.get_vocab_size() > 0
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tokenizer_json.parent / "missing")


def test_chat_template_overhead_smollm2(tok, tokenizer_json: Path) -> None:  # noqa: ANN001
    # SmolLM2's template adds a default system prompt and the role markers.
    overhead = chat_template_overhead(tok, tokenizer_json)
    assert 10 < overhead < 60
    specs = build_dataset(
        tok, 20, input_mean=200, input_stddev=0, output_mean=64, output_stddev=0, template_overhead=overhead
    )
    for spec in specs:
        content = len(tok.encode(spec.text, add_special_tokens=False).ids)
        assert abs(content + overhead - 200) <= 2
        assert spec.input_tokens == 200 and spec.max_tokens == 64


def test_lengths_follow_mean_and_stddev(tok) -> None:  # noqa: ANN001
    rng = random.Random(0)
    xs = [sample_length(rng, 100, 20) for _ in range(4000)]
    mean = sum(xs) / len(xs)
    std = (sum((x - mean) ** 2 for x in xs) / len(xs)) ** 0.5
    assert abs(mean - 100) < 2 and abs(std - 20) < 2
    assert min(sample_length(rng, 1, 50) for _ in range(200)) >= 1
    specs = build_dataset(tok, 30, input_mean=80, input_stddev=30, output_mean=None, output_stddev=0, seed=1)
    assert len({s.input_tokens for s in specs}) > 5
    assert all(s.max_tokens is None for s in specs)


def test_payload_shapes() -> None:
    cfg = BenchmarkConfig(model="m", streaming=True, extra_inputs={"ignore_eos": True, "min_tokens": 8})
    body = build_payload(cfg, "hi", 16)
    assert body == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "min_tokens": 8,
    }
    cfg = BenchmarkConfig(model="m", endpoint_type="completions", extra_inputs={"max_tokens": 3})
    assert build_payload(cfg, "hi", 16) == {"model": "m", "prompt": "hi", "max_tokens": 3, "stream": False}
