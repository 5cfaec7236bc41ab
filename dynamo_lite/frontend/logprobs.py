"""Token log-probabilities in OpenAI's shapes, from the engines' ``TokenLogprobs``.

- Chat: ``choices[].logprobs = {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.
- Completions (legacy): ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``.

Streamed, a chunk carries the entries of the tokens that arrived since the last event (text held back by the
detokenizer or a stop-string match may come in a later event than its tokens' entries). The values are the
engine's: ``log_softmax`` of the raw model logits (before penalties and temperature).
"""

from __future__ import annotations

import weakref
from typing import Any

import orjson
from tokenizers import Tokenizer

from dynamo_lite.protocol import GenerateChunk

_NULL = b',"logprobs":null,"finish_reason":'


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(visible), 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(visible, chars, strict=True)}


_BYTE_DECODER = _byte_decoder()


class TokenBytes:
    """Each token id's exact bytes (byte-level vocabularies) and its text, cached as they are asked for."""

    __slots__ = ("_tokenizer", "_cache")

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        piece = self._tokenizer.id_to_token(token_id) or ""
        if piece and all(c in _BYTE_DECODER for c in piece):
            raw = bytes(_BYTE_DECODER[c] for c in piece)
        else:  # not byte-level (or an added token spelled outside the alphabet): its decoded text
            raw = self._tokenizer.decode([token_id], skip_special_tokens=False).encode()
        entry = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return entry


def splice(event: bytes, logprobs: bytes) -> bytes:
    """A preformatted single-choice chunk (``..."logprobs":null,"finish_reason":...``) with ``logprobs`` in.

    Safe on raw bytes: inside JSON strings every quote is escaped, so the pattern only matches the field."""
    at = event.rfind(_NULL)
    if at < 0:
        return event
    return event[:at] + b',"logprobs":' + logprobs + b',"finish_reason":' + event[at + len(_NULL) :]


class ChatLogprobs:
    """Collects a chat choice's entries; ``take`` hands over those not yet sent."""

    __slots__ = ("_texts", "_pending", "_all")

    def __init__(self, texts: TokenBytes) -> None:
        self._texts = texts
        self._pending: list[dict[str, Any]] = []
        self._all: list[dict[str, Any]] = []

    def add(self, chunk: GenerateChunk, count: int) -> None:
        """The first ``count`` tokens of ``chunk`` (those the response counts)."""
        lp = chunk.logprobs
        if lp is None or count <= 0:
            return
        texts = self._texts
        for i, token_id in enumerate(chunk.token_ids[:count]):
            text, raw = texts(token_id)
            tops = lp.top_ids[i] if i < len(lp.top_ids) else []
            values = lp.top_logprobs[i] if i < len(lp.top_logprobs) else []
            top = []
            for t, v in zip(tops, values, strict=True):
                t_text, t_raw = texts(t)
                top.append({"token": t_text, "logprob": v, "bytes": list(t_raw)})
            entry = {"token": text, "logprob": lp.logprobs[i], "bytes": list(raw), "top_logprobs": top}
            self._pending.append(entry)
            self._all.append(entry)

    def take(self) -> bytes | None:
        if not self._pending:
            return None
        out = orjson.dumps({"content": self._pending})
        self._pending = []
        return out

    def whole(self) -> dict[str, Any]:
        return {"content": self._all}


class CompletionLogprobs:
    """Collects a completion choice's legacy logprobs; with ``echo_ids`` (``echo``) the prompt's tokens come
    first (the first with no log-probability, as in OpenAI's answers), scored by the engine
    (``GenerateChunk.prompt_logprobs``). ``text_offset`` counts characters of the returned text."""

    __slots__ = ("_texts", "_offset", "_pending", "_all", "_echo_ids")

    def __init__(self, texts: TokenBytes, echo_ids: list[int] | None = None) -> None:
        self._texts = texts
        self._offset = 0
        self._pending = self._empty()
        self._all = self._empty()
        self._echo_ids = echo_ids  # until the prompt's entries are in

    @staticmethod
    def _empty() -> dict[str, list]:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, chunk: GenerateChunk, count: int) -> None:
        if self._echo_ids is not None:
            self._add_prompt(self._echo_ids, chunk)
            self._echo_ids = None
        lp = chunk.logprobs
        if lp is None or count <= 0:
            return
        texts = self._texts
        for i, token_id in enumerate(chunk.token_ids[:count]):
            text, _ = texts(token_id)
            tops = lp.top_ids[i] if i < len(lp.top_ids) else []
            values = lp.top_logprobs[i] if i < len(lp.top_logprobs) else []
            top = {texts(t)[0]: v for t, v in zip(tops, values, strict=True)}
            self._append(text, lp.logprobs[i], top)

    def _add_prompt(self, token_ids: list[int], chunk: GenerateChunk) -> None:
        scored = chunk.prompt_logprobs
        texts = self._texts
        self._append(texts(token_ids[0])[0], None, None)
        for i, token_id in enumerate(token_ids[1:]):
            if scored is None or i >= len(scored.logprobs):
                self._append(texts(token_id)[0], None, None)
                continue
            tops = scored.top_ids[i] if i < len(scored.top_ids) else []
            values = scored.top_logprobs[i] if i < len(scored.top_logprobs) else []
            top = {texts(t)[0]: v for t, v in zip(tops, values, strict=True)}
            self._append(texts(token_id)[0], scored.logprobs[i], top)

    def _append(self, text: str, logprob: float | None, top: dict[str, float] | None) -> None:
        for part in (self._pending, self._all):
            part["tokens"].append(text)
            part["token_logprobs"].append(logprob)
            part["top_logprobs"].append(top)
            part["text_offset"].append(self._offset)
        self._offset += len(text)

    def take(self) -> bytes | None:
        if not self._pending["tokens"]:
            return None
        out = orjson.dumps(self._pending)
        self._pending = self._empty()
        return out

    def whole(self) -> dict[str, Any]:
        return self._all


_TOKEN_BYTES: weakref.WeakKeyDictionary[Any, TokenBytes] = weakref.WeakKeyDictionary()


def token_bytes(pre: Any) -> TokenBytes:
    """The ``TokenBytes`` of a model's preprocessor (one per preprocessor, kept as long as it lives)."""
    found = _TOKEN_BYTES.get(pre)
    if found is None:
        found = _TOKEN_BYTES[pre] = TokenBytes(pre.tokenizer)
    return found
