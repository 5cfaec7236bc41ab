"""Strict tools in an engine: where a call's arguments start (``ToolArgsGrammar``), followed token by token.

The watcher reads the output; when a tool's call header (one of its ``triggers``) is followed by ``open_id``,
``advance`` names that tool: the engine then constrains the arguments with the tool's schema until its grammar
ends (a stop token once the JSON is complete). Plain Python, shared by every engine with a grammar backend.
"""

from __future__ import annotations

from dynamo_lite.protocol import ToolArgsGrammar

MAX_HEADER_GAP = 8
"""Tokens a header may still hold between the tool's name and ``<|message|>`` (`` <|constrain|>json``, a
channel and a content type): past them, what was seen was not a call header."""


class ToolArgsWatcher:
    __slots__ = ("_grammars", "_tail", "_keep", "_pending", "_waited")

    def __init__(self, grammars: list[ToolArgsGrammar]) -> None:
        self._grammars = grammars
        self._keep = max((len(t) for g in grammars for t in g.triggers), default=1)
        self._tail: list[int] = []
        self._pending: int | None = None  # the tool whose header was seen, until its arguments open
        self._waited = 0  # tokens since that header

    def advance(self, token: int) -> ToolArgsGrammar | None:
        """``token`` was written; the tool whose arguments start with the next token, if that is now."""
        if self._pending is not None:
            if token == self._grammars[self._pending].open_id:
                opened, self._pending = self._grammars[self._pending], None
                self._tail.clear()
                return opened
            self._waited += 1
            if self._waited > MAX_HEADER_GAP:
                self._pending = None  # not a call header after all
        tail = self._tail
        tail.append(token)
        if len(tail) > self._keep:
            del tail[0]
        for i, g in enumerate(self._grammars):
            if any(len(tail) >= len(t) and tail[len(tail) - len(t) :] == t for t in g.triggers):
                self._pending, self._waited = i, 0
        return None
