"""What every route reads of an HTTP request first: its request id (``x-request-id``) and its body, bounded."""

from __future__ import annotations

import re
import uuid

from starlette.requests import Request

from dynamo_lite.frontend.errors import OpenAIError

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id_of(request: Request) -> str:
    """The client's ``x-request-id`` when it is sane, else a fresh one."""
    rid = request.headers.get("x-request-id")
    if rid and _REQUEST_ID.fullmatch(rid):
        return rid
    return uuid.uuid4().hex


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; 413 as soon as it is known to exceed ``limit`` (never buffered past it)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise OpenAIError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise OpenAIError(
                413, f"request body exceeds the limit of {limit} bytes", code="request_too_large"
            )
    parts = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise OpenAIError(
                413, f"request body exceeds the limit of {limit} bytes", code="request_too_large"
            )
        parts.append(part)
    return b"".join(parts)
