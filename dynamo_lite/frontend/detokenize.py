"""Token ids → text, incrementally, and stop strings matched across chunk boundaries.

Byte-level BPE splits one character over several tokens: a chunk's text is only released once it decodes to
complete UTF-8. Three detokenizers, fastest first:

- ``ByteLevelDetokenizer``: for byte-level decoders (GPT-2 family: Llama 3, Qwen, gpt-oss, SmolLM2)
  decoding is concatenation, so a token that is complete UTF-8 on its own always decodes to the same text:
  look it up in a table built once per tokenizer; only the few partial-byte tokens go through ``decode``.
- ``StreamDetokenizer``: ``tokenizers.decoders.DecodeStream`` (tokenizers >= 0.21), any decoder, in Rust.
- ``WindowDetokenizer``: a prefix offset window like vLLM/TGI (decode the window with and without the new ids,
  emit the difference once it no longer ends in U+FFFD), for older tokenizers.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None


class StreamDetokenizer:
    """Rust ``DecodeStream``: one call per chunk, whatever its number of tokens."""

    __slots__ = ("_tokenizer", "_stream")

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_ids: list[int]) -> str:
        """Text completed by ``token_ids`` ("" while a character is still incomplete)."""
        # a bare int is ~1/3 cheaper than a one-element list, and one token per chunk is the common case
        ids = token_ids[0] if len(token_ids) == 1 else token_ids
        return self._stream.step(self._tokenizer, ids) or ""


class WindowDetokenizer:
    """Pure-Python fallback with a prefix offset window (vLLM's ``detokenize_incrementally``)."""

    __slots__ = ("_tokenizer", "_skip", "_ids", "_read")

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # the window: ids[:_read] were emitted, the rest are pending
        self._read = 0

    def step(self, token_ids: list[int]) -> str:
        ids = self._ids
        ids.extend(token_ids)
        decode = self._tokenizer.decode
        # The window's first tokens give the text context (leading spaces, merges) the new ids decode against.
        prefix = decode(ids[: self._read], skip_special_tokens=self._skip) if self._read else ""
        full = decode(ids, skip_special_tokens=self._skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        del ids[: self._read]
        self._read = len(ids)
        return full[len(prefix) :]


_MAX_UTF8_BYTES = 4  # a character spans at most 4 byte-level tokens


def token_text_table(tokenizer: Tokenizer, skip_special_tokens: bool = True) -> list[str | None] | None:
    """Per token id, its text when it is complete UTF-8 on its own (None when it is a partial character);
    None for tokenizers whose decoding is not plain concatenation (not byte-level)."""
    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
        return None
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    texts = tokenizer.decode_batch([[i] for i in range(n)], skip_special_tokens=skip_special_tokens)
    return [None if "\ufffd" in t else t for t in texts]


class ByteLevelDetokenizer:
    """Table lookups for whole-character tokens; ``decode`` only for runs of partial-character tokens."""

    __slots__ = ("_tokenizer", "_skip", "_texts", "_pending")

    def __init__(
        self, tokenizer: Tokenizer, texts: list[str | None], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._texts = texts
        self._pending: list[int] = []  # ids of an incomplete character

    def step(self, token_ids: list[int]) -> str:
        texts = self._texts
        if len(token_ids) == 1 and not self._pending:
            i = token_ids[0]
            text = texts[i] if 0 <= i < len(texts) else None
            if text is not None:
                return text
        out = []
        pending = self._pending
        for i in token_ids:
            text = texts[i] if not pending and 0 <= i < len(texts) else None
            if text is not None:
                out.append(text)
                continue
            pending.append(i)
            text = self._tokenizer.decode(pending, skip_special_tokens=self._skip)
            # release once complete; give up waiting after 4 tokens (invalid bytes stay U+FFFD, like decode)
            if not text.endswith("\ufffd") or len(pending) >= _MAX_UTF8_BYTES:
                out.append(text)
                pending.clear()
        return "".join(out)


Detokenizer = ByteLevelDetokenizer | StreamDetokenizer | WindowDetokenizer


def make_detokenizer(
    tokenizer: Tokenizer, skip_special_tokens: bool = True, texts: list[str | None] | None = None
) -> Detokenizer:
    """The fastest detokenizer for ``tokenizer``; ``texts`` from ``token_text_table`` enables the table."""
    if texts is not None:
        return ByteLevelDetokenizer(tokenizer, texts, skip_special_tokens)
    if DecodeStream is not None:
        return StreamDetokenizer(tokenizer, skip_special_tokens)
    return WindowDetokenizer(tokenizer, skip_special_tokens)


class StopMatcher:
    """Finds stop strings in streamed text; everything after the matched stop is dropped, and the stop itself
    too unless ``include_stop`` (``include_stop_str_in_output``).

    Text that could be the start of a stop string is held back until the next chunk decides it.

    >>> m = StopMatcher(["</s>"])
    >>> m.feed("hello </"), m.feed("s> more")
    (('hello ', False), ('', True))
    """

    __slots__ = ("_stops", "_pending", "_include", "matched")

    def __init__(self, stops: list[str], include_stop: bool = False) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self._include = include_stop
        self.matched: str | None = None  # the stop string that ended the text, once one did

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        buf = self._pending + text if self._pending else text
        if not buf:
            return "", False
        hit, end = -1, -1
        for stop in self._stops:
            i = buf.find(stop)
            if i != -1 and (hit == -1 or i < hit or (i == hit and i + len(stop) > end)):
                hit, end = i, i + len(stop)
        if hit != -1:
            self._pending = ""
            self.matched = buf[hit:end]
            return buf[: end if self._include else hit], True
        keep = len(buf)
        for stop in self._stops:
            # The earliest position where the rest of ``buf`` is a proper prefix of ``stop``.
            first = stop[0]
            i = buf.find(first, max(0, len(buf) - len(stop) + 1))
            while i != -1 and i < keep:
                if stop.startswith(buf[i:]):
                    keep = i
                    break
                i = buf.find(first, i + 1)
        self._pending = buf[keep:]
        return buf[:keep], False

    def flush(self) -> str:
        """The held-back text, once the stream ended without a stop."""
        out, self._pending = self._pending, ""
        return out
