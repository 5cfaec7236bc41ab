"""Command-line flags every process shares (namespace, etcd, NATS), read once into ``RuntimeSettings``."""

from __future__ import annotations

import argparse
import os

from dynamo_lite.runtime.config import RuntimeSettings, Timeouts
from dynamo_lite.runtime.logs import LOG_FORMATS, LogSettings, configure_logging

_DEFAULTS, _LOG = RuntimeSettings(), LogSettings()


def add_log_level_arg(parser: argparse.ArgumentParser) -> None:
    """``--log-level``, bound to Dynamo's ``DYN_LOG``, and ``--log-format``: JSON lines when Dynamo's
    ``DYN_LOGGING_JSONL`` is set (defaults: ``LogSettings``)."""
    parser.add_argument("--log-level", default=os.environ.get("DYN_LOG", _LOG.level))
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="json" if os.environ.get("DYN_LOGGING_JSONL", "") not in ("", "0", "false") else _LOG.format,
        help="text lines, or one JSON object per line (env DYN_LOGGING_JSONL=1)",
    )


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """Flags bound to Dynamo's environment variables (read here, as the flags' defaults); defaults from
    ``RuntimeSettings``."""
    g = parser.add_argument_group("runtime (discovery and request plane)")
    g.add_argument("--namespace", default=os.environ.get("DYN_NAMESPACE", _DEFAULTS.namespace))
    g.add_argument(
        "--etcd-endpoints",
        default=os.environ.get("ETCD_ENDPOINTS", _DEFAULTS.etcd_endpoints),
        help="etcd for discovery: [http://]host:port[,...] (env ETCD_ENDPOINTS; default %(default)s)",
    )
    g.add_argument(
        "--nats-url",
        default=os.environ.get("NATS_SERVER", os.environ.get("NATS_URL", _DEFAULTS.nats_url)),
        help="NATS for requests: nats://host:port[,...] (env NATS_SERVER; default %(default)s)",
    )
    g.add_argument(
        "--in-memory",
        action="store_true",
        help="in-memory discovery and in-process request plane: reaches no other process "
        "(python -m dynamo_lite serve runs frontend and workers in one process this way)",
    )
    g.add_argument("--lease-ttl", type=int, default=_DEFAULTS.lease_ttl_s, help="etcd lease TTL in seconds")
    g.add_argument("--etcd-username", default=os.environ.get("ETCD_USERNAME", ""))
    g.add_argument("--etcd-password", default=os.environ.get("ETCD_PASSWORD", ""))
    g.add_argument(
        "--etcd-tls-ca",
        default=os.environ.get("ETCD_TLS_CA", ""),
        help="CA bundle: talk to etcd over TLS and verify its certificate",
    )
    g.add_argument("--etcd-tls-cert", default=os.environ.get("ETCD_TLS_CERT", ""))
    g.add_argument("--etcd-tls-key", default=os.environ.get("ETCD_TLS_KEY", ""))
    g.add_argument("--nats-user", default=os.environ.get("NATS_USER", ""))
    g.add_argument("--nats-password", default=os.environ.get("NATS_PASSWORD", ""))
    g.add_argument("--nats-token", default=os.environ.get("NATS_TOKEN", ""))
    g.add_argument("--nats-tls-ca", default=os.environ.get("NATS_TLS_CA", ""))
    g.add_argument("--nats-tls-cert", default=os.environ.get("NATS_TLS_CERT", ""))
    g.add_argument("--nats-tls-key", default=os.environ.get("NATS_TLS_KEY", ""))
    g.add_argument(
        "--nats-fast-path",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("DYNAMO_LITE_NATS_FAST_PATH", "1").lower() not in ("0", "false", "no", "off"),
        help="read NATS messages through our patched nats-py paths, checked at start "
        "(env DYNAMO_LITE_NATS_FAST_PATH=0 turns them off; default %(default)s)",
    )
    add_log_level_arg(parser)


def runtime_settings_from(args: argparse.Namespace, timeouts: Timeouts) -> RuntimeSettings:
    """The flags of ``add_runtime_args``, with the process's ``timeouts``."""
    in_memory = getattr(args, "in_memory", False)
    return RuntimeSettings(
        timeouts=timeouts,
        namespace=args.namespace,
        etcd_endpoints="" if in_memory else args.etcd_endpoints,
        nats_url="" if in_memory else args.nats_url,
        lease_ttl_s=args.lease_ttl,
        etcd_username=args.etcd_username,
        etcd_password=args.etcd_password,
        etcd_tls_ca=args.etcd_tls_ca,
        etcd_tls_cert=args.etcd_tls_cert,
        etcd_tls_key=args.etcd_tls_key,
        nats_user=args.nats_user,
        nats_password=args.nats_password,
        nats_token=args.nats_token,
        nats_tls_ca=args.nats_tls_ca,
        nats_tls_cert=args.nats_tls_cert,
        nats_tls_key=args.nats_tls_key,
        nats_fast_path=args.nats_fast_path,
    )


def setup_logging(args: argparse.Namespace, process_id: bool = False) -> None:
    """Logging as ``add_log_level_arg``'s flags say; ``process_id``: every line names its process (for processes
    that share one stderr)."""
    configure_logging(args.log_level, args.log_format, process_id)


def raise_fd_limit() -> None:
    """Thousands of concurrent streams need thousands of sockets: lift the soft fd limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
