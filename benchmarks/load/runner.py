"""Runs a benchmark: build the requests, warm up, measure under a closed or open loop, summarize.

Closed loop (``concurrency``): N workers, each sends its next request when the previous one ends.
Open loop (``request_rate``): arrivals from a Poisson process, whatever the server's state; a request
that finds no free connection (``limits.max_connections``) waits, and that wait is reported as
``client_queue_delay_ms`` — if it grows, the client, not the server, set the pace.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any, TypeVar

import orjson

from .client import LoadClient, PreparedRequest
from .config import BenchmarkConfig
from .http import Origin, build_request
from .metrics import Summary, summarize
from .openai_api import build_payload
from .procstat import CpuWindow
from .progress import Progress
from .prompts import build_dataset, chat_template_overhead, load_tokenizer
from .records import RequestRecord

# Distinct prompts by default: one per request, up to this many (and ~2M prompt tokens in all); then cycled.
_MAX_DEFAULT_ENTRIES = 10_000
_MAX_DEFAULT_DATASET_TOKENS = 2_000_000
_TOKENIZE_BATCH = 8192
T = TypeVar("T")


@dataclass(slots=True)
class BenchmarkResult:
    """A finished run: its config, summary, and every measured request."""

    config: BenchmarkConfig
    summary: Summary
    records: list[RequestRecord]
    warmup_records: list[RequestRecord] = field(default_factory=list)
    epoch_offset: float = 0.0  # add to a record's perf_counter() times to get Unix time
    template_overhead: int = 0  # tokens subtracted from prompts for the server's chat template
    notes: list[str] = field(default_factory=list)
    artifacts: list[Path] = field(default_factory=list)


def _prepare(cfg: BenchmarkConfig, tokenizer: Any, count: int, overhead: int) -> list[PreparedRequest]:
    origin = Origin.from_url(cfg.url)
    specs = build_dataset(
        tokenizer,
        count,
        input_mean=cfg.input_tokens_mean,
        input_stddev=cfg.input_tokens_stddev,
        output_mean=cfg.output_tokens_mean,
        output_stddev=cfg.output_tokens_stddev,
        template_overhead=overhead,
        seed=cfg.random_seed,
    )
    out = []
    for spec in specs:
        body = orjson.dumps(build_payload(cfg, spec.text, spec.max_tokens))
        data = build_request(origin, cfg.path, body, cfg.headers, cfg.streaming)
        out.append(PreparedRequest(data, spec.input_tokens, spec.max_tokens))
    return out


async def _closed_loop(
    client: LoadClient,
    requests: list[PreparedRequest],
    offset: int,
    count: int | None,
    concurrency: int,
    deadline: float | None,
    progress: Progress,
) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    indices = itertools.count()  # shared by the workers: each takes the next request
    n = len(requests)

    async def worker() -> None:
        for i in indices:
            if (count is not None and i >= count) or (deadline is not None and perf_counter() >= deadline):
                return
            rec = await client.send(requests[(offset + i) % n], i)
            records.append(rec)
            progress.record(rec)

    workers = concurrency if count is None else min(concurrency, count)
    await asyncio.gather(*(worker() for _ in range(workers)))
    records.sort(key=lambda r: r.index)
    return records


async def _open_loop(
    client: LoadClient,
    requests: list[PreparedRequest],
    offset: int,
    count: int | None,
    rate: float,
    deadline: float | None,
    progress: Progress,
    rng: random.Random,
) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    tasks: set[asyncio.Task[None]] = set()
    n = len(requests)

    async def one(i: int, scheduled: float) -> None:
        rec = await client.send(requests[(offset + i) % n], i, scheduled)
        records.append(rec)
        progress.record(rec)

    arrival = perf_counter()
    for i in itertools.count():
        if count is not None and i >= count:
            break
        arrival += rng.expovariate(rate)
        if deadline is not None and arrival >= deadline:
            break
        delay = arrival - perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, arrival))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    records.sort(key=lambda r: r.index)
    return records


def count_chunk_tokens(tokenizer: Any, records: list[RequestRecord]) -> None:
    """Tokens per output chunk, by re-tokenizing each chunk's text (after the run: it costs CPU)."""
    if tokenizer is None:
        return
    texts = [t for r in records for t in r.chunk_texts]
    counts: list[int] = []
    for lo in range(0, len(texts), _TOKENIZE_BATCH):
        batch = tokenizer.encode_batch(texts[lo : lo + _TOKENIZE_BATCH], add_special_tokens=False)
        counts.extend(len(e.ids) for e in batch)
    pos = 0
    for r in records:
        r.chunk_tokens = counts[pos : pos + len(r.chunk_texts)]
        pos += len(r.chunk_texts)


