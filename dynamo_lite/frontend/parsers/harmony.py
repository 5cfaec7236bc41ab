"""gpt-oss's output, parsed token by token with ``openai-harmony``'s ``StreamableParser``.

The model writes messages such as ``<|channel|>analysis<|message|>…<|end|>`` then
``<|start|>assistant<|channel|>final<|message|>…<|return|>``, or a tool call, with the recipient after the
channel or before it, content type ``json`` (often ``<|constrain|>json``) or ``code``:
``<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{…}<|call|>``,
``<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{…}<|call|>``. It maps to:

- a message to ``functions.NAME``, NAME a function the request declared → a tool call, on **any** channel
  (gpt-oss addresses about half its calls on ``analysis``). A call on ``analysis`` is held until it closes:
  closed by ``<|call|>`` (or cut off by the end of output) it is the call; closed by ``<|end|>`` it is a draft,
  replaced by a later call to the same function (the model repeating it on ``commentary``), else returned at
  the end. Calls equal in name and arguments to one already returned are dropped.
- a message to any other recipient (an undeclared function, a built-in tool such as ``browser.search``) →
  reasoning: the model's own action, never a ``tool_calls`` entry the client did not declare;
- ``analysis`` → reasoning;
- ``final``, ``commentary`` without a recipient (a preamble), or no channel → answer text.

Output that opens with ``<|start|>assistant`` (the role the prompt already wrote) is read as such, not as a
recipient. Output that is not harmony (no header, a header that never closes, tokens out of place) degrades to
plain text: what was held back and everything after it is detokenized as answer text, special tokens dropped.
A header cut short by the end of output (``max_tokens``) is dropped, never shown as text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tokenizers import Tokenizer

from dynamo_lite.frontend.detokenize import Detokenizer
from dynamo_lite.frontend.harmony import encoding
from dynamo_lite.frontend.parsers.base import Delta, ToolCallDelta, new_call_id
from dynamo_lite.gpt_oss import vocab

MAX_HEADER_TOKENS = 64
"""A header (``<|channel|>commentary to=functions.x <|constrain|>json``) is a dozen tokens; past this many
without ``<|message|>`` the model is not writing harmony."""

FUNCTIONS = "functions."


def _same_call(name: str, arguments: str, other: tuple[str, str]) -> bool:
    if name != other[0]:
        return False
    try:
        return json.loads(arguments) == json.loads(other[1])
    except ValueError:
        return arguments.strip() == other[1].strip()


class HarmonyOutput:
    """``functions``: the function names the request declared (only these become tool calls)."""

    __slots__ = (
        "_parser",
        "_tokenizer",
        "_new_detok",
        "_functions",
        "_raw",
        "_header",
        "_started",
        "_kind",
        "_call",
        "_held",
        "_drafts",
        "_returned",
        "reasoning_tokens",
        "tool_calls",
    )

    def __init__(
        self,
        tokenizer: Tokenizer,
        new_detokenizer: Callable[[], Detokenizer],
        functions: frozenset[str] = frozenset(),
    ) -> None:
        from openai_harmony import Role, StreamableParser

        self._parser = StreamableParser(encoding(), role=Role.ASSISTANT)
        self._tokenizer = tokenizer
        self._new_detok = new_detokenizer
        self._functions = functions
        self._raw: Detokenizer | None = None  # set once the output proved not to be harmony
        self._header: list[int] = []  # ids of the message header being read (not shown)
        self._started = False  # any token read
        self._kind = ""  # the open message: "reasoning" | "content" | "call" | "held" ("" between messages)
        self._call: ToolCallDelta | None = None  # the streamed tool call whose arguments are coming
        self._held: tuple[str, list[str]] | None = None  # the analysis-channel call being read: name, text
        self._drafts: list[tuple[str, str]] = []  # analysis-channel calls closed by <|end|>: name, arguments
        self._returned: list[tuple[str, str]] = []  # calls given out: name, arguments
        self.reasoning_tokens = 0
        self.tool_calls = 0

    def feed(self, token_ids: list[int]) -> Delta:
        if self._raw is not None:
            return Delta(self._raw.step(token_ids))
        from openai_harmony import HarmonyError, StreamState

        out = Delta()
        for i, token in enumerate(token_ids):
            if not self._started:
                self._started = True
                if token == vocab.START:  # the model wrote the role the prompt already wrote: read it as one
                    from openai_harmony import StreamableParser

                    self._parser = StreamableParser(encoding(), role=None)
            parser = self._parser
            try:
                parser.process(token)
            except HarmonyError:
                return self._degrade(out, token_ids[i:])
            if parser.state == StreamState.CONTENT:
                if not self._kind:
                    self._begin_message(out)
                # Special tokens inside a message are not text (harmony would spell them out).
                text = parser.last_content_delta if token < vocab.NUM_BPE_RANKS else None
                self._content(out, text or "")
            else:
                if self._kind:  # <|end|>, <|return|> or <|call|> closed the message
                    self._end_message(out, closed_by_end=token == vocab.END)
                if parser.state == StreamState.HEADER:
                    self._header.append(token)
                    if len(self._header) > MAX_HEADER_TOKENS:
                        return self._degrade(out, token_ids[i + 1 :])
        return out

    def _begin_message(self, out: Delta) -> None:
        self._header.clear()
        parser = self._parser
        recipient = parser.current_recipient or ""
        name = recipient[len(FUNCTIONS) :] if recipient.startswith(FUNCTIONS) else None
        if name is not None and name in self._functions:
            self._drafts = [d for d in self._drafts if d[0] != name]  # this call replaces its draft
            if parser.current_channel == "analysis":
                self._kind, self._held = "held", (name, [])
            else:
                self._kind = "call"
                self._call = ToolCallDelta(self.tool_calls, new_call_id(), name)
                self.tool_calls += 1
                self._returned.append((name, ""))
                out.tool_calls.append(ToolCallDelta(self._call.index, self._call.id, name))
        elif recipient and recipient != "assistant" or parser.current_channel == "analysis":
            self._kind = "reasoning"
        else:
            self._kind = "content"

    def _content(self, out: Delta, text: str) -> None:
        kind = self._kind
        if kind == "reasoning":
            self.reasoning_tokens += 1
            out.reasoning += text
        elif kind == "content":
            out.content += text
        elif kind == "held":
            self._held[1].append(text)  # type: ignore[index]
        elif text:
            call = self._call
            out.tool_calls.append(ToolCallDelta(call.index, arguments=text))  # type: ignore[union-attr]
            name, args = self._returned[-1]
            self._returned[-1] = (name, args + text)

    def _end_message(self, out: Delta, *, closed_by_end: bool) -> None:
        if self._kind == "held":
            name, parts = self._held  # type: ignore[misc]
            if closed_by_end:
                self._drafts.append((name, "".join(parts)))
            else:
                self._return_call(out, name, "".join(parts))
            self._held = None
        self._kind = ""
        self._call = None

    def _return_call(self, out: Delta, name: str, arguments: str) -> None:
        if any(_same_call(name, arguments, c) for c in self._returned):
            return  # the same call again: one call
        self._returned.append((name, arguments))
        out.tool_calls.append(ToolCallDelta(self.tool_calls, new_call_id(), name, arguments))
        self.tool_calls += 1

    def _degrade(self, out: Delta, rest: list[int]) -> Delta:
        """Not harmony: show the held-back header and everything from here on as plain text."""
        self._raw = self._new_detok()
        pending, self._header = self._header + rest, []
        if pending:
            out.content += self._raw.step(pending)
        return out

    def flush(self) -> Delta:
        out = Delta()
        if self._raw is not None:
            return out
        if self._kind == "held":  # an analysis-channel call cut off: still the call it was becoming
            self._end_message(out, closed_by_end=False)
        for name, arguments in self._drafts:  # drafts never repeated: the model's calls all the same
            self._return_call(out, name, arguments)
        self._drafts = []
        header, self._header = self._header, []
        if header and not self._kind:
            text = self._tokenizer.decode(header, skip_special_tokens=True)
            if header[0] not in (vocab.CHANNEL, vocab.START) and not _recipient_header(text):
                # The model never wrote a harmony header (it opens with <|channel|>, <|start|> or " to="): what it
                # wrote is its answer. A header cut short (max_tokens) is dropped.
                out.content += text
        return out


def _recipient_header(text: str) -> bool:
    """Whether ``text`` is (the start of) a header naming a recipient first: `` to=functions.x``."""
    return " to=".startswith(text) or text.lstrip().startswith("to=")


def declared_functions(tools: list[Any] | None) -> frozenset[str]:
    """The function names of a request's ``tools`` (chat's nested or Responses' flat shape)."""
    names = set()
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if isinstance(name, str):
            names.add(name)
    return frozenset(names)
