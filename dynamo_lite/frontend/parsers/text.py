"""Reasoning and tool calls written as tags in the text, for model families other than gpt-oss.

- ``ThinkTags``: ``<think>…</think>`` reasoning (``qwen3``: only when the output opens with ``<think>``;
  ``deepseek_r1``: the chat template already opened it, so the output is reasoning until ``</think>``).
- ``HermesToolCalls``: ``<tool_call>{"name": …, "arguments": {…}}</tool_call>`` (Hermes, Qwen 2.5/3).

Both work on streamed text: a tail that could be the start of a tag is held back until the next piece decides.
``TaggedText`` runs the detokenizer and then these two, token by token so that reasoning tokens are counted.
"""

from __future__ import annotations

import json

from dynamo_lite.frontend.detokenize import Detokenizer
from dynamo_lite.frontend.parsers.base import Delta, ToolCallDelta, held_prefix, new_call_id

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


class ThinkTags:
    """Splits streamed text into reasoning and answer at ``<think>``/``</think>``."""

    __slots__ = ("_state", "_buf")

    def __init__(self, *, starts_in_reasoning: bool) -> None:
        # "open?": an opening tag may still come; "reasoning"; "closed": just after </think>, where the
        # newlines that separate reasoning from the answer are dropped; "answer"
        self._state = "open?" if not starts_in_reasoning else "reasoning"
        self._buf = ""

    @property
    def in_reasoning(self) -> bool:
        return self._state == "reasoning"

    @property
    def undecided(self) -> bool:
        return self._state == "open?"

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) released by ``text``."""
        buf = self._buf + text
        self._buf = ""
        reasoning = answer = ""
        while buf:
            if self._state == "open?":
                stripped = buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self._state = "reasoning"
                    buf = stripped[len(THINK_OPEN) :]
                elif THINK_OPEN.startswith(stripped):
                    self._buf = buf  # could still become the opening tag
                    return reasoning, answer
                else:
                    self._state = "answer"
            elif self._state == "reasoning":
                end = buf.find(THINK_CLOSE)
                if end == -1:
                    keep = held_prefix(buf, THINK_CLOSE)
                    reasoning += buf[:keep]
                    self._buf = buf[keep:]
                    return reasoning, answer
                reasoning += buf[:end]
                buf = buf[end + len(THINK_CLOSE) :]
                self._state = "closed"
            elif self._state == "closed":
                buf = buf.lstrip("\n")
                if buf:
                    self._state = "answer"
            else:
                answer += buf
                buf = ""
        return reasoning, answer

    def flush(self) -> tuple[str, str]:
        held, self._buf = self._buf, ""
        return (held, "") if self._state == "reasoning" else ("", held)


class HermesToolCalls:
    """Finds ``<tool_call>{json}</tool_call>`` blocks in the answer text; a block that is not a valid call, or
    calls a function not in ``functions`` (the request's declared ones; None: any), stays text."""

    __slots__ = ("_buf", "_in_call", "_functions", "count")

    def __init__(self, functions: frozenset[str] | None = None) -> None:
        self._buf = ""
        self._in_call = False
        self._functions = functions
        self.count = 0

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        buf = self._buf + text
        self._buf = ""
        answer = ""
        calls: list[ToolCallDelta] = []
        while buf:
            if not self._in_call:
                start = buf.find(CALL_OPEN)
                if start == -1:
                    keep = held_prefix(buf, CALL_OPEN)
                    answer += buf[:keep]
                    self._buf = buf[keep:]
                    break
                answer += buf[:start]
                buf = buf[start + len(CALL_OPEN) :]
                self._in_call = True
            else:
                end = buf.find(CALL_CLOSE)
                if end == -1:
                    self._buf = buf  # the call's JSON is emitted whole, once closed
                    break
                call = self._call(buf[:end])
                if call is None:
                    answer += CALL_OPEN + buf[: end + len(CALL_CLOSE)]
                else:
                    calls.append(call)
                buf = buf[end + len(CALL_CLOSE) :]
                self._in_call = False
        return answer, calls

    def _call(self, body: str) -> ToolCallDelta | None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        if self._functions is not None and obj["name"] not in self._functions:
            return None  # never a call the client did not declare
        args = obj.get("arguments", obj.get("parameters", {}))
        arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        call = ToolCallDelta(self.count, new_call_id(), obj["name"], arguments)
        self.count += 1
        return call

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        held, self._buf = self._buf, ""
        if self._in_call:
            self._in_call = False
            call = self._call(held)  # a call cut off before its closing tag (stop token)
            return ("", [call]) if call is not None else (CALL_OPEN + held, [])
        return held, []


class TaggedText:
    """Detokenize, then split reasoning (``think``) and tool calls (``tools``) out of the text."""

    __slots__ = ("_detok", "_think", "_tools", "_undecided", "reasoning_tokens")

    def __init__(self, detok: Detokenizer, think: ThinkTags | None, tools: HermesToolCalls | None) -> None:
        self._detok = detok
        self._think = think
        self._tools = tools
        self._undecided = 0  # tokens read while an opening <think> might still come
        self.reasoning_tokens = 0

    @property
    def tool_calls(self) -> int:
        return self._tools.count if self._tools is not None else 0

    def feed(self, token_ids: list[int]) -> Delta:
        out = Delta()
        think = self._think
        if think is None:
            self._answer(out, self._detok.step(token_ids))
            return out
        for token in token_ids:  # one at a time: a token counts as reasoning if it arrived while reasoning
            reasoning_before = think.in_reasoning
            reasoning, answer = think.feed(self._detok.step([token]))
            if reasoning_before or think.in_reasoning:
                self.reasoning_tokens += 1 + self._undecided
                self._undecided = 0
            elif think.undecided:
                self._undecided += 1
            else:
                self._undecided = 0
            out.reasoning += reasoning
            self._answer(out, answer)
        return out

    def _answer(self, out: Delta, text: str) -> None:
        if self._tools is None:
            out.content += text
            return
        answer, calls = self._tools.feed(text)
        out.content += answer
        out.tool_calls.extend(calls)

    def flush(self) -> Delta:
        out = Delta()
        if self._think is not None:
            reasoning, answer = self._think.flush()
            out.reasoning += reasoning
            self._answer(out, answer)
        if self._tools is not None:
            answer, calls = self._tools.flush()
            out.content += answer
            out.tool_calls.extend(calls)
        return out