async def run_benchmark(config: BenchmarkConfig) -> BenchmarkResult:
    """Run one benchmark as ``config`` says; writes artifacts when ``config.artifact_dir`` is set.

    >>> result = await run_benchmark(BenchmarkConfig(url="http://127.0.0.1:8000", concurrency=8))
    >>> result.summary.request_throughput
    """
    cfg = config
    notes: list[str] = []
    tokenizer = await asyncio.to_thread(load_tokenizer, cfg.tokenizer)
    if tokenizer is None:
        notes.append("no tokenizer: prompt lengths are word counts, tokens per chunk unknown")
    overhead = cfg.chat_template_overhead
    if overhead is None:
        overhead = 0
        if cfg.endpoint_type == "chat":
            overhead = await asyncio.to_thread(chat_template_overhead, tokenizer, cfg.tokenizer)
    measured = cfg.measured_count
    entries = cfg.num_dataset_entries
    if entries is None:
        entries = cfg.warmup_request_count + measured if measured is not None else _MAX_DEFAULT_ENTRIES
        cap = min(_MAX_DEFAULT_ENTRIES, _MAX_DEFAULT_DATASET_TOKENS // max(1, cfg.input_tokens_mean))
        entries = max(1, min(entries, cap))
    requests = await asyncio.to_thread(_prepare, cfg, tokenizer, entries, overhead)

    client = LoadClient(cfg)
    warmup: list[RequestRecord] = []
    cpu = CpuWindow(cfg.server_pids)
    epoch_offset = time.time() - perf_counter()
    try:
        if cfg.warmup_request_count:
            warm_progress = Progress("warmup ", cfg.warmup_request_count, enabled=cfg.progress)
            # Open-loop runs warm up closed-loop: the point is warm connections and caches, not the shape.
            concurrency = cfg.concurrency if cfg.request_rate is None else min(cfg.warmup_request_count, 64)
            async with warm_progress.running():
                warmup = await _closed_loop(
                    client, requests, 0, cfg.warmup_request_count, concurrency, None, warm_progress
                )
        progress = Progress("measure", measured, cfg.measurement_seconds, enabled=cfg.progress)
        # Objects built so far (requests, prompts) never die during the run: keep the collector off them.
        gc.collect()
        gc.freeze()
        try:
            async with progress.running():
                cpu.start()
                deadline = None
                if cfg.measurement_seconds is not None:
                    deadline = perf_counter() + cfg.measurement_seconds
                offset = cfg.warmup_request_count
                if cfg.request_rate is None:
                    records = await _closed_loop(
                        client, requests, offset, measured, cfg.concurrency, deadline, progress
                    )
                else:
                    rng = random.Random(cfg.random_seed ^ 0xA771)
                    records = await _open_loop(
                        client, requests, offset, measured, cfg.request_rate, deadline, progress, rng
                    )
                cpu.stop()
        finally:
            gc.unfreeze()
        connections = client.pool.opened
    finally:
        client.close()

    await asyncio.to_thread(count_chunk_tokens, tokenizer, records)
    summary = summarize(records, cfg.goodput)
    summary.connections_opened = connections
    summary.client_cpu = cpu.client
    summary.server_cpu = cpu.servers
    if cpu.client is not None and records:
        summary.client_cpu_us_per_request = cpu.client.seconds * 1e6 / len(records)
        if summary.total_chunks:
            summary.client_cpu_us_per_chunk = cpu.client.seconds * 1e6 / summary.total_chunks
    if entries < len(records) + cfg.warmup_request_count:
        notes.append(f"{entries} distinct prompts were cycled: repeated prompts can hit a prefix cache")
    result = BenchmarkResult(cfg, summary, records, warmup, epoch_offset, overhead, notes)
    if cfg.artifact_dir:
        from .report import write_artifacts

        result.artifacts = await asyncio.to_thread(write_artifacts, result, Path(cfg.artifact_dir))
    return result


async def run_sweep(config: BenchmarkConfig, concurrencies: list[int]) -> list[BenchmarkResult]:
    """One run per concurrency (artifacts of each in ``artifact_dir/concurrency_N``), plus sweep plots."""
    results = []
    for c in concurrencies:
        sub = str(Path(config.artifact_dir) / f"concurrency_{c}") if config.artifact_dir else None
        results.append(await run_benchmark(config.replace(concurrency=c, artifact_dir=sub)))
    if config.artifact_dir:
        from .report import write_sweep_artifacts

        await asyncio.to_thread(write_sweep_artifacts, results, Path(config.artifact_dir))
    return results


def run_blocking(main: Callable[[], Coroutine[Any, Any, T]], use_uvloop: bool = True) -> T:
    """Run ``main()`` in a fresh event loop, uvloop's when installed (3-4x less client CPU per read)."""
    factory = None
    if use_uvloop:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def run_benchmark_sync(config: BenchmarkConfig, use_uvloop: bool = True) -> BenchmarkResult:
    """``run_benchmark`` for scripts without an event loop of their own."""
    return run_blocking(lambda: run_benchmark(config), use_uvloop)
