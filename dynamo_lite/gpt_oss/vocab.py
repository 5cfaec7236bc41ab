"""gpt-oss's tokenizer, built offline: ``o200k_harmony`` = o200k_base + the harmony special tokens.

The package ships the public o200k_base vocabulary (``o200k_base.tiktoken``, the very file ``tiktoken`` and
``openai-harmony`` download and verify by SHA-256). From it we build

- the environment ``openai-harmony`` needs to load ``HARMONY_GPT_OSS`` with no network
  (``TIKTOKEN_ENCODINGS_BASE`` naming a folder that holds the file; ``use_bundled_vocab``), and
- a Hugging Face ``tokenizer.json`` that encodes exactly as ``openai-harmony`` does (``write_tokenizer``): the
  BPE ranks as vocab and merges, o200k's split regex, byte-level decoding, and the special tokens at their ids.

Air-gapped clusters: set ``TIKTOKEN_ENCODINGS_BASE`` to a folder holding ``o200k_base.tiktoken`` before starting
any process that renders harmony; when it is unset the frontend uses the copy inside this package.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

VOCAB_FILE = Path(__file__).with_name("o200k_base.tiktoken")
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

# tiktoken's o200k_base pre-tokenization pattern (tiktoken_ext/openai_public.py)
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

NUM_BPE_RANKS = 199_998
VOCAB_SIZE = 201_088  # o200k_harmony: ranks + special ids 199998..201087

STARTOFTEXT, ENDOFTEXT = 199_998, 199_999
RETURN, CONSTRAIN, CHANNEL, START, END, MESSAGE, CALL = (
    200_002,
    200_003,
    200_005,
    200_006,
    200_007,
    200_008,
    200_012,
)
ENDOFPROMPT = 200_018
STOP_TOKENS_FOR_ASSISTANT_ACTIONS = (RETURN, CALL)
"""What ends an assistant's turn: a final answer (``<|return|>``) or a tool call (``<|call|>``)."""

SPECIAL_TOKENS: dict[int, str] = {
    STARTOFTEXT: "<|startoftext|>",
    ENDOFTEXT: "<|endoftext|>",
    RETURN: "<|return|>",
    CONSTRAIN: "<|constrain|>",
    CHANNEL: "<|channel|>",
    START: "<|start|>",
    END: "<|end|>",
    MESSAGE: "<|message|>",
    CALL: "<|call|>",
    ENDOFPROMPT: "<|endofprompt|>",  # as in gpt-oss's tokenizer.json (openai-harmony names it reserved)
}


def special_token_name(token_id: int) -> str:
    return SPECIAL_TOKENS.get(token_id) or f"<|reserved_{token_id}|>"


def use_bundled_vocab() -> None:
    """Point ``openai-harmony``/``tiktoken`` at the bundled vocabulary unless the operator chose a folder."""
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(VOCAB_FILE.parent))


def load_ranks(path: Path = VOCAB_FILE) -> dict[bytes, int]:
    """The BPE ranks of a ``.tiktoken`` file (base64 token, rank per line), checked against its SHA-256."""
    data = path.read_bytes()
    if path == VOCAB_FILE and hashlib.sha256(data).hexdigest() != VOCAB_SHA256:
        raise ValueError(f"{path} is damaged: its SHA-256 is not o200k_base's")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _byte_encoder() -> dict[int, str]:
    """GPT-2's byte → printable character map (what ``ByteLevel`` pre-tokenization produces)."""
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
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def tokenizer_json(ranks: dict[bytes, int] | None = None) -> dict:
    """The ``tokenizer.json`` document of o200k_harmony (what transformers' ``TikTokenConverter`` builds)."""
    ranks = ranks if ranks is not None else load_ranks()
    enc = _byte_encoder()

    def text(token: bytes) -> str:
        return "".join(enc[b] for b in token)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            lr, rr = ranks.get(left), ranks.get(right)
            if lr is not None and rr is not None:
                merges.append((rank, lr, rr, text(left), text(right)))
    merges.sort()
    added = [
        {
            "id": i,
            "content": special_token_name(i),
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i in range(NUM_BPE_RANKS, VOCAB_SIZE)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": O200K_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": [[m[3], m[4]] for m in merges],
        },
    }


def write_tokenizer(folder: str | os.PathLike[str]) -> None:
    """Write gpt-oss's ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(), ensure_ascii=False))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[STARTOFTEXT],
        "eos_token": SPECIAL_TOKENS[RETURN],
        "pad_token": SPECIAL_TOKENS[ENDOFTEXT],
        "model_max_length": 131072,
        "added_tokens_decoder": {
            str(i): {"content": special_token_name(i), "special": True} for i in SPECIAL_TOKENS
        },
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
