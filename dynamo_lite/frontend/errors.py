"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` for every failure the
frontend answers, its own routing and validation errors included."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from dynamo_lite.protocol import Overloaded, StreamError

logger = logging.getLogger(__name__)

# HTTP status → OpenAI-style error ``type``: a small, fixed set (also the ``errors_total`` metric's label).
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "invalid_request_error" if status < 500 else "internal_server_error"


class OpenAIError(Exception):
    """A failure to answer as ``status`` with an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}  # sent with the error response (Retry-After)

    @property
    def type(self) -> str:
        return error_type(self.status)

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        )

    def response(self, headers: dict[str, str] | None = None) -> Response:
        return Response(
            self.body(),
            status_code=self.status,
            headers={**self.headers, **(headers or {})},
            media_type="application/json",
        )

    def header_pairs(self) -> list[tuple[bytes, bytes]]:
        """``headers`` as ASGI header pairs."""
        return [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def as_openai_error(exc: BaseException) -> OpenAIError:
    """Map any failure to the error the client sees."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, Overloaded):
        return OpenAIError(
            exc.info.status,
            exc.info.message,
            code=exc.info.code,
            headers={"retry-after": str(exc.retry_after_s)},
        )
    if isinstance(exc, StreamError):
        return OpenAIError(exc.info.status, exc.info.message, code=exc.info.code)
    if isinstance(exc, TimeoutError):
        return OpenAIError(504, "the request timed out", code="timeout")
    if isinstance(exc, ValidationError | RequestValidationError):
        return validation_error(exc.errors())
    logger.error("internal error", exc_info=exc)
    return OpenAIError(500, "internal server error", code="internal_error")


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _field_path(loc: tuple | list) -> str:
    """``("prompt", "list[int]", 1)`` → ``"prompt.1"``: pydantic's union-member tags are not fields."""
    return ".".join(
        str(x) for x in loc if x != "body" and not (isinstance(x, str) and ("[" in x or x in _UNION_TAGS))
    )


def validation_error(errors: list | tuple) -> OpenAIError:
    """A 400 from pydantic's error list; ``param`` names the first offending field."""
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return bad_request(
            f"request body is not valid JSON: {detail}" if detail else "request body is not valid JSON"
        )
    messages: dict[str, str] = {}  # one message per field (a union reports every member's failure)
    for err in errors:
        messages.setdefault(_field_path(err.get("loc", ())), str(err.get("msg")))
    parts = [f"{loc}: {msg}" if loc else msg for loc, msg in list(messages.items())[:3]]
    more = f" (and {len(messages) - 3} more)" if len(messages) > 3 else ""
    return bad_request("; ".join(parts) + more, param=_field_path(first.get("loc", ())) or None)


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    """Answer routing (404/405), validation and unexpected errors in OpenAI's shape.

    ``on_error(err)`` is called for every error answered (metrics)."""

    def answer(err: OpenAIError, headers: dict[str, str] | None = None) -> Response:
        if on_error is not None:
            on_error(err)
        return err.response(headers)

    async def http_exception(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route for {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        return answer(OpenAIError(exc.status_code, message), headers=exc.headers)

    async def openai_error(request: Request, exc: OpenAIError) -> Response:
        return answer(exc)

    async def request_validation(request: Request, exc: RequestValidationError) -> Response:
        return answer(validation_error(exc.errors()))

    async def unexpected(request: Request, exc: Exception) -> Response:
        return answer(as_openai_error(exc))

    app.add_exception_handler(StarletteHTTPException, http_exception)
    app.add_exception_handler(OpenAIError, openai_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(Exception, unexpected)
