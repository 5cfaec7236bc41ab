"""Reporting: a summary table for stdout; JSON, CSV and plots (if matplotlib is here) in the artifact dir."""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from .metrics import Stats, Summary
from .records import RequestRecord

if TYPE_CHECKING:
    from .runner import BenchmarkResult

PROFILE_JSON = "profile_export.json"
SUMMARY_CSV = "profile_export.csv"
REQUESTS_CSV = "requests.csv"
SWEEP_JSON = "sweep.json"
SWEEP_CSV = "sweep.csv"

# (metric key, label) in the order the table shows them.
_TABLE_ROWS = (
    ("time_to_first_token_ms", "Time to first token (ms)"),
    ("inter_token_latency_ms", "Inter-token latency (ms)"),
    ("inter_chunk_gap_ms", "Inter-chunk gap (ms)"),
    ("request_latency_ms", "Request latency (ms)"),
    ("client_queue_delay_ms", "Client queue delay (ms)"),
    ("input_sequence_length", "Input sequence length"),
    ("output_sequence_length", "Output sequence length"),
    ("tokens_per_chunk", "Tokens per chunk"),
    ("chunks_per_request", "Chunks per request"),
    ("output_token_throughput_per_request", "Output tok/s per request"),
)
_COLUMNS = ("mean", "min", "max", "p99", "p90", "p50")


def _fmt(x: float) -> str:
    if abs(x) >= 100_000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.1f}"
    return f"{x:.2f}"


def describe(result: BenchmarkResult) -> str:
    """One line naming what was measured."""
    cfg = result.config
    load = f"rate {cfg.request_rate:g}/s" if cfg.request_rate else f"concurrency {cfg.concurrency}"
    mode = "streaming" if cfg.streaming else "non-streaming"
    return f"{cfg.url.rstrip('/')}{cfg.path}  model {cfg.model}  {mode}  {load}"


def format_table(result: BenchmarkResult) -> str:
    """The human summary: per-metric statistics, then throughput, errors and CPU."""
    s = result.summary
    width = max(len(label) for _, label in _TABLE_ROWS)
    lines = [describe(result), f"{'Statistic':>{width}}" + "".join(f"{c:>11}" for c in _COLUMNS)]
    for key, label in _TABLE_ROWS:
        stats = s.metrics.get(key)
        if stats is not None:
            lines.append(f"{label:>{width}}" + "".join(f"{_fmt(getattr(stats, c)):>11}" for c in _COLUMNS))
    lines.append("")
    lines.append(f"Request throughput (req/s):       {s.request_throughput:.2f}")
    lines.append(f"Output token throughput (tok/s):  {s.output_token_throughput:.1f}")
    if s.goodput is not None:
        slos = " ".join(f"{k}<={v:g}ms" for k, v in result.config.goodput.items())
        lines.append(f"Goodput (req/s):                  {s.goodput:.2f}  ({slos})")
    errors = ", ".join(f"{k}: {v}" for k, v in s.errors_by_kind.items())
    lines.append(
        f"Requests: {s.completed} completed, {s.errors} errors{f' ({errors})' if errors else ''}"
        f" in {s.duration_s:.2f} s; {s.connections_opened} connections opened"
    )
    for kind, text in s.error_samples.items():
        lines.append(f"  {kind}: {text[:200]!r}")
    if s.client_cpu is not None:
        per_req = f"{s.client_cpu_us_per_request:.0f} µs/request" if s.client_cpu_us_per_request else ""
        per_chunk = f", {s.client_cpu_us_per_chunk:.1f} µs/chunk" if s.client_cpu_us_per_chunk else ""
        lines.append(f"Client CPU: {s.client_cpu.percent:.1f}% of a core, {per_req}{per_chunk}")
    for pid, usage in s.server_cpu.items():
        text = f"{usage.percent:.1f}% of a core ({usage.seconds:.2f} s)" if usage else "process gone"
        lines.append(f"Server CPU pid {pid}: {text}")
    lines += [f"Note: {n}" for n in result.notes]
    return "\n".join(lines)


def _record_row(rec: RequestRecord, epoch_offset: float) -> dict[str, Any]:
    ms = 1000.0
    return {
        "index": rec.index,
        "start_ns": int((rec.start + epoch_offset) * 1e9),
        "end_ns": int((rec.end + epoch_offset) * 1e9),
        "ok": rec.ok,
        "status": rec.status,
        "error_kind": rec.error_kind,
        "error": rec.error,
        "input_tokens": rec.input_tokens,
        "max_tokens": rec.max_tokens,
        "prompt_tokens": rec.prompt_tokens,
        "completion_tokens": rec.completion_tokens,
        "output_tokens": rec.output_tokens,
        "finish_reason": rec.finish_reason,
        "ttft_ms": rec.ttft * ms if rec.ttft is not None else None,
        "request_latency_ms": rec.latency * ms,
        "itl_ms": rec.itl * ms if rec.itl is not None else None,
        "queue_delay_ms": rec.queue_delay * ms if rec.queue_delay is not None else None,
        "chunks": len(rec.chunk_times),
    }


