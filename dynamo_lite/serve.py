"""Embedded mode: frontend + prefill worker + decode worker in one process, no services needed.

In-memory discovery and the in-process request plane carry the very same requests, and the KV still moves
between the two workers through the KV transport — the distributed code path, minus the network hops.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from dynamo_lite.engines import ENGINES
from dynamo_lite.engines.base import EngineSettings, EngineUnavailable
from dynamo_lite.frontend.settings import FrontendSettings
from dynamo_lite.openmp import configure_openmp
from dynamo_lite.protocol import Role
from dynamo_lite.router.orchestrator import Router, RouterSettings
from dynamo_lite.router.policies import POLICIES
from dynamo_lite.runtime.config import RuntimeSettings
from dynamo_lite.runtime.registry import LiveView
from dynamo_lite.runtime.runtime import Runtime
from dynamo_lite.worker.worker import Worker, WorkerSettings

log = logging.getLogger("dynamo_lite.serve")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="torch", choices=ENGINES)
    p.add_argument("--model-path", default=None, help="HF folder or .gguf; default: the built-in SmolLM2")
    p.add_argument("--served-model-name", default="")
    p.add_argument(
        "--topology",
        default="disagg",
        choices=["disagg", "agg"],
        help="disagg: 1 prefill + 1 decode worker; agg: 1 worker",
    )
    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--router-mode", default="round-robin", choices=POLICIES)
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--quantization",
        default="none",
        choices=["none", "int8", "int4"],
        help="torch engine with --dtype bfloat16: weight-only int8 / int4 linears (faster decode on CPU)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores split evenly)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--speedup-ratio", type=float, default=1.0, help="mocker: divide simulated time (0: none)")
    p.add_argument("--log-level", default=os.environ.get("DYN_LOG", "INFO"))


def worker_settings(args: argparse.Namespace, role: Role, threads: int) -> WorkerSettings:
    engine = EngineSettings(
        role=role,
        model_path=args.model_path,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        quantization=args.quantization,
        device=args.device,
        threads=threads,
        max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len,
        speedup_ratio=args.speedup_ratio,
    )
    return WorkerSettings(
        role=role,
        engine=args.engine,
        engine_settings=engine,
        runtime=RuntimeSettings.embedded(),
        drain_timeout_s=5.0,
    )


async def run(args: argparse.Namespace) -> None:
    from dynamo_lite.frontend.app import create_app
    from dynamo_lite.frontend.server import HttpServer

    roles = [Role.PREFILL, Role.DECODE] if args.topology == "disagg" else [Role.AGGREGATED]
    threads = args.threads or max(1, (os.cpu_count() or 2) // len(roles))
    workers = [Worker(worker_settings(args, role, threads)) for role in roles]
    for w in workers:
        await w.start()
    runtime = await Runtime.connect(RuntimeSettings.embedded())
    view = LiveView(runtime)
    await view.start()
    router = Router(runtime, view, RouterSettings(policy=args.router_mode))
    await router.start()
    settings = FrontendSettings(http_host=args.http_host, http_port=args.http_port)
    server = HttpServer(create_app(router, settings), settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    model = workers[0].card.served_name if workers[0].card else "?"
    print(
        f"READY serving {model} at http://{args.http_host}:{server.port}/v1 "
        f"(embedded, {args.topology}, engine {args.engine})",
        flush=True,
    )
    await stop.wait()
    await server.stop()
    for w in workers:
        await w.stop(2.0)
    await view.stop()
    await runtime.close()


def main(argv: list[str] | None = None) -> int:
    configure_openmp()  # before torch loads
    p = argparse.ArgumentParser(prog="python -m dynamo_lite serve", description=__doc__)
    add_serve_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import uvloop

        uvloop.run(run(args))
    except EngineUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
