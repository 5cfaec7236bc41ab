"""The OpenAI-compatible HTTP API as a FastAPI app: ``create_app(backend, settings)``.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/responses``, ``POST /v1/messages``
(Anthropic's, with ``/v1/messages/count_tokens``), ``GET /v1/models``,
``POST /tokenize``, ``POST /detokenize``, ``/health``, ``/live``, ``/ready``, ``/metrics``. Every error,
FastAPI's own included, answers in OpenAI's shape (``/v1/messages``' own in Anthropic's).
"""

from __future__ import annotations

import hmac
import logging
import time

import orjson
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from pydantic import BaseModel
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from dynamo_lite.frontend.access_log import log_access
from dynamo_lite.frontend.backend import Backend
from dynamo_lite.frontend.errors import OpenAIError, as_openai_error, install_error_handlers
from dynamo_lite.frontend.fields import check_fields, unknown_fields_error
from dynamo_lite.frontend.http_in import read_body, request_id_of
from dynamo_lite.frontend.messages import MessagesRoutes
from dynamo_lite.frontend.metrics import CONTENT_TYPE, FrontendMetrics
from dynamo_lite.frontend.openai_protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from dynamo_lite.frontend.prepare import RequestPreparer
from dynamo_lite.frontend.prepared import CHAT, COMPLETIONS, RESPONSES
from dynamo_lite.frontend.preprocess import ModelPreprocessor
from dynamo_lite.frontend.serving import CompletionService
from dynamo_lite.frontend.settings import FrontendSettings
from dynamo_lite.frontend.sse import WatchedResponse
from dynamo_lite.frontend.tokenize_api import DetokenizeRequest, detokenize, parse_tokenize, tokenize
from dynamo_lite.protocol import ModelCard

logger = logging.getLogger(__name__)


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data, default=str), status_code=status, media_type="application/json")


# The generating routes: plain Starlette routes (their answer is an ASGI app, ``sse.WatchedResponse``) that
# parse their bodies by hand; the OpenAPI document describes them from these pydantic models.
_BODIES = {
    "/v1/chat/completions": (ChatCompletionRequest, "Chat Completions", "chat_completions"),
    "/v1/completions": (CompletionRequest, "Completions", "completions"),
    "/v1/responses": (ResponsesRequest, "Responses", "responses"),
}


