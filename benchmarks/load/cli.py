"""``python -m benchmarks.load``: genai-perf's vocabulary for an OpenAI-compatible server.

Examples::

    python -m benchmarks.load --url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct --streaming \\
        --concurrency 64 --request-count 1000 --warmup-request-count 64 \\
        --synthetic-input-tokens-mean 200 --output-tokens-mean 64 --extra-inputs ignore_eos:true
    python -m benchmarks.load ... --sweep-concurrency 1,8,64 --goodput "ttft:200 itl:20"
    python -m benchmarks.load ... --request-rate 100 --measurement-seconds 30 --server-pid 1234
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import BenchmarkConfig, Limits, Timeouts, parse_extra_input, parse_goodput, parse_header
from .report import format_sweep_table, format_table
from .runner import run_benchmark, run_blocking, run_sweep


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description="Load generator for OpenAI-compatible servers (genai-perf style).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("-m", "--model", default="SmolLM2-135M-Instruct", help="model name sent in requests")
    p.add_argument(
        "--tokenizer", default=None, help="folder with tokenizer.json, or the file; none: SmolLM2's"
    )
    p.add_argument("--endpoint-type", choices=("chat", "completions"), default="chat")
    p.add_argument("--endpoint", default=None, help="request path override, e.g. /v1/chat/completions")
    p.add_argument("--streaming", action="store_true", help="stream responses (SSE)")
    load = p.add_argument_group("load")
    load.add_argument(
        "--concurrency", type=int, default=1, help="closed loop: requests in flight (not with --request-rate)"
    )
    load.add_argument(
        "--request-rate", type=float, default=None, help="open loop: Poisson arrivals per second"
    )
    load.add_argument(
        "--request-count", type=int, default=None, help="measured requests; none: max(100, 4 x concurrency)"
    )
    load.add_argument("--warmup-request-count", type=int, default=0)
    load.add_argument("--measurement-seconds", type=float, default=None, help="stop sending after this long")
    load.add_argument("--sweep-concurrency", default=None, help="comma list, e.g. 1,8,64: one run each")
    data = p.add_argument_group("synthetic data")
    data.add_argument("--synthetic-input-tokens-mean", type=int, default=200)
    data.add_argument("--synthetic-input-tokens-stddev", type=float, default=0.0)
    data.add_argument("--output-tokens-mean", type=int, default=None, help="sent as max_tokens")
    data.add_argument("--output-tokens-stddev", type=float, default=0.0)
    data.add_argument(
        "--extra-inputs",
        action="append",
        default=[],
        metavar="KEY:VALUE",
        help='extra request fields; VALUE as JSON when it parses: ignore_eos:true, nvext:{"ignore_eos":true}',
    )
    data.add_argument("--num-dataset-entries", type=int, default=None, help="distinct prompts, cycled")
    data.add_argument(
        "--chat-template-overhead",
        type=int,
        default=None,
        help="tokens the chat template adds; none: measured with the tokenizer's template",
    )
    data.add_argument("--random-seed", type=int, default=0)
    obs = p.add_argument_group("observation and output")
    obs.add_argument("--server-pid", type=int, action="append", default=[], help="report this PID's CPU%%")
    obs.add_argument("--goodput", default=None, help='SLOs in ms, e.g. "ttft:200 itl:20 e2e:5000"')
    obs.add_argument("--artifact-dir", default=None, help="none: artifacts/<model>-<endpoint>-<load>")
    obs.add_argument("--no-artifacts", action="store_true", help="print the summary only")
    obs.add_argument("--no-progress", action="store_true")
    net = p.add_argument_group("connection")
    net.add_argument("-H", "--header", action="append", default=[], metavar="NAME:VALUE")
    net.add_argument("--request-timeout", type=float, default=Timeouts().request, help="seconds per request")
    net.add_argument("--connect-timeout", type=float, default=Timeouts().connect)
    net.add_argument(
        "--max-connections", type=int, default=Limits().max_connections, help="open loop: most in flight"
    )
    net.add_argument("--no-uvloop", action="store_true", help="use asyncio's default event loop")
    return p


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    extra = dict(parse_extra_input(item) for item in args.extra_inputs)
    headers = dict(parse_header(item) for item in args.header)
    return BenchmarkConfig(
        url=args.url,
        model=args.model,
        endpoint_type=args.endpoint_type,
        endpoint=args.endpoint,
        streaming=args.streaming,
        concurrency=args.concurrency,
        request_rate=args.request_rate,
        request_count=args.request_count,
        warmup_request_count=args.warmup_request_count,
        measurement_seconds=args.measurement_seconds,
        tokenizer=args.tokenizer,
        input_tokens_mean=args.synthetic_input_tokens_mean,
        input_tokens_stddev=args.synthetic_input_tokens_stddev,
        output_tokens_mean=args.output_tokens_mean,
        output_tokens_stddev=args.output_tokens_stddev,
        chat_template_overhead=args.chat_template_overhead,
        num_dataset_entries=args.num_dataset_entries,
        random_seed=args.random_seed,
        extra_inputs=extra,
        headers=headers,
        server_pids=args.server_pid,
        goodput=parse_goodput(args.goodput) if args.goodput else {},
        progress=not args.no_progress,
        artifact_dir=None if args.no_artifacts else (args.artifact_dir or _default_artifact_dir(args)),
        timeouts=Timeouts(connect=args.connect_timeout, request=args.request_timeout),
        limits=Limits(max_connections=args.max_connections),
    )


def _default_artifact_dir(args: argparse.Namespace) -> str:
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", args.model)
    if args.sweep_concurrency:
        load = "sweep"
    elif args.request_rate:
        load = f"rate{args.request_rate:g}"
    else:
        load = f"concurrency{args.concurrency}"
    return str(Path("artifacts") / f"{model}-{args.endpoint_type}-{load}")


def _raise_open_files_limit() -> None:
    # Open-loop runs can hold thousands of connections; the default soft limit is often 1024.
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else 65536
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, 65536), hard))
    except (ImportError, ValueError, OSError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        sweep = [int(x) for x in args.sweep_concurrency.split(",")] if args.sweep_concurrency else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _raise_open_files_limit()
    if sweep:
        results = run_blocking(lambda: run_sweep(cfg, sweep), not args.no_uvloop)
        for r in results:
            print(format_table(r), end="\n\n")
        print(format_sweep_table(results))
        completed = sum(r.summary.completed for r in results)
    else:
        result = run_blocking(lambda: run_benchmark(cfg), not args.no_uvloop)
        print(format_table(result))
        completed = result.summary.completed
    if cfg.artifact_dir:
        print(f"Artifacts: {cfg.artifact_dir}")
    return 0 if completed else 1
