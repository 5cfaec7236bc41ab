"""Structured output for the reference engine: a ``GuidedSpec`` compiled by xgrammar, one matcher per request.

Per step, a guided sequence's logits row is masked to the tokens its grammar allows next
(``GrammarState.mask``); after sampling, the token advances the matcher (``GrammarState.accept``). A sequence
ends when its matcher has terminated (it accepted a stop token once the grammar was complete).

Across the prefill → decode handoff only the spec travels: the decode worker builds a fresh matcher and replays
the tokens already generated (the prefill's first token) through it, which reproduces the matcher's state.

Compiled grammars are cached per spec (LRU); compiling and building the tokenizer's vocabulary view run off the
event loop (``GrammarCompiler.state``).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from dynamo_lite.engines.guided import choice_regex
from dynamo_lite.protocol import GuidedKind, GuidedSpec

CACHE_SIZE = 64  # compiled grammars kept per engine
_JSON_OBJECT_SCHEMA = '{"type": "object"}'


class GrammarError(ValueError):
    """The spec does not compile (invalid schema or regex), or generated tokens violate it."""


class GrammarState:
    """One request's grammar: which tokens may come next, and whether it is done."""

    __slots__ = ("_matcher", "_bitmask")

    def __init__(self, matcher: Any, bitmask: torch.Tensor) -> None:
        self._matcher = matcher
        self._bitmask = bitmask

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of tokens the grammar forbids next to -inf, in place (``logits``: ``[vocab]``)."""
        import xgrammar as xgr

        self._matcher.fill_next_token_bitmask(self._bitmask)
        bitmask = self._bitmask if logits.device.type == "cpu" else self._bitmask.to(logits.device)
        xgr.apply_token_bitmask_inplace(logits.view(1, -1), bitmask)

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False when the grammar does not allow it (the matcher is unchanged)."""
        return bool(self._matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        return bool(self._matcher.is_terminated())


def mask_rows(logits: torch.Tensor, states: list[GrammarState | None]) -> None:
    """Mask row i of ``logits`` ``[S, vocab]`` by ``states[i]`` (None: unconstrained)."""
    for row, state in enumerate(states):
        if state is not None:
            state.mask(logits[row])


class GrammarCompiler:
    """Compiles specs against one model's tokenizer, caching the compiled grammars (thread-safe; blocking:
    call it from a worker thread)."""

    def __init__(
        self, tokenizer_json: Path, vocab_size: int, stop_ids: list[int], cache_size: int = CACHE_SIZE
    ):
        self._tokenizer_json = tokenizer_json
        self._vocab_size = vocab_size
        self._stop_ids = list(stop_ids)
        self._cache_size = cache_size
        self._cache: OrderedDict[bytes, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._info: Any = None

    def _xgr_compiler(self) -> Any:
        if self._compiler is None:
            import xgrammar as xgr
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(self._tokenizer_json))
            self._info = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_ids
            )
            self._compiler = xgr.GrammarCompiler(self._info, max_threads=1, cache_enabled=False)
        return self._compiler

    def warm(self) -> None:
        """Build the tokenizer's vocabulary view now (xgrammar missing: nothing to do)."""
        try:
            with self._lock:
                self._xgr_compiler()
        except ImportError:
            pass

    def compile(self, spec: GuidedSpec) -> Any:
        """The compiled grammar of ``spec`` (cached); ``GrammarError`` when it does not compile."""
        key = (int(spec.kind), spec.value, tuple(spec.choices))
        cache_key = json.dumps(key).encode()
        with self._lock:
            compiled = self._cache.get(cache_key)
            if compiled is not None:
                self._cache.move_to_end(cache_key)
                return compiled
            compiler = self._xgr_compiler()
            try:
                compiled = _compile(compiler, spec)
            except (RuntimeError, ValueError, TypeError) as e:
                raise GrammarError(f"invalid {spec.kind.name.lower()} grammar: {e}") from e
            self._cache[cache_key] = compiled
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return compiled

    def state(self, spec: GuidedSpec, stop_ids: list[int], generated: list[int]) -> GrammarState:
        """A matcher for ``spec`` that ends on any of ``stop_ids``, advanced past ``generated`` (tokens this
        request already produced elsewhere, e.g. the prefill's first token)."""
        import xgrammar as xgr

        compiled = self.compile(spec)
        matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_ids) or None)
        state = GrammarState(matcher, xgr.allocate_token_bitmask(1, self._vocab_size))
        for token in generated:
            if not state.accept(token):
                raise GrammarError(f"the tokens already generated ({generated}) do not follow the grammar")
        return state


def _compile(compiler: Any, spec: GuidedSpec) -> Any:
    # Compact separators (no free whitespace): a sampled model can't wander off into endless blank lines.
    if spec.kind is GuidedKind.JSON_SCHEMA:
        return compiler.compile_json_schema(spec.value, any_whitespace=False)
    if spec.kind is GuidedKind.JSON_OBJECT:
        return compiler.compile_json_schema(_JSON_OBJECT_SCHEMA, any_whitespace=False, strict_mode=False)
    if spec.kind is GuidedKind.REGEX:
        return compiler.compile_regex(spec.value)
    if spec.kind is GuidedKind.CHOICE:
        if not spec.choices:
            raise ValueError("no choices")
        return compiler.compile_regex(choice_regex(spec.choices))
    raise ValueError(f"unknown kind {spec.kind}")