def _openapi(app: FastAPI) -> dict:
    """The OpenAPI document, with the generating routes and the request bodies they parse described."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title="dynamo_lite", version="1", description="OpenAI-compatible API", routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    generating: dict[str, dict] = {}
    for path, (model, summary, name) in _BODIES.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        operation_id = name + path.replace("/", "_").replace(".", "_") + "_post"
        generating[path] = {
            "post": {
                "summary": summary,
                "operationId": operation_id,
                "responses": {
                    "200": {
                        "description": "Successful Response",
                        "content": {"application/json": {"schema": {}}},
                    }
                },
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
                    },
                },
            }
        }
    schema["paths"] = {**generating, **schema.get("paths", {})}
    app.openapi_schema = schema
    return schema


class OpenAIRoutes:
    """The handlers of the frontend's routes, over one ``Backend``: OpenAI's API, models, health, metrics."""

    def __init__(self, backend: Backend, settings: FrontendSettings, metrics: FrontendMetrics) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.preparer = RequestPreparer(backend, settings)
        self.service = CompletionService(backend, settings, metrics)
        self.started = int(time.time())
        self._expected_auth = f"Bearer {settings.api_key}".encode() if settings.api_key else b""
        self._prepare = {
            CHAT: self.preparer.prepare_chat,
            COMPLETIONS: self.preparer.prepare_completion,
            RESPONSES: self.preparer.prepare_responses,
        }

    def refuse(self, request: Request, rid: str) -> Response | None:
        """401 without the API key, 429 when the in-flight bound is reached or every model's queue is full:
        before any body is read (nor tokenized). The 429's message names the limit; Retry-After comes with it."""
        settings, metrics = self.settings, self.metrics
        if self._expected_auth:
            given = (request.headers.get("authorization") or "").encode()
            if not hmac.compare_digest(given, self._expected_auth):
                err = OpenAIError(401, "invalid or missing API key", code="invalid_api_key")
                metrics.error(err.type)
                return err.response({"x-request-id": rid, "www-authenticate": "Bearer"})
        if settings.max_inflight and self.service.active >= settings.max_inflight:
            err = OpenAIError(
                429,
                f"too many requests in flight (--max-inflight {settings.max_inflight}); retry later",
                code="too_many_requests",
            )
            metrics.error(err.type)
            return err.response({"x-request-id": rid, "retry-after": str(settings.timeouts.retry_after_s)})
        refusal = getattr(self.backend, "refusal", None)
        overloaded = refusal() if refusal is not None else None
        if overloaded is not None:
            err = as_openai_error(overloaded)
            metrics.error(err.type)
            return err.response({"x-request-id": rid})
        return None

    async def completion(
        self, request: Request, endpoint: str, schema: type[BaseModel]
    ) -> Response | WatchedResponse:
        """Refuse, read, validate and prepare the request, then answer it (streamed or whole)."""
        rid = request_id_of(request)
        refused = self.refuse(request, rid)
        if refused is not None:
            log_access(request_id=rid, endpoint=endpoint, model="", status=refused.status_code)
            return refused
        parsed = None
        try:
            body = await read_body(request, self.settings.max_body_bytes)
            parsed = schema.model_validate_json(body)
            self.police_fields(endpoint, parsed, rid)
            prepared = await self._prepare[endpoint](parsed, rid)
        except ClientDisconnect:
            log_access(request_id=rid, endpoint=endpoint, model="", status=499)
            return Response(status_code=499)
        except Exception as exc:
            err = as_openai_error(exc)
            self.metrics.error(err.type)
            model = self.preparer.known_model(getattr(parsed, "model", None))
            self.metrics.request_done(model, endpoint, err.status, bool(getattr(parsed, "stream", False)))
            log_access(request_id=rid, endpoint=endpoint, model=model, status=err.status)
            return err.response({"x-request-id": rid})
        return self.service.response(prepared, rid)

    def police_fields(self, endpoint: str, parsed: BaseModel, rid: str) -> None:
        """400 for a field the frontend refuses; unknown fields: 400, or one warning line when allowed."""
        unknown = check_fields(endpoint, parsed)
        if not unknown:
            return
        if not self.settings.allow_unknown_fields:
            raise unknown_fields_error(unknown)
        logger.warning("request %s: ignoring unknown fields: %s", rid, ", ".join(unknown))

    async def chat_completions(self, request: Request) -> Response | WatchedResponse:
        return await self.completion(request, CHAT, ChatCompletionRequest)

    async def completions(self, request: Request) -> Response | WatchedResponse:
        return await self.completion(request, COMPLETIONS, CompletionRequest)

    async def responses(self, request: Request) -> Response | WatchedResponse:
        return await self.completion(request, RESPONSES, ResponsesRequest)

    async def tokenize(self, request: Request) -> Response:
        """``POST /tokenize``: a prompt's or a chat's token ids, as the generating routes compute them."""
        return await self._tokens(request, parse_tokenize, tokenize)

    async def detokenize(self, request: Request) -> Response:
        """``POST /detokenize``: token ids back to text."""

        async def run(req: DetokenizeRequest, card: ModelCard, pre: ModelPreprocessor) -> dict:
            return detokenize(req, pre)

        return await self._tokens(request, DetokenizeRequest.model_validate_json, run)

    async def _tokens(self, request: Request, parse, run) -> Response:
        rid = request_id_of(request)
        refused = self.refuse(request, rid) if self._expected_auth else None
        if refused is not None:
            return refused
        try:
            req = parse(await read_body(request, self.settings.max_body_bytes))
            card, pre = await self.preparer.preprocessor(req.model)
            return _json(await run(req, card, pre))
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception as exc:
            err = as_openai_error(exc)
            self.metrics.error(err.type)
            return err.response({"x-request-id": rid})

    def _model_entry(self, card: ModelCard) -> dict:
        return {
            "id": card.served_name,
            "object": "model",
            "created": self.started,
            "owned_by": self.settings.model_owner,
            "context_length": card.context_length,
        }

    async def list_models(self, request: Request) -> Response:
        refused = self.refuse(request, "") if self._expected_auth else None
        if refused is not None:
            return refused
        seen: dict[str, dict] = {}
        for card in self.backend.model_cards():
            seen.setdefault(card.served_name, self._model_entry(card))
        return _json({"object": "list", "data": list(seen.values())})

    async def get_model(self, model: str, request: Request) -> Response:
        refused = self.refuse(request, "") if self._expected_auth else None
        if refused is not None:
            return refused
        return _json(self._model_entry(self.preparer.find_card(model)))

    async def health(self) -> Response:
        try:
            state = self.backend.health()
        except Exception as e:
            return _json({"status": "unhealthy", "error": repr(e)}, 503)
        return _json(state, 200 if state.get("status") == "healthy" else 503)

    async def live(self) -> Response:
        return _json({"status": "live"})

    async def ready(self) -> Response:
        models = sorted({card.served_name for card in self.backend.model_cards()})
        return _json({"status": "ready" if models else "not_ready", "models": models}, 200 if models else 503)

    async def prometheus_metrics(self) -> Response:
        return Response(await self.metrics.exposition(), media_type=CONTENT_TYPE)


def create_app(
    backend: Backend, settings: FrontendSettings | None = None, *, metrics: FrontendMetrics | None = None
) -> FastAPI:
    """The frontend app for ``backend``. ``app.state.metrics`` holds its metrics (own registry).

    >>> app = create_app(my_router, FrontendSettings(http_port=8000))  # doctest: +SKIP
    >>> await serve_http(app, settings)  # doctest: +SKIP
    """
    settings = settings if settings is not None else FrontendSettings()
    metrics = metrics if metrics is not None else FrontendMetrics()
    routes = OpenAIRoutes(backend, settings, metrics)
    app = FastAPI(title="dynamo_lite", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.state.metrics = metrics
    app.state.settings = settings
    queued = getattr(backend, "queued_requests", None)  # optional: a backend that queues requests
    if queued is not None:
        metrics.watch_queue(queued)
    install_error_handlers(app, on_error=lambda err: metrics.error(err.type))
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.allowed_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["x-request-id"],
        )
    messages = MessagesRoutes(routes.settings, routes.metrics, routes.preparer, routes.service)
    for path, handler in (
        ("/v1/chat/completions", routes.chat_completions),
        ("/v1/completions", routes.completions),
        ("/v1/responses", routes.responses),
        ("/v1/messages", messages.create),  # Anthropic's Messages API (frontend/messages.py)
        ("/v1/messages/count_tokens", messages.count_tokens),
    ):
        app.add_route(path, handler, methods=["POST"])
    app.add_api_route("/tokenize", routes.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", routes.detokenize, methods=["POST"])
    for path, handler in (
        ("/v1/models", routes.list_models),
        ("/v1/models/{model:path}", routes.get_model),
        ("/health", routes.health),
        ("/live", routes.live),
        ("/ready", routes.ready),
        ("/metrics", routes.prometheus_metrics),
    ):
        app.add_api_route(path, handler, methods=["GET"])
    return app
