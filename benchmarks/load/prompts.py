"""Synthetic prompts of requested token lengths, deterministic by seed.

A prompt is a sequence of random whole-word tokens from the tokenizer's vocabulary (" nuclear folk crush
..."), decoded to text (and, for tokenizers where words don't map one-to-one, re-tokenized until the count
matches), so the server sees the number of tokens asked for. Random words make every prompt distinct: no
accidental prefix-cache hits between requests. For the chat endpoint the server's chat template adds
tokens; ``chat_template_overhead`` measures how many (rendering the model's template around an empty
message) so the prompt can be shortened by that much.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Used only without a tokenizer: about one token per word for common English BPE vocabularies.
_FALLBACK_WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name"
).split()

_MAX_FIX_ROUNDS = 6


@dataclass(frozen=True, slots=True)
class PromptSpec:
    """One synthetic request's data: prompt text and the lengths it was built for."""

    text: str
    input_tokens: int  # tokens the server should count: the text's plus the chat template's overhead
    max_tokens: int | None


def find_tokenizer_json(path: str | Path | None) -> Path | None:
    """``path`` (a folder with tokenizer.json, or the file); None: dynamo_lite's default model, if cached."""
    if path is None:
        try:
            from dynamo_lite.model_files import resolve_model

            return resolve_model().tokenizer_json
        except Exception:  # no default model here: fall back to word counts
            return None
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {p}")
    return p


def load_tokenizer(path: str | Path | None) -> Any | None:
    """A ``tokenizers.Tokenizer`` (see ``find_tokenizer_json``), or None when there is none."""
    file = find_tokenizer_json(path)
    return None if file is None else _load_tokenizer_file(str(file))


@functools.lru_cache(maxsize=4)
def _load_tokenizer_file(file: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(file)


_POOLS: dict[int, tuple[Any, list[int]]] = {}  # id(tokenizer) -> (tokenizer, pool); sweeps reuse it


def _word_token_pool(tokenizer: Any) -> list[int]:
    """Ids of tokens that are a space and a short ASCII word, and re-tokenize as themselves alone."""
    cached = _POOLS.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    candidates = []
    for piece, token_id in tokenizer.get_vocab().items():
        if piece[:1] in ("Ġ", "▁"):  # byte-level BPE and SentencePiece spellings of a leading space
            word = piece[1:]
            if 2 <= len(word) <= 9 and word.isascii() and word.isalpha():
                candidates.append(token_id)
    candidates.sort()  # get_vocab() order is not stable; the seed must give the same prompts
    texts = [tokenizer.decode([i]) for i in candidates]
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    pool = [i for i, enc in zip(candidates, encoded, strict=True) if enc.ids == [i]]
    if len(pool) < 100:
        raise ValueError("tokenizer has too few whole-word tokens for synthetic prompts")
    if len(_POOLS) >= 4:
        _POOLS.clear()
    _POOLS[id(tokenizer)] = (tokenizer, pool)  # holding the tokenizer keeps its id from being reused
    return pool


class SyntheticPrompts:
    """Builds prompts of given token lengths. Same tokenizer + seed → same prompts."""

    def __init__(self, tokenizer: Any | None, seed: int = 0) -> None:
        self._tok = tokenizer
        self._rng = random.Random(seed)
        self._pool = _word_token_pool(tokenizer) if tokenizer is not None else []
        # Where words split at spaces (GPT-2-style pre-tokenizers), n pool words are exactly n tokens and
        # re-tokenizing, the slow part (~7 µs a token), can be skipped. Checked on a sample, not assumed.
        self._exact = False
        if tokenizer is not None:
            probe = random.Random(seed ^ 0xC0DE)
            ids = [probe.choice(self._pool) for _ in range(2000)]
            self._exact = self.count(tokenizer.decode(ids)) == len(ids)

    def count(self, text: str) -> int:
        if self._tok is None:
            return len(text.split())
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def make(self, num_tokens: int) -> str:
        num_tokens = max(1, num_tokens)
        rng = self._rng
        if self._tok is None:
            return " ".join(rng.choice(_FALLBACK_WORDS) for _ in range(num_tokens))
        tok, pool = self._tok, self._pool
        text = tok.decode(rng.choices(pool, k=num_tokens))
        if self._exact:
            return text
        for _ in range(_MAX_FIX_ROUNDS):
            ids = tok.encode(text, add_special_tokens=False).ids
            if len(ids) == num_tokens:
                break
            if len(ids) > num_tokens:
                text = tok.decode(ids[:num_tokens])
            else:
                text += tok.decode([rng.choice(pool) for _ in range(num_tokens - len(ids))])
        return text


def sample_length(rng: random.Random, mean: float, stddev: float) -> int:
    """A length from N(mean, stddev), at least 1 (exactly ``mean`` when stddev is 0)."""
    if stddev <= 0:
        return max(1, round(mean))
    return max(1, round(rng.gauss(mean, stddev)))


def _read_chat_template(folder: Path) -> tuple[str, dict[str, str]]:
    template = ""
    specials: dict[str, str] = {}
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text()
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        if not template and isinstance(cfg.get("chat_template"), str):
            template = cfg["chat_template"]
        for name in ("bos_token", "eos_token"):
            value = cfg.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                specials[name] = value
    return template, specials


def chat_template_overhead(tokenizer: Any, tokenizer_path: str | Path | None) -> int:
    """Tokens the model's chat template adds around one user message (0 when no template is found)."""
    file = find_tokenizer_json(tokenizer_path)
    if file is None or tokenizer is None:
        return 0
    template, specials = _read_chat_template(file.parent)
    if not template:
        return 0
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    # The same environment options transformers renders chat templates with.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        rendered = env.from_string(template).render(
            messages=[{"role": "user", "content": ""}], add_generation_prompt=True, **specials
        )
    except Exception:  # an exotic template: no adjustment rather than no benchmark
        return 0
    return len(tokenizer.encode(rendered, add_special_tokens=False).ids)


def build_dataset(
    tokenizer: Any | None,
    count: int,
    *,
    input_mean: int,
    input_stddev: float,
    output_mean: int | None,
    output_stddev: float,
    template_overhead: int = 0,
    seed: int = 0,
) -> list[PromptSpec]:
    """``count`` prompts; a prompt's text is shortened by ``template_overhead`` tokens (at least 1 left)."""
    lengths = random.Random(seed ^ 0x5EED)
    prompts = SyntheticPrompts(tokenizer, seed)
    out: list[PromptSpec] = []
    for _ in range(count):
        total = sample_length(lengths, input_mean, input_stddev)
        n_in = max(1, total - template_overhead)
        n_out = sample_length(lengths, output_mean, output_stddev) if output_mean is not None else None
        out.append(PromptSpec(prompts.make(n_in), n_in + template_overhead, n_out))
    return out
