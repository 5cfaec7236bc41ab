"""gpt-oss's output, parsed token by token with ``openai-harmony``'s ``StreamableParser``.

The model writes messages such as ``<|channel|>analysis<|message|>…<|end|>`` then
``<|start|>assistant<|channel|>final<|message|>…<|return|>``, or a tool call
``<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{…}<|call|>``. Channels map to:

- ``analysis`` → reasoning;
- ``final``, ``commentary`` without a recipient (a preamble), or no channel → answer text;
- a message to a recipient (``functions.NAME``) → a tool call named NAME, its content the arguments.

Output that is not harmony (no header, a header that never closes, tokens out of place) degrades to plain text:
what was held back and everything after it is detokenized as answer text, special tokens dropped.
"""

from __future__ import annotations

from collections.abc import Callable

from tokenizers import Tokenizer

from dynamo_lite.frontend.detokenize import Detokenizer
from dynamo_lite.frontend.harmony import encoding
from dynamo_lite.frontend.parsers.base import Delta, ToolCallDelta, new_call_id
from dynamo_lite.gpt_oss import vocab

MAX_HEADER_TOKENS = 64
"""A header (``<|channel|>commentary to=functions.x <|constrain|>json``) is a dozen tokens; past this many
without ``<|message|>`` the model is not writing harmony."""


class HarmonyOutput:
    __slots__ = (
        "_parser",
        "_tokenizer",
        "_new_detok",
        "_raw",
        "_header",
        "_in_content",
        "_call",
        "_seen_content",
        "reasoning_tokens",
        "tool_calls",
    )

    def __init__(self, tokenizer: Tokenizer, new_detokenizer: Callable[[], Detokenizer]) -> None:
        from openai_harmony import Role, StreamableParser

        self._parser = StreamableParser(encoding(), role=Role.ASSISTANT)
        self._tokenizer = tokenizer
        self._new_detok = new_detokenizer
        self._raw: Detokenizer | None = None  # set once the output proved not to be harmony
        self._header: list[int] = []  # ids of the message header being read (not shown)
        self._in_content = False
        self._call: ToolCallDelta | None = None  # the tool call whose arguments are streaming
        self._seen_content = False
        self.reasoning_tokens = 0
        self.tool_calls = 0

    def feed(self, token_ids: list[int]) -> Delta:
        if self._raw is not None:
            return Delta(self._raw.step(token_ids))
        from openai_harmony import HarmonyError, StreamState

        out = Delta()
        parser = self._parser
        for i, token in enumerate(token_ids):
            try:
                parser.process(token)
            except HarmonyError:
                return self._degrade(out, token_ids[i:])
            if parser.state == StreamState.CONTENT:
                if not self._in_content:
                    self._begin_message(out)
                # Special tokens inside a message are not text (harmony would spell them out).
                text = parser.last_content_delta if token < vocab.NUM_BPE_RANKS else None
                channel = parser.current_channel
                if channel == "analysis":
                    self.reasoning_tokens += 1
                    if text:
                        out.reasoning += text
                elif self._call is not None:
                    if text:
                        out.tool_calls.append(ToolCallDelta(self._call.index, arguments=text))
                elif text:
                    out.content += text
            else:
                if self._in_content:  # <|end|>, <|return|> or <|call|> closed the message
                    self._in_content = False
                    self._call = None
                if parser.state == StreamState.HEADER:
                    self._header.append(token)
                    if len(self._header) > MAX_HEADER_TOKENS:
                        return self._degrade(out, token_ids[i + 1 :])
        return out

    def _begin_message(self, out: Delta) -> None:
        self._in_content = True
        self._seen_content = True
        self._header.clear()
        recipient = self._parser.current_recipient
        if recipient and self._parser.current_channel != "analysis":
            name = recipient.removeprefix("functions.")
            self._call = ToolCallDelta(self.tool_calls, new_call_id(), name)
            self.tool_calls += 1
            out.tool_calls.append(ToolCallDelta(self._call.index, self._call.id, name))

    def _degrade(self, out: Delta, rest: list[int]) -> Delta:
        """Not harmony: show the held-back header and everything from here on as plain text."""
        self._raw = self._new_detok()
        pending, self._header = self._header + rest, []
        if pending:
            out.content += self._raw.step(pending)
        return out

    def flush(self) -> Delta:
        if self._raw is None and self._header and not self._seen_content:
            # The model never wrote a message header's end: what it wrote is its answer.
            text = self._tokenizer.decode(self._header, skip_special_tokens=True)
            self._header = []
            return Delta(text)
        return Delta()
