"""The frontend's one dependency on the rest of the system: a ``Backend`` that knows the served models and
produces token streams. The router implements it (``dynamo_lite.router``); tests use a fake."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from dynamo_lite.protocol import GenerateChunk, GenerateRequest, ModelCard


class Backend(Protocol):
    """What the HTTP frontend calls. Everything network-facing stays behind it.

    Optionally a backend also has ``model_card(model) -> ModelCard | None``: the card of a model that is
    known but not servable right now (a role has no live worker). Its requests then reach ``generate``, which
    answers 503, instead of the frontend answering 404 for a model it cannot see in ``model_cards()``. And
    ``queued_requests() -> dict[str, int]``: requests waiting for a worker, per model (a gauge). And
    ``refusal() -> Overloaded | None``: the refusal any request would get now, whatever its model (every queue
    is full): the frontend answers it before reading the request's body.
    """

    def model_cards(self) -> list[ModelCard]:
        """Models that currently have live workers for every role they need."""
        ...

    def health(self) -> dict:
        """A JSON-able status, e.g. ``{"status": "healthy", "instances": {"prefill": [...], ...}}``;
        ``status != "healthy"`` makes ``/health`` answer 503."""
        ...

    def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream the request's output tokens (the prefill's first token included).

        Raises ``dynamo_lite.protocol.StreamError`` (``ErrorInfo.status`` 503 when no worker can take it;
        ``Overloaded``, 429/503 with a Retry-After, when its queue is full or its wait ran out) before the
        first chunk.
        Closing the iterator (``aclose``) or cancelling its consumer cancels the work downstream.
        """
        ...
