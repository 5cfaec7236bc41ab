"""A faster encoder for byte-level BPE tokenizers (GPT-2 family: SmolLM2, Llama 3, Qwen, gpt-oss…).

Prompt tokenization is the largest per-request cost of the frontend. For the common tokenizer shape (byte-level
BPE whose merge order equals token-id order, GPT-2's pre-tokenization or a ``Split`` regex before a regex-free
``ByteLevel`` as Llama 3, Qwen 2 and gpt-oss have, no normalizer) ``tiktoken`` computes the
same ids 4–5× faster than ``tokenizers``. It is used only after it reproduced ``tokenizers``' output on a
self-check corpus at load time; any other tokenizer keeps the ``tokenizers`` path.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from tokenizers import Tokenizer

log = logging.getLogger(__name__)

# The regex of tokenizers' ByteLevel pre-tokenizer with use_regex=true (GPT-2's).
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_SELF_CHECK = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Hello,   world!\n\n\tTabs\tand  spaces  ",
    "Numbers 1234567890 and 3.14159, emoji 🙂🚀, accents héllo wörld, CJK 你好，世界",
    "don't won't I'll we've they're it's ' quoted' \"double\"",
    "",
    " leading space",
    "trailing newline\n",
]


def _byte_decoder() -> dict[str, int]:
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _split_pattern(pre: dict) -> str | None:
    """The pre-tokenization regex of a byte-level tokenizer: GPT-2's (``ByteLevel`` with its regex), or the
    ``Split`` regex before a regex-free ``ByteLevel`` (Llama 3, Qwen 2, gpt-oss's o200k); None for others."""
    if pre.get("type") == "ByteLevel":
        ok = pre.get("use_regex", True) and not pre.get("add_prefix_space")
        return _GPT2_PATTERN if ok else None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    regex = (split.get("pattern") or {}).get("Regex")
    if (
        split.get("type") != "Split"
        or not isinstance(regex, str)
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or byte_level.get("type") != "ByteLevel"
        or byte_level.get("use_regex", True)
        or byte_level.get("add_prefix_space")
    ):
        return None
    return regex


class FastBpeEncoder:
    """``encode(text) -> ids``, equal to ``tokenizer.encode(text, add_special_tokens=False).ids``."""

    def __init__(self, encoding) -> None:  # noqa: ANN001 — tiktoken.Encoding
        self._encoding = encoding

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode(text, allowed_special="all")

    @classmethod
    def try_build(cls, tokenizer_json: str | Path, tokenizer: Tokenizer) -> FastBpeEncoder | None:
        """The fast encoder for this tokenizer, or ``None`` if its shape is not supported or not identical."""
        try:
            import tiktoken
        except ImportError:
            return None
        try:
            spec = json.loads(Path(tokenizer_json).read_text())
            model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
            if spec.get("normalizer") or model.get("type") != "BPE" or model.get("dropout"):
                return None
            pattern = _split_pattern(pre)
            if pattern is None:
                return None
            vocab: dict[str, int] = model["vocab"]
            previous = -1
            for merge in model.get("merges", []):
                a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
                merged = vocab.get(a + b, -1)
                if merged < previous or vocab[a] < 0 or vocab[b] < 0:
                    return None  # merge priority differs from id order: tiktoken would merge differently
                previous = merged
            decoder = _byte_decoder()
            ranks = {bytes(decoder[ch] for ch in token): i for token, i in vocab.items()}
            special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
            encoding = tiktoken.Encoding(
                "dynamo_lite_bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special
            )
        except (KeyError, ValueError, TypeError, OSError) as e:
            log.info("fast BPE not used for %s: %s", tokenizer_json, e)
            return None
        fast = cls(encoding)
        if not fast._agrees_with(tokenizer):
            log.warning("fast BPE disagrees with tokenizers on %s; using tokenizers", tokenizer_json)
            return None
        return fast

    def _agrees_with(self, tokenizer: Tokenizer) -> bool:
        rng = random.Random(0)
        size = tokenizer.get_vocab_size()
        samples = list(_SELF_CHECK)
        for _ in range(64):  # random in-vocab text exercises the merge table widely
            samples.append(tokenizer.decode([rng.randrange(size) for _ in range(rng.randint(1, 64))]))
        return all(self.encode(s) == tokenizer.encode(s, add_special_tokens=False).ids for s in samples)