def result_dict(result: BenchmarkResult, with_records: bool = True) -> dict[str, Any]:
    """Everything about a run as plain data (the content of profile_export.json)."""
    out: dict[str, Any] = {
        "tool": "benchmarks.load",
        "description": describe(result),
        "config": result.config.to_dict(),
        "template_overhead": result.template_overhead,
        "notes": result.notes,
        "summary": dataclasses.asdict(result.summary),
    }
    if with_records:
        rows = []
        for rec in result.records:
            row = _record_row(rec, result.epoch_offset)
            row["chunk_offsets_ms"] = [round((t - rec.start) * 1000.0, 4) for t in rec.chunk_times]
            row["chunk_tokens"] = rec.chunk_tokens
            rows.append(row)
        out["records"] = rows
    return out


def _json_bytes(data: Any) -> bytes:
    # Server pids are int keys: orjson needs OPT_NON_STR_KEYS for them.
    return orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)


def _summary_csv_rows(s: Summary) -> list[list[Any]]:
    rows: list[list[Any]] = [["Metric", "avg", "min", "max", "p99", "p95", "p90", "p50", "std", "count"]]
    for key, stats in s.metrics.items():
        st: Stats = stats
        rows.append([key, st.mean, st.min, st.max, st.p99, st.p95, st.p90, st.p50, st.std, st.count])
    rows.append([])
    rows.append(["Metric", "Value"])
    rows.append(["request_throughput_per_s", s.request_throughput])
    rows.append(["output_token_throughput_per_s", s.output_token_throughput])
    if s.goodput is not None:
        rows.append(["goodput_per_s", s.goodput])
    rows.append(["requests", s.requests])
    rows.append(["completed", s.completed])
    rows.append(["errors", s.errors])
    for kind, n in s.errors_by_kind.items():
        rows.append([f"errors_{kind}", n])
    rows.append(["duration_s", s.duration_s])
    if s.client_cpu is not None:
        rows.append(["client_cpu_percent", s.client_cpu.percent])
        rows.append(["client_cpu_us_per_request", s.client_cpu_us_per_request])
        rows.append(["client_cpu_us_per_chunk", s.client_cpu_us_per_chunk])
    for pid, usage in s.server_cpu.items():
        rows.append([f"server_cpu_percent_pid_{pid}", usage.percent if usage else None])
    return rows


def write_artifacts(result: BenchmarkResult, folder: Path) -> list[Path]:
    """profile_export.json, profile_export.csv, requests.csv and plots (if matplotlib) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    path = folder / PROFILE_JSON
    path.write_bytes(_json_bytes(result_dict(result)))
    written.append(path)
    path = folder / SUMMARY_CSV
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(_summary_csv_rows(result.summary))
    written.append(path)
    path = folder / REQUESTS_CSV
    rows = [_record_row(r, result.epoch_offset) for r in result.records]
    with path.open("w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    written.append(path)
    from .plots import plot_latency_cdfs

    plots, note = plot_latency_cdfs(result, folder)
    written += plots
    if note and note not in result.notes:
        result.notes.append(note)
    return written


def sweep_row(result: BenchmarkResult) -> dict[str, Any]:
    """One line of a sweep: the load point and its headline numbers."""
    s = result.summary
    row: dict[str, Any] = {
        "concurrency": result.config.concurrency,
        "request_rate": result.config.request_rate,
        "request_throughput": s.request_throughput,
        "output_token_throughput": s.output_token_throughput,
        "goodput": s.goodput,
        "completed": s.completed,
        "errors": s.errors,
    }
    for key in ("time_to_first_token_ms", "inter_token_latency_ms", "request_latency_ms"):
        stats = s.metrics.get(key)
        for q in ("p50", "p99"):
            row[f"{key[: -len('_ms')]}_{q}_ms"] = getattr(stats, q) if stats else None
    row["client_cpu_us_per_request"] = s.client_cpu_us_per_request
    for pid, usage in s.server_cpu.items():
        row[f"server_cpu_percent_pid_{pid}"] = usage.percent if usage else None
    return row


def format_sweep_table(results: Sequence[BenchmarkResult]) -> str:
    header = ("conc", "req/s", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "errors")
    lines = ["".join(f"{h:>11}" for h in header)]
    for r in results:
        row = sweep_row(r)
        cells = [
            str(row["concurrency"]),
            f"{row['request_throughput']:.1f}",
            f"{row['output_token_throughput']:.0f}",
        ]
        for key in ("time_to_first_token_p50_ms", "time_to_first_token_p99_ms"):
            cells.append(_fmt(row[key]) if row[key] is not None else "-")
        for key in ("inter_token_latency_p50_ms", "inter_token_latency_p99_ms"):
            cells.append(_fmt(row[key]) if row[key] is not None else "-")
        cells.append(str(row["errors"]))
        lines.append("".join(f"{c:>11}" for c in cells))
    return "\n".join(lines)


def write_sweep_artifacts(results: Sequence[BenchmarkResult], folder: Path) -> list[Path]:
    """sweep.json, sweep.csv and the vs-concurrency plots (if matplotlib) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [sweep_row(r) for r in results]
    written = []
    path = folder / SWEEP_JSON
    path.write_bytes(_json_bytes({"tool": "benchmarks.load", "points": rows}))
    written.append(path)
    path = folder / SWEEP_CSV
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    written.append(path)
    from .plots import plot_sweep

    plots, _ = plot_sweep(results, folder)
    return written + plots
