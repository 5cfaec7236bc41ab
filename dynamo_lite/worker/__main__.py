"""``python -m dynamo_lite.worker --mode prefill|decode|agg --engine torch|llamacpp|mocker|trtllm ...``"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from dynamo_lite import tracing
from dynamo_lite.engines import ENGINES
from dynamo_lite.engines.base import DTYPES, QUANTIZATIONS, EngineSettings, EngineUnavailable
from dynamo_lite.model_files import REASONING_PARSERS, TOOL_CALL_PARSERS, ModelNotFound
from dynamo_lite.openmp import configure_openmp
from dynamo_lite.placement.cli import add_placement_args, placement_settings
from dynamo_lite.protocol import DisaggregationStrategy, Role
from dynamo_lite.runtime.cli import add_runtime_args, raise_fd_limit, runtime_settings_from, setup_logging
from dynamo_lite.runtime.config import Timeouts
from dynamo_lite.runtime.gc_tuning import tune_for_serving
from dynamo_lite.runtime.reachable import check_services
from dynamo_lite.worker.worker import Worker, WorkerSettings

log = logging.getLogger("dynamo_lite.worker")

_W, _T = WorkerSettings(), Timeouts()  # the defaults every flag shows

# Engine flags whose value goes to EngineSettings; their defaults are EngineSettings' (None here = not given).
_ENGINE_FLAGS = (
    "dtype",
    "quantization",
    "device",
    "threads",
    "max_batch_size",
    "max_num_tokens",
    "max_seq_len",
    "kv_block_size",
    "free_gpu_memory_fraction",
    "tensor_parallel_size",
    "expert_parallel_size",
    "enable_attention_dp",
    "kv_failure_policy",
    "kv_bind_host",
    "kv_advertise_host",
    "kv_port",
    "kv_lease_s",
    "speedup_ratio",
    "shared_weights",
)


def build_parser(
    engine_default: str | None = None, prog: str = "python -m dynamo_lite.worker"
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument(
        "--mode",
        "--disaggregation-mode",
        dest="role",
        default=_W.role.value,
        choices=[r.value for r in Role if r is not Role.UNRECOGNIZED],
    )
    p.add_argument(
        "--engine",
        default=engine_default or _W.engine or None,
        choices=ENGINES,
        help="default: trtllm where TensorRT-LLM imports and a GPU is present, else torch (logged)",
    )
    p.add_argument(
        "--model-path",
        "--model",
        dest="model_path",
        default=None,
        help="HF folder or .gguf file; default: the built-in SmolLM2",
    )
    p.add_argument("--served-model-name", default=None)
    p.add_argument(
        "--disaggregation-strategy",
        default=_W.disaggregation_strategy.value,
        choices=[s.value for s in DisaggregationStrategy if s is not DisaggregationStrategy.UNRECOGNIZED],
        help="decode workers: decode_first runs the prefill handoff here, placing prefills as the placement "
        "flags say (the frontend's router flags)",
    )
    p.add_argument("--extra-engine-args", default="", help="YAML merged on top of the engine flags")
    p.add_argument(
        "--reasoning-parser",
        "--dyn-reasoning-parser",
        dest="reasoning_parser",
        default=_W.reasoning_parser,
        choices=["", *REASONING_PARSERS],
        help="how the frontend splits reasoning from the answer (default: gpt_oss for gpt-oss models)",
    )
    p.add_argument(
        "--tool-call-parser",
        "--dyn-tool-call-parser",
        dest="tool_call_parser",
        default=_W.tool_call_parser,
        choices=["", *TOOL_CALL_PARSERS],
        help="how the frontend finds tool calls in the output (default: harmony for gpt-oss models)",
    )
    p.add_argument("--endpoint", default=_W.endpoint)
    p.add_argument(
        "--metrics-port", type=int, default=_W.metrics_port, help="serve /metrics here (0: any free port)"
    )
    p.add_argument("--metrics-host", default=_W.metrics_host)
    p.add_argument("--advertise-host", default=_W.advertise_host)
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=_T.drain_s,
        help="seconds to finish in-flight work on SIGTERM (default %(default)s)",
    )
    p.add_argument("--max-inflight", type=int, default=_W.max_inflight)
    p.add_argument(
        "--max-messages-per-s",
        type=float,
        default=_W.max_messages_per_s,
        help="stream chunks per second to stay under: with many active streams, chunks carry more tokens "
        "(every engine, TensorRT-LLM included)",
    )
    p.add_argument(
        "--stream-interval-ms",
        type=float,
        default=_W.stream_interval_s * 1000,
        help="coalesce tokens produced within this many ms into one message (0: every step; default %(default)s)",
    )
    p.add_argument(
        "--stream-per-token",
        action="store_true",
        default=_W.stream_per_token,
        help="one token per message and per SSE event, never coalesced (overrides --stream-interval-ms and "
        "--max-messages-per-s)",
    )
    e = p.add_argument_group(
        "engine (omitted: the engine's default; TensorRT-LLM's own for --engine trtllm, where an omitted "
        "--max-seq-len is the model's context length)"
    )
    e.add_argument(
        "--dtype", default=None, choices=DTYPES, help="torch engine: auto = what the CPU/GPU runs natively"
    )
    e.add_argument(
        "--quantization",
        default=None,
        choices=QUANTIZATIONS,
        help="torch engine on CPU: weight-only int8 / int4 linears (faster decode); auto = with --dtype auto, "
        "the checkpoint's own precision (int4 for the default Q4 GGUF)",
    )
    e.add_argument("--device", default=None)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--max-batch-size", type=int, default=None)
    e.add_argument("--max-num-tokens", type=int, default=None)
    e.add_argument("--max-seq-len", type=int, default=None)
    e.add_argument("--kv-block-size", type=int, default=None)
    e.add_argument("--free-gpu-memory-fraction", type=float, default=None)
    e.add_argument("--tensor-parallel-size", type=int, default=None)
    e.add_argument("--expert-parallel-size", type=int, default=None)
    e.add_argument(
        "--enable-attention-dp",
        action="store_const",
        const=True,
        default=None,
        help="ranks split attention by sequences (each rank all heads), as the seed's decode YAML",
    )
    e.add_argument("--kv-failure-policy", default=None, choices=["recompute", "fail"])
    e.add_argument("--kv-bind-host", default=None, help="interface the KV transfer server binds to")
    e.add_argument("--kv-advertise-host", default=None)
    e.add_argument("--kv-port", type=int, default=None)
    e.add_argument(
        "--kv-lease", dest="kv_lease_s", type=float, default=None, help="seconds unpulled KV is held"
    )
    e.add_argument(
        "--speedup-ratio", type=float, default=None, help="mocker: divide simulated time (0: none)"
    )
    e.add_argument(
        "--shared-weights",
        default=None,
        metavar="SOCKET",
        help="torch engine: map the weights served by the weights holder at this Unix socket (python -m "
        "dynamo_lite.engines.reference.shared_weights) instead of loading a copy: one copy per GPU for all its "
        "workers. The worker exits (status 75) if the holder dies",
    )
    add_placement_args(p, "placement of prefill workers (decode_first; the frontend's router flags)")
    add_runtime_args(p)
    return p


def parse_args(
    argv: list[str] | None = None,
    engine_default: str | None = None,
    prog: str = "python -m dynamo_lite.worker",
) -> WorkerSettings:
    args = build_parser(engine_default, prog).parse_args(argv)
    setup_logging(args)
    raise_fd_limit()
    return settings_from(args)


def settings_from(args: argparse.Namespace) -> WorkerSettings:
    """The worker's settings from its parsed flags: flags not given keep the settings objects' defaults."""
    extra: dict = {}
    if args.extra_engine_args:
        from dynamo_lite.engines.engine_args import load_engine_args_yaml

        extra = load_engine_args_yaml(args.extra_engine_args)
    given = {name: getattr(args, name) for name in _ENGINE_FLAGS if getattr(args, name) is not None}
    names = {
        k: v for k, v in (("model_path", args.model_path), ("served_model_name", args.served_model_name)) if v
    }
    role = Role(args.role)
    timeouts = Timeouts(
        drain_s=args.drain_timeout, queue_s=args.queue_timeout, worker_return_s=args.worker_return_timeout
    )
    engine = EngineSettings(
        role=role,
        extra=extra,
        extra_source=args.extra_engine_args,
        explicit=frozenset(given),
        **names,
        **given,
    )
    return WorkerSettings(
        role=role,
        engine=args.engine or "",
        disaggregation_strategy=DisaggregationStrategy(args.disaggregation_strategy),
        endpoint=args.endpoint,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        advertise_host=args.advertise_host,
        max_inflight=args.max_inflight,
        stream_interval_s=args.stream_interval_ms / 1000,
        max_messages_per_s=args.max_messages_per_s,
        stream_per_token=args.stream_per_token,
        reasoning_parser=args.reasoning_parser,
        tool_call_parser=args.tool_call_parser,
        engine_settings=engine,
        runtime=runtime_settings_from(args, timeouts),
        placement=placement_settings(args, timeouts),
    )


def check_torch_ranks(engine: EngineSettings) -> None:
    """The torch engine's parallel sizes, and whether the model's heads and experts split that way (reading its
    ``config.json`` only): ``ValueError`` with what does not fit."""
    from dynamo_lite.engines.reference.config import parallel_sizes

    tp, ep = parallel_sizes(engine)
    if tp == 1:
        return
    from dynamo_lite.engines.reference.loader import model_config
    from dynamo_lite.engines.reference.ranks import ParallelPlan, check_divides
    from dynamo_lite.model_files import resolve_model

    dp = bool((engine.extra or {}).get("enable_attention_dp", engine.enable_attention_dp))
    check_divides(model_config(resolve_model(engine.model_path).config), ParallelPlan(tp, ep, dp))


async def run(settings: WorkerSettings) -> None:
    if settings.engine == "torch":  # a flag the engine can't honour fails before any service is asked
        check_torch_ranks(settings.engine_settings)
    await check_services(settings.runtime)  # seconds, not after minutes of model loading
    worker = Worker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    failure: list[BaseException] = []

    def engine_failed(error: BaseException) -> None:  # from the engine's thread (a dead rank, a bug)
        failure.append(error)
        loop.call_soon_threadsafe(stop.set)

    if hasattr(worker.engine, "on_failure"):
        worker.engine.on_failure = engine_failed
    print(
        f"READY worker {worker.instance_id} mode={settings.role} metrics_port={worker.metrics_port}",
        flush=True,
    )
    tune_for_serving(settings.runtime.gc_young_threshold)  # set up: what exists now lives as long as we do
    await stop.wait()
    if failure:  # deregister at once: its requests have failed already (the router retries or migrates them)
        log.error("engine failed (%s): deregistering and exiting", failure[0])
        await worker.stop(drain_s=0)
        raise EngineUnavailable(f"engine failed: {failure[0]}")
    log.info("draining (up to %.0fs)", settings.runtime.timeouts.drain_s)
    await worker.stop()


def main(
    argv: list[str] | None = None,
    engine_default: str | None = None,
    prog: str = "python -m dynamo_lite.worker",
) -> int:
    try:
        settings = parse_args(argv, engine_default, prog)
        configure_openmp(settings.engine)  # before torch loads: parsing the flags does not import it
        tracing.setup(f"dynamo_lite-{settings.role.value}")  # only if OTEL_* configures it
        import uvloop

        uvloop.run(run(settings))
    except EngineUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ConnectionError, ValueError, ModelNotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        tracing.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
