"""Per-model preprocessing: tokenizer and chat template, built once per ``ModelCard`` and cached."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
from tokenizers import Tokenizer

from dynamo_lite.frontend.chat_template import ChatTemplate, ChatTemplateError
from dynamo_lite.frontend.detokenize import Detokenizer, make_detokenizer, token_text_table
from dynamo_lite.frontend.errors import OpenAIError, bad_request
from dynamo_lite.frontend.fast_bpe import FastBpeEncoder
from dynamo_lite.frontend.harmony import HarmonyRequestError, render_prompt
from dynamo_lite.frontend.harmony import stop_token_ids as harmony_stop_ids
from dynamo_lite.frontend.parsers import ParserFactory, is_harmony, parser_factory
from dynamo_lite.protocol import ModelCard
from dynamo_lite.runtime.card_files import CardFileCache


class ModelPreprocessor:
    """Everything the frontend needs to turn a request for one model into token ids and back."""

    def __init__(
        self, card: ModelCard, *, tokenize_in_thread_chars: int = 2048, folder: Path | None = None
    ) -> None:
        """``folder``: where the card's published files were fetched to (else ``card.tokenizer_path``)."""
        self.card = card
        tokenizer_path = str(folder / "tokenizer.json") if folder is not None else card.tokenizer_path
        self.tokenizer = Tokenizer.from_file(tokenizer_path)
        self.vocab_size = card.vocab_size or self.tokenizer.get_vocab_size(with_added_tokens=True)
        self._token_texts = token_text_table(self.tokenizer, skip_special_tokens=True)
        self._fast = FastBpeEncoder.try_build(tokenizer_path, self.tokenizer)
        self._thread_chars = tokenize_in_thread_chars
        self.harmony = is_harmony(card.reasoning_parser, card.tool_call_parser)
        self.new_parser: ParserFactory = parser_factory(
            card.reasoning_parser, card.tool_call_parser, self.tokenizer, self.detokenizer
        )
        self.has_reasoning = bool(card.reasoning_parser) or self.harmony
        # Ids that end generation for this model (eos of its generation config; harmony's <|return|>/<|call|>),
        # sent with every request; ``ignore_eos`` requests go without them.
        stops = list(card.eos_token_ids)
        if self.harmony:
            stops += [i for i in harmony_stop_ids() if i not in stops]
        self.stop_token_ids = stops
        self._template: ChatTemplate | None = None
        self._template_error = ""
        if self.harmony:
            pass  # rendered by openai-harmony, not by a template
        elif not card.chat_template:
            self._template_error = f"model {card.served_name!r} has no chat template; use /v1/completions"
        else:
            try:
                self._template = ChatTemplate(
                    card.chat_template, bos_token=card.bos_token, eos_token=card.eos_token
                )
            except Exception as e:  # a broken template only breaks chat, not completions
                self._template_error = f"model {card.served_name!r} has an invalid chat template: {e}"

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        if self._template is None:
            raise OpenAIError(500, self._template_error, code="chat_template_error")
        try:
            return self._template.render(
                messages, add_generation_prompt=add_generation_prompt, tools=tools, extra=extra
            )
        except ChatTemplateError as e:
            raise bad_request(str(e), param="messages", code="chat_template_error") from e

    async def chat_prompt_ids(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        reasoning_effort: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> list[int]:
        """The prompt ids of a chat: harmony for gpt-oss, else the model's chat template (400 on bad input)."""
        if self.harmony:
            if not add_generation_prompt:
                raise bad_request(
                    "gpt-oss prompts always end with the assistant's turn", "add_generation_prompt"
                )
            try:
                if sum(len(str(m.get("content") or "")) for m in messages) > self._thread_chars:
                    return await asyncio.to_thread(
                        render_prompt, messages, tools=tools, reasoning_effort=reasoning_effort
                    )
                return render_prompt(messages, tools=tools, reasoning_effort=reasoning_effort)
            except HarmonyRequestError as e:
                raise bad_request(str(e), param=e.param) from e
        if reasoning_effort is not None:
            extra = {**(extra or {}), "reasoning_effort": reasoning_effort}
        prompt = self.render_chat(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, extra=extra
        )
        # The template already wrote the special tokens (bos, role markers) as text.
        return await self.encode(prompt, add_special_tokens=False)

    async def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        if self._fast is not None and not add_special_tokens:
            if len(text) > self._thread_chars:
                return await asyncio.to_thread(self._fast.encode, text)
            return self._fast.encode(text)
        if len(text) > self._thread_chars:
            # tokenizers releases the GIL: a long prompt tokenizes beside the event loop, not on it.
            enc = await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        else:
            enc = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids

    def detokenizer(self) -> Detokenizer:
        return make_detokenizer(self.tokenizer, skip_special_tokens=True, texts=self._token_texts)


def same_preprocessing(a: ModelCard, b: ModelCard) -> bool:
    """Whether two cards preprocess alike: equal but for ``role``. Every instance publishes its own card, and
    which instance's card the router offers changes as instances come and go; a prefill's and a decode's card
    differ only in role, which preprocessing never reads, so a worker restart must not rebuild the tokenizer
    (each rebuild cost ~45 MB of frontend RSS in freed-but-kept allocator arenas, and a stall)."""
    return a is b or a == b or (a.role != b.role and msgspec.structs.replace(a, role=b.role) == b)


class PreprocessorCache:
    """``ModelPreprocessor`` per served model; rebuilt when what preprocessing reads of its card changes.

    Loading a tokenizer takes a while (tens of ms to seconds): it happens in a thread, once per card.
    """

    def __init__(self, *, tokenize_in_thread_chars: int = 2048, files: CardFileCache | None = None) -> None:
        self._thread_chars = tokenize_in_thread_chars
        self._files = files
        self._ready: dict[str, ModelPreprocessor] = {}
        self._loading: dict[str, asyncio.Future[ModelPreprocessor]] = {}

    async def get(self, card: ModelCard) -> ModelPreprocessor:
        pre = self._ready.get(card.served_name)
        if pre is not None and pre.card is not card and same_preprocessing(pre.card, card):
            pre.card = card  # the next request with this card object takes the ``is`` test only
        if pre is not None and pre.card is card:
            return pre
        return await self._load(card)

    async def _build(self, card: ModelCard) -> ModelPreprocessor:
        folder = await self._files.folder(card) if self._files is not None and card.files else None
        return await asyncio.to_thread(
            ModelPreprocessor, card, tokenize_in_thread_chars=self._thread_chars, folder=folder
        )

    async def _load(self, card: ModelCard) -> ModelPreprocessor:
        pending = self._loading.get(card.served_name)
        if pending is None or pending.done():
            pending = asyncio.ensure_future(self._build(card))
            self._loading[card.served_name] = pending
        try:
            # shield: one client giving up must not cancel the load other requests wait for
            pre = await asyncio.shield(pending)
        except OpenAIError:
            raise
        except Exception as e:
            raise OpenAIError(500, f"cannot load the tokenizer of {card.served_name!r}: {e}") from e
        finally:
            if pending.done() and self._loading.get(card.served_name) is pending:
                del self._loading[card.served_name]
        if not same_preprocessing(pre.card, card):  # it changed while this one was loading: load the new one
            return await self._load(card)
        self._ready[card.served_name] = pre
        return pre
