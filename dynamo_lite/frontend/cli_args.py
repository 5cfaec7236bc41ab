"""The HTTP API's flags that ``python -m dynamo_lite.frontend`` and ``python -m dynamo_lite serve`` share (API key,
field policy, CORS, TLS), defaults from ``FrontendSettings``."""

from __future__ import annotations

import argparse
import os
from typing import Any

from dynamo_lite.frontend.settings import FrontendSettings

_F = FrontendSettings()


def add_http_api_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("HTTP API")
    g.add_argument(
        "--api-key",
        default=os.environ.get("DYNAMO_LITE_API_KEY", _F.api_key),
        help="require 'Authorization: Bearer KEY' on /v1/* (env DYNAMO_LITE_API_KEY)",
    )
    g.add_argument(
        "--allow-unknown-fields",
        action="store_true",
        default=_F.allow_unknown_fields,
        help="accept request fields the frontend doesn't know (one warning line per request) instead of a 400",
    )
    g.add_argument(
        "--allowed-origins",
        nargs="*",
        default=list(_F.allowed_origins),
        metavar="ORIGIN",
        help="CORS: browser origins allowed to call the API ('*': any; default: none)",
    )
    g.add_argument("--tls-cert-path", default=_F.tls_cert_path, help="PEM certificate chain: serve HTTPS")
    g.add_argument("--tls-key-path", default=_F.tls_key_path, help="PEM private key of --tls-cert-path")


def http_api_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``FrontendSettings`` keywords from the flags of ``add_http_api_args``."""
    if bool(args.tls_cert_path) != bool(args.tls_key_path):
        raise SystemExit("error: --tls-cert-path and --tls-key-path go together")
    return {
        "api_key": args.api_key,
        "allow_unknown_fields": args.allow_unknown_fields,
        "allowed_origins": tuple(args.allowed_origins),
        "tls_cert_path": args.tls_cert_path,
        "tls_key_path": args.tls_key_path,
    }
