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
from dataclasses import dataclass

from dynamo_lite import tracing
from dynamo_lite.engines import ENGINES
from dynamo_lite.engines.base import DTYPES, QUANTIZATIONS, EngineSettings, EngineUnavailable
from dynamo_lite.frontend.cli_args import add_http_api_args, http_api_settings
from dynamo_lite.frontend.settings import FrontendSettings
from dynamo_lite.openmp import configure_openmp
from dynamo_lite.placement.policies import POLICIES
from dynamo_lite.protocol import Role
from dynamo_lite.router.orchestrator import Router
from dynamo_lite.router.settings import RouterSettings
from dynamo_lite.runtime.cli import add_log_level_arg, setup_logging
from dynamo_lite.runtime.config import RuntimeSettings, Timeouts
from dynamo_lite.runtime.gc_tuning import tune_for_serving
from dynamo_lite.runtime.registry import LiveView
from dynamo_lite.runtime.runtime import Runtime
from dynamo_lite.worker.worker import Worker, WorkerSettings

log = logging.getLogger("dynamo_lite.serve")

_E, _F, _R = EngineSettings(), FrontendSettings(), RouterSettings()  # the defaults every flag shows

# Where serve differs from the distributed processes, on purpose:
SERVE_ENGINE = "torch"  # no GPU assumed: the built-in reference engine, rather than detecting TensorRT-LLM
SERVE_STREAM_INTERVAL_S = 0.0  # in one process a chunk costs no request-plane message: each token as it comes
SERVE_DRAIN_S = 2.0  # the HTTP server has closed its streams before the workers stop: Ctrl-C ends in seconds
# --threads 0 splits this machine's cores between the workers (they share the process), not the library default


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default=SERVE_ENGINE, choices=ENGINES)
    p.add_argument(
        "--model-path", default=_E.model_path, help="HF folder or .gguf; default: the built-in SmolLM2"
    )
    p.add_argument("--served-model-name", default=_E.served_model_name)
    p.add_argument(
        "--topology",
        default="disagg",
        choices=["disagg", "agg"],
        help="disagg: 1 prefill + 1 decode worker; agg: 1 worker",
    )
    p.add_argument("--http-host", default=_F.http_host)
    p.add_argument("--http-port", type=int, default=_F.http_port)
    p.add_argument("--router-mode", default=_R.policy, choices=POLICIES)
    p.add_argument(
        "--dtype",
        default=_E.dtype,
        choices=DTYPES,
        help="torch engine: auto = what the CPU/GPU runs natively (fp32 on CPUs without AVX512-BF16/AMX)",
    )
    p.add_argument(
        "--quantization",
        default=_E.quantization,
        choices=QUANTIZATIONS,
        help="torch engine on CPU: weight-only int8 / int4 linears (faster decode); auto = with --dtype auto, "
        "the checkpoint's own precision (int4 for the default Q4 GGUF)",
    )
    p.add_argument("--device", default=_E.device)
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores split evenly)")
    p.add_argument("--max-batch-size", type=int, default=_E.max_batch_size)
    p.add_argument("--max-seq-len", type=int, default=_E.max_seq_len)
    p.add_argument(
        "--speedup-ratio",
        type=float,
        default=_E.speedup_ratio,
        help="mocker: divide simulated time (0: none)",
    )
    add_http_api_args(p)
    add_log_level_arg(p)


@dataclass(slots=True)
class ServeProcess:
    """The embedded process's settings: its frontend, router and workers, with one ``Timeouts`` for all."""

    topology: str
    frontend: FrontendSettings
    router: RouterSettings
    workers: list[WorkerSettings]


def settings_from(args: argparse.Namespace) -> ServeProcess:
    timeouts = Timeouts(drain_s=SERVE_DRAIN_S)
    roles = [Role.PREFILL, Role.DECODE] if args.topology == "disagg" else [Role.AGGREGATED]
    cores = os.cpu_count() or 2
    threads = args.threads or max(1, cores // len(roles))
    # With the cores split (no --threads), the prefill worker's steps take the decode worker's cores while it has
    # no work (``engines/reference/cores.py``): a long prompt alone prefills on the whole machine.
    alone_threads = {Role.PREFILL: cores} if not args.threads and len(roles) > 1 else {}
    workers = [
        WorkerSettings(
            role=role,
            engine=args.engine,
            stream_interval_s=SERVE_STREAM_INTERVAL_S,
            engine_settings=EngineSettings(
                role=role,
                model_path=args.model_path,
                served_model_name=args.served_model_name,
                dtype=args.dtype,
                quantization=args.quantization,
                device=args.device,
                threads=threads,
                alone_threads=alone_threads.get(role, 0),
                max_batch_size=args.max_batch_size,
                max_seq_len=args.max_seq_len,
                speedup_ratio=args.speedup_ratio,
            ),
            runtime=RuntimeSettings.embedded(timeouts=timeouts),
        )
        for role in roles
    ]
    return ServeProcess(
        args.topology,
        FrontendSettings(
            http_host=args.http_host, http_port=args.http_port, timeouts=timeouts, **http_api_settings(args)
        ),
        RouterSettings(policy=args.router_mode, timeouts=timeouts),
        workers,
    )


def parse_args(argv: list[str] | None = None) -> ServeProcess:
    p = argparse.ArgumentParser(prog="python -m dynamo_lite serve", description=__doc__)
    add_serve_args(p)
    return settings_from(p.parse_args(argv))


async def run(process: ServeProcess) -> None:
    from dynamo_lite.frontend.app import create_app
    from dynamo_lite.frontend.server import HttpServer

    workers = [Worker(settings) for settings in process.workers]
    for w in workers:
        await w.start()
    runtime = await Runtime.connect(RuntimeSettings.embedded(timeouts=process.router.timeouts))
    view = LiveView(runtime)
    await view.start()
    router = Router(runtime, view, process.router)
    await router.start()
    settings = process.frontend
    server = HttpServer(create_app(router, settings), settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    tune_for_serving(process.workers[0].runtime.gc_young_threshold)
    model = workers[0].card.served_name if workers[0].card else "?"
    print(
        f"READY serving {model} at {server.url}/v1 "
        f"(embedded, {process.topology}, engine {process.workers[0].engine})",
        flush=True,
    )
    await stop.wait()
    await server.stop()
    for w in workers:
        await w.stop()
    await router.stop()
    await view.stop()
    await runtime.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynamo_lite serve", description=__doc__)
    add_serve_args(p)
    args = p.parse_args(argv)
    configure_openmp(args.engine)  # before torch loads: parsing the flags does not import it
    setup_logging(args)
    tracing.setup("dynamo_lite")  # only if OTEL_* configures it; one process, one service
    try:
        import uvloop

        uvloop.run(run(settings_from(args)))
    except EngineUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        tracing.shutdown()
    return 0
