"""``python -m dynamo_lite.planner`` (the run loop) and ``python -m dynamo_lite.planner profile``.

Examples::

    python -m dynamo_lite.planner profile --engine mocker --output mocker.json
    python -m dynamo_lite.planner profile --engine torch --output smollm2.json      # measured, ~1 minute
    python -m dynamo_lite.planner --profile mocker.json --frontend-url http://127.0.0.1:8000 --dry-run \\
        --ttft-ms 1500 --itl-ms 60
    python -m dynamo_lite.planner --profile mocker.json --connector local \\
        --worker-args "--engine mocker --etcd-endpoints 127.0.0.1:2379 --nats-url nats://127.0.0.1:4222"
    python -m dynamo_lite.planner --profile trtllm.json --connector kubernetes --k8s-namespace dynamo-lite
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import signal
import sys
import tempfile
import threading
from dataclasses import fields

from dynamo_lite.planner.decide import DECODE, PREFILL, Planner, PlannerSettings
from dynamo_lite.planner.predict import DEFAULT_SIGNIFICANCE, DEFAULT_WINDOW, LoadPredictor, Method
from dynamo_lite.planner.profile import (
    DEFAULT_CONCURRENCIES,
    DEFAULT_CONTEXTS,
    DEFAULT_ISLS,
    EngineProfile,
    measure_profile,
    mocker_profile,
)

_P = PlannerSettings()


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dynamo_lite.planner",
        description="Size the prefill and decode pools to hold TTFT/ITL targets (subcommand: profile).",
    )
    p.add_argument("--profile", required=True, help="profile JSON (python -m dynamo_lite.planner profile)")
    p.add_argument(
        "--frontend-url", default="http://127.0.0.1:8000", help="the frontend; /metrics is scraped"
    )
    t = p.add_argument_group("targets and bounds")
    t.add_argument("--ttft-ms", type=float, default=_P.ttft_s * 1000, help="TTFT p90 target")
    t.add_argument("--itl-ms", type=float, default=_P.itl_s * 1000, help="ITL p90 target")
    for name in ("min_prefill", "max_prefill", "min_decode", "max_decode", "max_total"):
        t.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(_P, name))
    d = p.add_argument_group("damping and forecast")
    d.add_argument("--interval-s", type=float, default=_P.interval_s, help="adjustment interval")
    d.add_argument("--cooldown-s", type=float, default=_P.cooldown_s, help="no reversal within this")
    d.add_argument("--down-stable-intervals", type=int, default=_P.down_stable_intervals)
    d.add_argument("--up-stable-intervals", type=int, default=_P.up_stable_intervals)
    d.add_argument("--predictor", choices=[m.value for m in Method], default=Method.TREND.value)
    d.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="intervals the predictor reads")
    d.add_argument(
        "--significance",
        type=float,
        default=DEFAULT_SIGNIFICANCE,
        help="trend: standard errors its slope is shrunk by (0: the plain line)",
    )
    c = p.add_argument_group("connector")
    c.add_argument("--connector", choices=("local", "kubernetes", "none"), default="none")
    c.add_argument("--dry-run", action="store_true", help="print decisions, scale nothing")
    c.add_argument("--start-prefill", type=int, default=None, help="dry-run/local: workers at start (min)")
    c.add_argument("--start-decode", type=int, default=None)
    c.add_argument("--worker-metrics", action="append", default=[], help="dry-run/none: worker /metrics URLs")
    c.add_argument("--worker-args", default="", help="local: flags of every worker (shell-quoted string)")
    c.add_argument("--prefill-args", default="", help="local: extra flags of prefill workers")
    c.add_argument("--decode-args", default="", help="local: extra flags of decode workers")
    c.add_argument("--log-dir", default=None, help="local: worker logs (default: a temp dir)")
    c.add_argument("--k8s-namespace", default="dynamo-lite")
    c.add_argument("--prefill-deployment", default="prefill")
    c.add_argument("--decode-deployment", default="decode")
    o = p.add_argument_group("output")
    o.add_argument("--metrics-port", type=int, default=None, help="serve the planner's /metrics here")
    o.add_argument("--metrics-host", default="127.0.0.1")
    o.add_argument("--decisions-log", default=None, help="append each decision as a JSON line")
    o.add_argument("--duration-s", type=float, default=0.0, help="stop after this long (0: until SIGTERM)")
    return p


def settings_from(args: argparse.Namespace) -> PlannerSettings:
    given = {f.name: getattr(args, f.name) for f in fields(PlannerSettings) if hasattr(args, f.name)}
    return PlannerSettings(**given, ttft_s=args.ttft_ms / 1000, itl_s=args.itl_ms / 1000)


def build_connector(args: argparse.Namespace, settings: PlannerSettings):
    start = {
        PREFILL: settings.min_prefill if args.start_prefill is None else args.start_prefill,
        DECODE: settings.min_decode if args.start_decode is None else args.start_decode,
    }
    if args.dry_run or args.connector == "none":
        from dynamo_lite.planner.connectors.dry_run import DryRunConnector

        return DryRunConnector(start, args.worker_metrics)
    if args.connector == "local":
        from dynamo_lite.planner.connectors.local import LocalConnector

        common = shlex.split(args.worker_args)
        conn = LocalConnector(
            {
                PREFILL: [*common, *shlex.split(args.prefill_args)],
                DECODE: [*common, *shlex.split(args.decode_args)],
            },
            args.log_dir or tempfile.mkdtemp(prefix="dl-planner-"),
        )
        for role, n in start.items():
            conn.scale(role, n)
        return conn
    from dynamo_lite.planner.connectors.kubernetes import KubernetesConnector

    return KubernetesConnector(
        args.k8s_namespace, {PREFILL: args.prefill_deployment, DECODE: args.decode_deployment}
    )


def run_main(argv: list[str]) -> int:
    from dynamo_lite.planner.loop import PlannerLoop
    from dynamo_lite.planner.metrics import PlannerMetrics

    args = run_parser().parse_args(argv)
    try:
        settings = settings_from(args)
        planner = Planner(settings, EngineProfile.load(args.profile))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    metrics = PlannerMetrics()
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, args.metrics_host, metrics.registry)
    connector = build_connector(args, settings)
    loop = PlannerLoop(
        planner,
        LoadPredictor(args.window, method=Method(args.predictor), significance=args.significance),
        connector,
        args.frontend_url.rstrip("/") + "/metrics",
        metrics,
        args.decisions_log,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"READY planner connector={'dry-run' if args.dry_run else args.connector}", flush=True)
    try:
        loop.run(stop, args.duration_s)
    finally:
        connector.close()
    return 0


def profile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dynamo_lite.planner profile",
        description="Write an engine profile: the mocker's from its timing model, other engines measured.",
    )
    p.add_argument("--engine", choices=("mocker", "torch", "trtllm"), default="mocker")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--measure", action="store_true", help="mocker: measure it too instead of computing")
    p.add_argument("--model-path", default=None, help="torch/trtllm: the model (default: SmolLM2)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--speedup-ratio", type=float, default=1.0, help="mocker: simulated time divided by this")
    p.add_argument("--threads", type=int, default=0, help="torch: CPU threads (0: library default)")
    p.add_argument("--isls", type=_ints, default=DEFAULT_ISLS)
    p.add_argument("--concurrencies", type=_ints, default=DEFAULT_CONCURRENCIES)
    p.add_argument("--contexts", type=_ints, default=DEFAULT_CONTEXTS)
    p.add_argument("--decode-tokens", type=int, default=16, help="measured: tokens per decode stream")
    p.add_argument(
        "--statistic",
        choices=("best", "median"),
        default="best",
        help="measured: each point the best of its runs (what the engine can do) or their median (what it "
        "typically does on this machine)",
    )
    return p


def profile_main(argv: list[str]) -> int:
    from dynamo_lite.engines.base import EngineSettings

    args = profile_parser().parse_args(argv)
    grid = {"isls": args.isls, "concurrencies": args.concurrencies, "contexts": args.contexts}
    if args.engine == "mocker" and not args.measure:
        profile = mocker_profile(speedup_ratio=args.speedup_ratio, max_batch_size=args.max_batch_size, **grid)
    else:
        from dynamo_lite.engines import build_engine

        settings = EngineSettings(
            model_path=args.model_path,
            max_batch_size=args.max_batch_size,
            max_seq_len=args.max_seq_len,
            speedup_ratio=args.speedup_ratio,
            threads=args.threads,
        )
        settings.extra = {"enable_prefix_caching": False} if args.engine == "mocker" else {}
        engine = build_engine(args.engine, settings)
        profile = asyncio.run(
            measure_profile(
                engine,
                args.max_batch_size,
                decode_tokens=args.decode_tokens,
                statistic=args.statistic,
                **grid,
            )
        )
    profile.save(args.output)
    print(f"wrote {args.output}: {profile.source} profile of {profile.engine}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["profile"]:
        return profile_main(argv[1:])
    return run_main(argv)
