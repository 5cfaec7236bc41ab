"""``python -m dynamo_lite.frontend``: the OpenAI-compatible HTTP frontend with the in-process router.

Finds workers through discovery (etcd), sends requests over the request plane (NATS).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from dynamo_lite.frontend.settings import FrontendSettings
from dynamo_lite.router.orchestrator import Router, RouterSettings
from dynamo_lite.router.policies import POLICIES
from dynamo_lite.runtime.cli import add_runtime_args, raise_fd_limit, runtime_settings_from, setup_logging
from dynamo_lite.runtime.reachable import check_services
from dynamo_lite.runtime.registry import LiveView
from dynamo_lite.runtime.runtime import Runtime

log = logging.getLogger("dynamo_lite.frontend")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dynamo_lite.frontend", description=__doc__)
    p.add_argument("--http-host", default="0.0.0.0")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--router-mode", default="round-robin", choices=POLICIES)
    p.add_argument(
        "--disagg-threshold",
        type=int,
        default=0,
        help="prompts shorter than this many tokens skip the prefill worker",
    )
    p.add_argument("--max-body-bytes", type=int, default=10 * 1024 * 1024)
    p.add_argument("--request-timeout", type=float, default=1800.0, help="seconds a request may take in all")
    p.add_argument("--first-token-timeout", type=float, default=300.0)
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=5.0,
        help="on SIGTERM, seconds to let in-flight streams finish before closing them",
    )
    p.add_argument("--kv-block-size", type=int, default=32, help="kv router: tokens per hashed block")
    p.add_argument(
        "--kv-load-weight",
        type=float,
        default=4.0,
        help="kv router: cost of one unit of load, in uncached prompt blocks",
    )
    p.add_argument(
        "--migration-limit",
        type=int,
        default=0,
        help="times a stream may move to another worker when its worker dies mid-stream",
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=FrontendSettings().max_inflight,
        help="429 beyond this many requests in flight, queued ones included (0: no bound)",
    )
    queue = RouterSettings()
    p.add_argument(
        "--queue-depth",
        type=int,
        default=queue.queue_depth,
        help="requests per model that may wait for a worker with room; more are refused (429 + Retry-After)",
    )
    p.add_argument(
        "--queue-timeout",
        type=float,
        default=queue.queue_timeout_s,
        help="seconds a request may wait for a worker with room, then 503 + Retry-After",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("DYNAMO_LITE_API_KEY", ""),
        help="require 'Authorization: Bearer KEY' on /v1/* (env DYNAMO_LITE_API_KEY)",
    )
    add_runtime_args(p)
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    from dynamo_lite.frontend.app import create_app
    from dynamo_lite.frontend.metrics import FrontendMetrics
    from dynamo_lite.frontend.server import HttpServer

    runtime_settings = runtime_settings_from(args)
    await check_services(runtime_settings)
    runtime = await Runtime.connect(runtime_settings, name="dynamo_lite-frontend")
    view = LiveView(runtime)
    await view.start()
    router = Router(
        runtime,
        view,
        RouterSettings(
            policy=args.router_mode,
            disagg_threshold=args.disagg_threshold,
            first_frame_timeout_s=args.first_token_timeout,
            migration_limit=args.migration_limit,
            kv_block_size=args.kv_block_size,
            kv_load_weight=args.kv_load_weight,
            queue_depth=args.queue_depth,
            queue_timeout_s=args.queue_timeout,
        ),
    )
    await router.start()
    settings = FrontendSettings(
        http_host=args.http_host,
        http_port=args.http_port,
        max_body_bytes=args.max_body_bytes,
        request_timeout_s=args.request_timeout,
        first_token_timeout_s=args.first_token_timeout,
        max_inflight=args.max_inflight,
        shutdown_timeout_s=args.shutdown_timeout,
        api_key=args.api_key,
    )
    metrics = FrontendMetrics()
    runtime.request_plane.on_ack = lambda address, seconds: metrics.request_plane_ack.observe(seconds)
    server = HttpServer(create_app(router, settings, metrics=metrics), settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"READY frontend http://{args.http_host}:{server.port}", flush=True)
    await stop.wait()
    await server.stop()
    await router.stop()
    await view.stop()
    await runtime.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    raise_fd_limit()
    try:
        import uvloop

        uvloop.run(run(args))
    except ConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
