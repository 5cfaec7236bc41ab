"""The frontend's ``--workers N`` against ``--workers 1``, in one run on this machine.

    python -m benchmarks.frontend_workers                 # workers 1 and 2, 3 rounds
    python -m benchmarks.frontend_workers --workers 1,2,4 --rounds 3

Disaggregated 1 prefill + 1 decode mocker worker at zero engine time over etcd + NATS (each run starts its own
on free loopback ports), streaming chat at a closed-loop concurrency (default 1024) from ``benchmarks.load``,
~200 prompt tokens, 64 output tokens, ``ignore_eos``. The worker counts alternate within each round (1, 2, 1, 2,
...), so paired runs share the box's load of the moment; the table gives medians and the ratio to
``--workers 1`` as the median of per-round ratios.

Frontend CPU is every frontend process's: the supervisor and its children (PIDs read from /proc after the
frontend is ready, checked unchanged after the run). The load generator runs in this process, on the same cores:
its CPU is reported too, as are the other servers' (workers, etcd, NATS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.compare_dynamo import (  # noqa: E402 - after the path fix above
    LOOPBACK,
    SETUPS,
    Stack,
    Timeouts,
    allocate_ports,
    dynamo_lite_commands,
    health_ready,
    service_commands,
    wait_ready,
    wait_services,
)

SETUP = SETUPS["disagg"]


def child_pids(pid: int) -> list[int]:
    """``pid``'s children, from /proc (Linux)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def box_cpu_seconds() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / ticks, sum(fields[:8]) / ticks


def cpu_model() -> dict[str, str]:
    """Model name and flags of the first CPU in /proc/cpuinfo."""
    out: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "flags") and key not in out:
                out[key] = value.strip()
    except OSError:
        pass
    return out


def run_once(
    args: argparse.Namespace, workers: int, run_dir: Path, model: str, tokenizer: str
) -> dict[str, Any]:
    """Start etcd, NATS, the two workers and a frontend with ``--workers workers``; one load run; stop all."""
    from benchmarks.load import BenchmarkConfig, run_benchmark_sync

    run_dir.mkdir(parents=True, exist_ok=True)
    ports = allocate_ports(SETUP)
    timeouts = Timeouts()
    stack = Stack(run_dir, timeouts)
    load_before = os.getloadavg()
    try:
        for spec in service_commands(ports, run_dir):
            stack.start(spec)
        wait_services(ports, timeouts.service_ready)
        specs = dynamo_lite_commands(SETUP, sys.executable, ports, f"bench{ports.http}", args.log_level)
        for spec in specs:
            if spec.role == "frontend":
                spec.argv += ["--workers", str(workers)]
            stack.start(spec)
        url = f"http://{LOOPBACK}:{ports.http}"
        wait_ready(stack, url, model, lambda h: health_ready("dynamo_lite", SETUP, h), timeouts)
        supervisor = stack.pids["frontend"]
        frontend = [supervisor, *child_pids(supervisor)] if workers > 1 else [supervisor]
        if len(frontend) != (workers + 1 if workers > 1 else 1):
            raise RuntimeError(f"expected {workers} frontend processes, found {frontend[1:]}")
        others = {role: pid for role, pid in stack.pids.items() if role != "frontend"}
        cfg = BenchmarkConfig(
            url=url,
            model=model,
            streaming=True,
            concurrency=args.concurrency,
            request_count=args.request_count,
            warmup_request_count=args.warmup_request_count,
            measurement_seconds=args.max_seconds or None,
            input_tokens_mean=args.input_tokens,
            output_tokens_mean=args.output_tokens,
            extra_inputs={"ignore_eos": True},
            tokenizer=tokenizer,
            server_pids=[*frontend, *others.values()],
            progress=False,
        )
        busy0, all0 = box_cpu_seconds()
        result = run_benchmark_sync(cfg)
        busy1, all1 = box_cpu_seconds()
        stack.check_alive()
        if workers > 1 and sorted(child_pids(supervisor)) != sorted(frontend[1:]):
            raise RuntimeError("a frontend process was restarted during the run: its CPU is not counted")
        s = result.summary

        def cpu_s(pids: list[int]) -> float:
            used = [s.server_cpu.get(p) for p in pids]
            return sum(u.seconds for u in used if u is not None)

        tokens = s.output_token_throughput * s.duration_s
        fe_cpu = cpu_s(frontend)
        ours = fe_cpu + cpu_s(list(others.values())) + (s.client_cpu.seconds if s.client_cpu else 0.0)
        return {
            "workers": workers,
            "completed": s.completed,
            "errors": s.errors,
            "errors_by_kind": s.errors_by_kind,
            "duration_s": s.duration_s,
            "tok_s": s.output_token_throughput,
            "req_s": s.request_throughput,
            "tokens": tokens,
            "frontend_cpu_s": fe_cpu,
            "frontend_cpu_pct": 100 * fe_cpu / s.duration_s if s.duration_s else float("nan"),
            "frontend_cpu_s_per_1k_tok": 1000 * fe_cpu / tokens if tokens else float("nan"),
            "frontend_cpu_s_by_pid": {p: cpu_s([p]) for p in frontend},
            "others_cpu_pct": {r: 100 * cpu_s([p]) / s.duration_s for r, p in others.items()},
            "client_cpu_pct": s.client_cpu.percent if s.client_cpu else float("nan"),
            "client_cpu_s_per_1k_tok": 1000 * s.client_cpu.seconds / tokens
            if s.client_cpu and tokens
            else 0.0,
            "tokens_per_chunk": s.metrics["tokens_per_chunk"].mean,
            "ttft_p50_ms": s.metrics["time_to_first_token_ms"].p50,
            "ttft_p99_ms": s.metrics["time_to_first_token_ms"].p99,
            "itl_p50_ms": s.metrics["inter_token_latency_ms"].p50,
            "request_latency_p50_ms": s.metrics["request_latency_ms"].p50,
            # The whole machine over the run (warmup included): busy %, and what processes not of this run used.
            "box_busy_pct": 100 * (busy1 - busy0) / (all1 - all0),
            "ours_cpu_s_per_1k_tok": 1000 * ours / tokens if tokens else float("nan"),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        }
    finally:
        stack.stop()


