"""The OpenAI-compatible HTTP frontend: ``create_app(backend, settings)``, ``serve_http(app, settings)``."""

from dynamo_lite.frontend.app import create_app
from dynamo_lite.frontend.backend import Backend
from dynamo_lite.frontend.metrics import FrontendMetrics
from dynamo_lite.frontend.server import HttpServer, serve_http
from dynamo_lite.frontend.settings import FrontendSettings

__all__ = ["Backend", "FrontendMetrics", "FrontendSettings", "HttpServer", "create_app", "serve_http"]
