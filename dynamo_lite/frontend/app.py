"""The OpenAI-compatible HTTP API as a FastAPI app: ``create_app(backend, settings)``.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/responses``, ``GET /v1/models``,
``/health``, ``/live``,
``/ready``, ``/metrics``. Every error, FastAPI's own included, answers in OpenAI's shape.
"""

from __future__ import annotations

import hmac
import re
import time
import uuid

import orjson
from fastapi import FastAPI, Request
from pydantic import BaseModel
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from dynamo_lite.frontend.backend import Backend
from dynamo_lite.frontend.errors import OpenAIError, as_openai_error, install_error_handlers
from dynamo_lite.frontend.metrics import CONTENT_TYPE, FrontendMetrics
from dynamo_lite.frontend.openai_protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from dynamo_lite.frontend.serving import CHAT, COMPLETIONS, RESPONSES, CompletionService
from dynamo_lite.frontend.settings import FrontendSettings

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data, default=str), status_code=status, media_type="application/json")


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


_BODIES = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/responses": ResponsesRequest,
}


def _openapi(app: FastAPI) -> dict:
    """The OpenAPI document, with the request bodies our routes parse by hand (pydantic models) described."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title="dynamo_lite", version="1", description="OpenAI-compatible API", routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in _BODIES.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    app.openapi_schema = schema
    return schema


def create_app(
    backend: Backend, settings: FrontendSettings | None = None, *, metrics: FrontendMetrics | None = None
) -> FastAPI:
    """The frontend app for ``backend``. ``app.state.metrics`` holds its metrics (own registry).

    >>> app = create_app(my_router, FrontendSettings(http_port=8000))  # doctest: +SKIP
    >>> await serve_http(app, settings)  # doctest: +SKIP
    """
    settings = settings if settings is not None else FrontendSettings()
    metrics = metrics if metrics is not None else FrontendMetrics()
    service = CompletionService(backend, settings, metrics)
    started = int(time.time())
    app = FastAPI(title="dynamo_lite", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.state.metrics = metrics
    queued = getattr(backend, "queued_requests", None)  # optional: a backend that queues requests
    if queued is not None:
        metrics.watch_queue(queued)
    app.state.settings = settings
    install_error_handlers(app, on_error=lambda err: metrics.error(err.type))

    expected_auth = f"Bearer {settings.api_key}".encode() if settings.api_key else b""

    def refuse(request: Request, rid: str) -> Response | None:
        """401 without the API key, 429 when the in-flight bound is reached: before any body is read."""
        if expected_auth:
            given = (request.headers.get("authorization") or "").encode()
            if not hmac.compare_digest(given, expected_auth):
                err = OpenAIError(401, "invalid or missing API key", code="invalid_api_key")
                metrics.error(err.type)
                return err.response({"x-request-id": rid, "www-authenticate": "Bearer"})
        if settings.max_inflight and service.active >= settings.max_inflight:
            err = OpenAIError(
                429,
                f"too many requests in flight ({settings.max_inflight}); retry later",
                code="too_many_requests",
            )
            metrics.error(err.type)
            return err.response({"x-request-id": rid, "retry-after": str(settings.timeouts.retry_after_s)})
        return None

    prepare = {
        CHAT: service.prepare_chat,
        COMPLETIONS: service.prepare_completion,
        RESPONSES: service.prepare_responses,
    }

    async def completion(request: Request, endpoint: str, schema: type[BaseModel]) -> Response:
        rid = request_id_of(request)
        refused = refuse(request, rid)
        if refused is not None:
            return refused
        parsed = None
        try:
            body = await read_body(request, settings.max_body_bytes)
            parsed = schema.model_validate_json(body)
            prepared = await prepare[endpoint](parsed, rid)
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception as exc:
            err = as_openai_error(exc)
            metrics.error(err.type)
            metrics.request_done(service.known_model(getattr(parsed, "model", None)), endpoint, err.status)
            return err.response({"x-request-id": rid})
        return service.response(prepared, rid)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await completion(request, CHAT, ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await completion(request, COMPLETIONS, CompletionRequest)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await completion(request, RESPONSES, ResponsesRequest)

    def model_entry(card) -> dict:
        return {
            "id": card.served_name,
            "object": "model",
            "created": started,
            "owned_by": settings.model_owner,
            "context_length": card.context_length,
        }

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        refused = refuse(request, "") if expected_auth else None
        if refused is not None:
            return refused
        seen: dict[str, dict] = {}
        for card in backend.model_cards():
            seen.setdefault(card.served_name, model_entry(card))
        return _json({"object": "list", "data": list(seen.values())})

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> Response:
        refused = refuse(request, "") if expected_auth else None
        if refused is not None:
            return refused
        return _json(model_entry(service.find_card(model)))

    @app.get("/health")
    async def health() -> Response:
        try:
            state = backend.health()
        except Exception as e:
            return _json({"status": "unhealthy", "error": repr(e)}, 503)
        return _json(state, 200 if state.get("status") == "healthy" else 503)

    @app.get("/live")
    async def live() -> Response:
        return _json({"status": "live"})

    @app.get("/ready")
    async def ready() -> Response:
        models = sorted({card.served_name for card in backend.model_cards()})
        return _json({"status": "ready" if models else "not_ready", "models": models}, 200 if models else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
