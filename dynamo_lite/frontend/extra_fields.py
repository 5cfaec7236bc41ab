"""``nvext.extra_fields`` in responses, as Dynamo returns them: a response's ``nvext`` object (whole responses,
``chunks.completion_body``) or one last chunk carrying it (streams), with what ``dynamo_lite.timing``
measured."""

from __future__ import annotations

import orjson

from dynamo_lite.timing import TIMING, WORKER_ID

SUPPORTED = frozenset({TIMING, WORKER_ID})


def requested(extra_fields: list[str] | None) -> frozenset[str]:
    """The fields asked for that we answer (others are ignored, as by Dynamo)."""
    return SUPPORTED.intersection(extra_fields) if extra_fields else frozenset()


def nvext_chunk(response_id: str, created: int, model: str, obj: str, nvext: dict) -> bytes:
    """The stream's last chunk before usage and ``[DONE]``: no choices, just ``nvext``."""
    chunk = {
        "id": response_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "nvext": nvext,
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"
