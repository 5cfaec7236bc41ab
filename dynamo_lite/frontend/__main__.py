"""``python -m dynamo_lite.frontend``: the OpenAI-compatible HTTP frontend with the in-process router.

Finds workers through discovery (etcd), sends requests over the request plane (NATS).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import dataclass

from dynamo_lite import tracing
from dynamo_lite.frontend.cli_args import add_http_api_args, http_api_settings
from dynamo_lite.frontend.settings import FrontendSettings
from dynamo_lite.placement.cli import add_placement_args, placement_settings
from dynamo_lite.router.orchestrator import Router
from dynamo_lite.router.settings import RouterSettings
from dynamo_lite.runtime.cli import add_runtime_args, raise_fd_limit, runtime_settings_from, setup_logging
from dynamo_lite.runtime.config import RuntimeSettings, Timeouts
from dynamo_lite.runtime.gc_tuning import tune_for_serving
from dynamo_lite.runtime.reachable import check_services
from dynamo_lite.runtime.registry import LiveView
from dynamo_lite.runtime.runtime import Runtime

log = logging.getLogger("dynamo_lite.frontend")


_F, _R, _T = FrontendSettings(), RouterSettings(), Timeouts()  # the defaults every flag shows

# On purpose unlike FrontendSettings (what serve and tests use): the distributed frontend serves other hosts
# (as Dynamo's frontend does); --http-host 127.0.0.1 keeps it on this machine.
HTTP_HOST = "0.0.0.0"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dynamo_lite.frontend", description=__doc__)
    p.add_argument("--http-host", default=HTTP_HOST)
    p.add_argument("--http-port", type=int, default=_F.http_port)
    p.add_argument(
        "--workers",
        type=int,
        default=_F.workers,
        help="HTTP processes sharing the port (SO_REUSEPORT), each with its own router view, under a supervisor "
        "that restarts them; >1 lets the frontend use more than one core",
    )
    # Given by the supervisor to the processes it starts (supervisor.py); not a user flag.
    p.add_argument("--supervisor-dir", default="", help=argparse.SUPPRESS)
    p.add_argument(
        "--disagg-threshold",
        type=int,
        default=_R.disagg_threshold,
        help="prompts shorter than this many tokens skip the prefill worker (negative: all prompts do)",
    )
    p.add_argument("--max-body-bytes", type=int, default=_F.max_body_bytes)
    p.add_argument(
        "--request-timeout", type=float, default=_T.request_s, help="seconds a request may take in all"
    )
    p.add_argument(
        "--first-token-timeout",
        type=float,
        default=_T.first_token_s,
        help="seconds from a request's arrival to its first token (queueing and prefill included)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=_T.shutdown_s,
        help="on SIGTERM, seconds to let in-flight streams finish before closing them",
    )
    p.add_argument(
        "--kv-block-size", type=int, default=_R.kv_block_size, help="kv router: tokens per hashed block"
    )
    p.add_argument(
        "--migration-limit",
        type=int,
        default=_R.migration_limit,
        help="times a stream may move to another worker when its worker dies mid-stream",
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=_F.max_inflight,
        help="429 beyond this many requests in flight, queued ones included (0: no bound)",
    )
    add_placement_args(p, "router")
    add_http_api_args(p)
    add_runtime_args(p)
    return p


@dataclass(frozen=True, slots=True)
class FrontendProcess:
    """A frontend process's settings: its HTTP side, its router, its runtime, one ``Timeouts`` for all."""

    frontend: FrontendSettings
    router: RouterSettings
    runtime: RuntimeSettings
    supervisor_dir: str = ""  # set in a process that a --workers supervisor started: the processes' directory


def parse_args(argv: list[str] | None = None) -> FrontendProcess:
    return settings_from(build_parser().parse_args(argv))


def settings_from(args: argparse.Namespace) -> FrontendProcess:
    """The frontend's settings from its parsed flags: flags not given keep the settings objects' defaults."""
    timeouts = Timeouts(
        first_token_s=args.first_token_timeout,
        request_s=args.request_timeout,
        queue_s=args.queue_timeout,
        worker_return_s=args.worker_return_timeout,
        shutdown_s=args.shutdown_timeout,
    )
    router = placement_settings(
        args,
        timeouts,
        RouterSettings,
        disagg_threshold=args.disagg_threshold,
        migration_limit=args.migration_limit,
        kv_block_size=args.kv_block_size,
    )
    frontend = FrontendSettings(
        http_host=args.http_host,
        http_port=args.http_port,
        workers=args.workers,
        max_body_bytes=args.max_body_bytes,
        max_inflight=args.max_inflight,
        timeouts=timeouts,
        **http_api_settings(args),
    )
    if args.workers < 1:
        raise SystemExit("error: --workers must be at least 1")
    if args.workers > 1 and args.in_memory:
        raise SystemExit(
            "error: --workers needs etcd and NATS: in-memory processes would not see each other's workers"
        )
    return FrontendProcess(frontend, router, runtime_settings_from(args, timeouts), args.supervisor_dir)


async def run(process: FrontendProcess) -> None:
    from dynamo_lite.frontend.app import create_app
    from dynamo_lite.frontend.metrics import FrontendMetrics
    from dynamo_lite.frontend.server import HttpServer
    from dynamo_lite.runtime.nats_fast_path import export_read_path

    await check_services(process.runtime)
    runtime = await Runtime.connect(process.runtime, name="dynamo_lite-frontend")
    view = LiveView(runtime)
    await view.start()
    router = Router(runtime, view, process.router)
    await router.start()
    settings = process.frontend
    metrics = FrontendMetrics()
    runtime.request_plane.on_ack = lambda address, seconds: metrics.request_plane_ack.observe(seconds)
    export_read_path(metrics.registry, runtime.request_plane)
    supervised = bool(process.supervisor_dir)
    if supervised:
        from dynamo_lite.frontend.sibling_metrics import SiblingMetrics

        metrics.siblings = SiblingMetrics(metrics.registry, process.supervisor_dir)
        await metrics.siblings.start()
    server = HttpServer(create_app(router, settings, metrics=metrics), settings, reuse_port=supervised)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    tune_for_serving(process.runtime.gc_young_threshold)
    print(f"READY frontend {server.url}", flush=True)
    await stop.wait()
    await server.stop()
    if metrics.siblings is not None:
        await metrics.siblings.stop()
    await router.stop()
    await view.stop()
    await runtime.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    process = settings_from(args)
    setup_logging(args, process_id=bool(process.supervisor_dir))
    if process.frontend.workers > 1 and not process.supervisor_dir:
        from dynamo_lite.frontend.supervisor import supervise

        return supervise(argv, process.frontend)
    raise_fd_limit()
    tracing.setup("dynamo_lite-frontend")  # only if OTEL_* configures it
    try:
        import uvloop

        uvloop.run(run(process))
    except ConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        tracing.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