def format_table(runs: list[dict[str, Any]], counts: list[int]) -> str:
    rows = [
        "| workers | tok/s | ×first | errors | FE CPU % | FE CPU s/1k tok | client CPU % | client CPU s/1k tok "
        "| workers+etcd+NATS CPU % | all of the run's CPU s/1k tok | box busy % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["round"]: r["tok_s"] for r in runs if r["workers"] == counts[0]}
    for n in counts:
        mine = [r for r in runs if r["workers"] == n]

        def med(key: str, mine: list[dict[str, Any]] = mine) -> float:
            return statistics.median(r[key] for r in mine)

        ratio = statistics.median(r["tok_s"] / base[r["round"]] for r in mine if base.get(r["round"]))
        rows.append(
            f"| {n} | {med('tok_s'):.0f} | {ratio:.2f} | {sum(r['errors'] for r in mine)} | "
            f"{med('frontend_cpu_pct'):.0f} | {med('frontend_cpu_s_per_1k_tok'):.3f} | "
            f"{med('client_cpu_pct'):.0f} | {med('client_cpu_s_per_1k_tok'):.3f} | "
            f"{statistics.median(sum(r['others_cpu_pct'].values()) for r in mine):.0f} | "
            f"{med('ours_cpu_s_per_1k_tok'):.3f} | {med('box_busy_pct'):.0f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.frontend_workers", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--workers", default="1,2", help="comma-separated --workers values; ratios are to the first"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=1024)
    p.add_argument(
        "--request-count", type=int, default=8000, help="measured requests per run (bounded by time)"
    )
    p.add_argument("--warmup-request-count", type=int, default=1024)
    p.add_argument("--max-seconds", type=float, default=15.0, help="stop a run's measurement after this long")
    p.add_argument("--input-tokens", type=int, default=200)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--log-level", default="WARNING", help="--log-level of the servers")
    p.add_argument("--artifact-dir", default="", help="default: artifacts/frontend_workers-<timestamp>")
    args = p.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    counts = [int(n) for n in args.workers.split(",") if n]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    artifact_dir = Path(args.artifact_dir or ROOT / "artifacts" / f"frontend_workers-{stamp}").resolve()

    from dynamo_lite.model_files import resolve_model

    model = resolve_model()
    cpu = cpu_model()
    print(f"CPU: {cpu.get('model name', '?')}, {os.cpu_count()} cores; load avg {os.getloadavg()[0]:.2f}")
    runs = []
    for rnd in range(1, args.rounds + 1):
        for n in counts:
            run = run_once(
                args, n, artifact_dir / f"w{n}-r{rnd}", model.default_served_name, str(model.folder)
            )
            run["round"] = rnd
            runs.append(run)
            print(
                f"round {rnd} workers {n}: {run['tok_s']:.0f} tok/s, {run['errors']} errors, frontend "
                f"{run['frontend_cpu_pct']:.0f}% CPU ({run['frontend_cpu_s_per_1k_tok']:.3f} s/1k tok), client "
                f"{run['client_cpu_pct']:.0f}% CPU, TTFT p50 {run['ttft_p50_ms']:.0f} ms, ITL p50 "
                f"{run['itl_p50_ms']:.1f} ms, {run['tokens_per_chunk']:.1f} tok/chunk, "
                f"box {run['box_busy_pct']:.0f}% busy, load avg {run['loadavg_before'][0]:.2f}",
                flush=True,
            )
    table = format_table(runs, counts)
    print(table)
    report = {"config": vars(args), "cpu": cpu, "cpus": os.cpu_count(), "runs": runs, "table": table}
    (artifact_dir / "frontend_workers.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"JSON: {artifact_dir / 'frontend_workers.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
