"""A genai-perf-style load generator for OpenAI-compatible servers, with a lean asyncio HTTP/1.1 client.

CLI: ``python -m benchmarks.load --help``. Python API::

    from benchmarks.load import BenchmarkConfig, run_benchmark

    result = await run_benchmark(BenchmarkConfig(url="http://127.0.0.1:8000", streaming=True, concurrency=64,
                                                 request_count=1000, output_tokens_mean=64,
                                                 extra_inputs={"ignore_eos": True}))
    print(result.summary.request_throughput, result.summary.metrics["time_to_first_token_ms"].p99)
"""

from .config import BenchmarkConfig, Limits, Timeouts, parse_extra_input, parse_goodput
from .metrics import CpuUsage, Stats, Summary, percentile, summarize
from .records import RequestRecord
from .report import format_sweep_table, format_table, result_dict, write_artifacts, write_sweep_artifacts
from .runner import BenchmarkResult, run_benchmark, run_benchmark_sync, run_blocking, run_sweep

__all__ = [
    "BenchmarkConfig",
    "BenchmarkResult",
    "CpuUsage",
    "Limits",
    "RequestRecord",
    "Stats",
    "Summary",
    "Timeouts",
    "format_sweep_table",
    "format_table",
    "parse_extra_input",
    "parse_goodput",
    "percentile",
    "result_dict",
    "run_benchmark",
    "run_benchmark_sync",
    "run_blocking",
    "run_sweep",
    "summarize",
    "write_artifacts",
    "write_sweep_artifacts",
]
