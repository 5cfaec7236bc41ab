"""The mocker's structured output: whether a scripted answer follows a request's grammar (xgrammar, the same
compiler the reference engine masks logits with), so a scripted test exercises the whole guided path."""

from __future__ import annotations

from pathlib import Path

from dynamo_lite.engines.reference.grammar import GrammarCompiler, GrammarError
from dynamo_lite.protocol import GuidedSpec


class ScriptedAnswerCheck:
    """Blocking (compiles grammars): call it from a worker thread."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_ids: list[int]) -> None:
        self._compiler = GrammarCompiler(tokenizer_json, vocab_size, eos_ids)

    def problem(self, spec: GuidedSpec, answer: list[int], stop_ids: list[int]) -> str:
        """What is wrong with ``answer`` (token ids, maybe ending with a stop id) under ``spec``; "" if nothing."""
        try:
            state = self._compiler.state(spec, stop_ids, [])
        except GrammarError as e:
            return f"cannot be checked: {e}"
        for i, token in enumerate(answer):
            if state.terminated:
                return f"goes on after the grammar ended (token {i})"
            if not state.accept(token):
                return f"breaks the grammar at token {i} ({token})"
        if state.terminated or any(state.accept(t) for t in stop_ids):
            return ""
        return "ends before the grammar is complete"
