"""Frontend test fixtures: the real SmolLM2 tokenizer and chat template, a fake ``Backend`` (the frontend is
the thing under test, so only the backend is faked), and a real uvicorn server on 127.0.0.1 (a free port)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from dynamo_lite.frontend import FrontendSettings, HttpServer, create_app
from dynamo_lite.model_files import resolve_model
from dynamo_lite.protocol import ErrorInfo, GenerateChunk, GenerateRequest, ModelCard, StreamError
from dynamo_lite.runtime.config import Timeouts

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "smollm2"
EOS_ID = 2  # <|im_end|>


@pytest.fixture(scope="session")
def card() -> ModelCard:
    files = resolve_model()
    special = files.special_tokens
    return ModelCard(
        served_name=MODEL,
        model_path=str(files.folder),
        tokenizer_path=str(files.tokenizer_json),
        chat_template=files.chat_template,
        context_length=files.context_length,
        eos_token_ids=files.eos_token_ids,
        bos_token=special.get("bos_token", ""),
        eos_token=special.get("eos_token", ""),
        vocab_size=files.vocab_size,
    )


@pytest.fixture(scope="session")
def tokenizer(card: ModelCard) -> Tokenizer:
    return Tokenizer.from_file(card.tokenizer_path)


class FakeBackend:
    """Streams scripted chunks; records every request; observes how each stream ended.

    ``script`` is the list of chunks to yield (default: one token per chunk of ``text`` then eos with "stop").
    ``forever`` keeps yielding ``chunk_delay_s``-spaced tokens after the script. ``fail_before`` raises before
    the first chunk, ``fail_after`` raises after that many chunks.
    """

    def __init__(self, cards: list[ModelCard]) -> None:
        self.cards = cards
        self.script: list[GenerateChunk] = []
        self.first_delay_s = 0.0
        self.chunk_delay_s = 0.0
        self.forever = False
        self.fail_before: StreamError | None = None
        self.fail_after: int | None = None
        self.healthy = True
        self.requests: list[GenerateRequest] = []
        self.cancelled = 0  # streams closed or cancelled before they ended
        self.completed = 0  # streams that ran to their end
        self.cancel_event = asyncio.Event()
        self.request_event = asyncio.Event()

    def model_cards(self) -> list[ModelCard]:
        return list(self.cards)

    def health(self) -> dict:
        return {"status": "healthy" if self.healthy else "unhealthy", "instances": {"agg": ["fake-1"]}}

    async def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        self.requests.append(request)
        self.request_event.set()
        try:
            if self.first_delay_s:
                await asyncio.sleep(self.first_delay_s)
            if self.fail_before is not None:
                raise self.fail_before
            for i, chunk in enumerate(self.script):
                if self.fail_after == i:
                    raise StreamError(ErrorInfo(500, "worker lost", "instance_lost"))
                if i and self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
                yield chunk
            while self.forever:
                await asyncio.sleep(self.chunk_delay_s)
                yield GenerateChunk(token_ids=[28])
        except (GeneratorExit, asyncio.CancelledError):
            self.cancelled += 1
            self.cancel_event.set()
            raise
        self.completed += 1

    def say(
        self, tokenizer: Tokenizer, text: str, per_chunk: int = 1, finish: str | None = "stop", **last
    ) -> list[int]:
        """Script ``text`` as chunks of ``per_chunk`` tokens, then eos with ``finish`` (no end when ``finish``
        is None: the stream goes on with ``forever``); returns the ids."""
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        self.script = [GenerateChunk(token_ids=ids[i : i + per_chunk]) for i in range(0, len(ids), per_chunk)]
        if finish is not None:
            self.script.append(GenerateChunk(token_ids=[EOS_ID], finish_reason=finish, **last))
        return ids


@pytest.fixture
def backend(card: ModelCard) -> FakeBackend:
    return FakeBackend([card])


@pytest.fixture
def settings() -> FrontendSettings:
    return FrontendSettings(http_port=0, max_body_bytes=10 * 1024 * 1024, timeouts=Timeouts(shutdown_s=1))


@asynccontextmanager
async def serving(backend: FakeBackend, settings: FrontendSettings) -> AsyncIterator[HttpServer]:
    """The frontend app over ``backend``, served on a free loopback port until the block ends."""
    srv = HttpServer(create_app(backend, settings), settings)
    await srv.start()
    try:
        yield srv
    finally:
        async with asyncio.timeout(10):
            await srv.stop()


@pytest.fixture
async def server(backend: FakeBackend, settings: FrontendSettings) -> AsyncIterator[HttpServer]:
    async with serving(backend, settings) as srv:
        yield srv


@pytest.fixture
async def http(server: HttpServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        yield client


@pytest.fixture
async def client(server: HttpServer) -> AsyncIterator[openai.AsyncOpenAI]:
    oai = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=10)
    try:
        yield oai
    finally:
        await oai.close()


def sse_events(raw: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[len("data: ") :] for line in raw.split("\n\n") if line.startswith("data: ")]
