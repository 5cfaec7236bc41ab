"""Where a served step's time goes: ``serve`` with a step log, one ``benchmarks.load`` phase against it.

    python -m benchmarks.served_steps                        # c=8, 48 requests (~128 prompt / 64 output tokens)
    python -m benchmarks.served_steps --concurrency 1 --requests 16 -- --dtype bfloat16 --quantization none
    python -m benchmarks.served_steps --sampling             # sample_batch alone: 8 rows, temperature 1.0
    python -m benchmarks.served_steps -- --engine llamacpp   # llama.cpp's steps, each llama_decode timed too

The server is ``python -m dynamo_lite serve`` (arguments after ``--``; default ``--dtype bfloat16 --quantization
none``) with the engine's ``_timed_step`` wrapped: each step's wall time and its engine thread's CPU time
(``time.thread_time``), decode rows, prefill tokens and threads (torch's, or llama.cpp's that step), and with
``--engine llamacpp`` the runner's forward (one ``llama_decode``) alone. A step whose CPU time is close to its
wall time was not waiting (for the GIL, for a core); one whose CPU time is above the same step run alone costs
more work. Printed per engine and step kind: steps, mean wall, CPU and forward ms; the decode engine's median gap
between steps; then each engine's busy share, the server's and the load client's CPU seconds, and the phase's
output tok/s and ITL p50 (issue 29, ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

MODEL = "SmolLM2-135M-Instruct"
DEFAULT_SERVE_ARGS = ("--dtype", "bfloat16", "--quantization", "none")
# role, start, wall s, CPU s, decode rows, prefill, threads, forward s (the runner's: e.g. one llama_decode)
Step = tuple[str, float, float, float, int, int, int, float]


def child(log_path: str, serve_args: list[str]) -> int:
    """Run ``serve`` with every engine step logged; the log is written on SIGUSR1 and at exit."""
    from dynamo_lite.openmp import configure_openmp

    engine_name = serve_args[serve_args.index("--engine") + 1] if "--engine" in serve_args else "torch"
    configure_openmp(engine_name)  # as ``serve`` would, before torch loads
    from dynamo_lite.engines.reference import engine

    steps: list[Step] = []
    forward_s: dict[int, float] = {}  # engine thread -> its last step's runner.forward seconds
    engine_class: type[engine.TorchEngine] = engine.TorchEngine
    if engine_name == "llamacpp":
        from dynamo_lite.engines.llamacpp.engine import LlamaCppEngine, LlamaCppRunner

        engine_class = LlamaCppEngine  # its own ``_timed_step`` (threads per step)
        forward = LlamaCppRunner.forward

        def timed_forward(self: LlamaCppRunner, *args: object) -> object:
            started = time.perf_counter()
            try:
                return forward(self, *args)  # type: ignore[arg-type]
            finally:
                forward_s[threading.get_ident()] = time.perf_counter() - started

        LlamaCppRunner.forward = timed_forward  # type: ignore[method-assign,assignment]
    timed_step = engine_class._timed_step

    def logged(self: engine.TorchEngine, plan: engine.StepPlan) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        forward_s.pop(threading.get_ident(), None)
        timed_step(self, plan)
        prefill = sum(n for _, _, n in plan.prefill)
        lib = getattr(self, "_lib", None)  # llama.cpp's threads this step, else torch's
        threads = lib._n_threads if lib is not None else self._threads_now
        steps.append(
            (
                self.config.role.value,
                wall,
                time.perf_counter() - wall,
                time.thread_time() - cpu,
                len(plan.decode),
                prefill,
                threads,
                forward_s.get(threading.get_ident(), 0.0),
            )
        )

    engine_class._timed_step = logged  # type: ignore[method-assign]

    def dump(*_: object) -> None:
        Path(log_path).write_text(json.dumps(steps))

    signal.signal(signal.SIGUSR1, dump)
    from dynamo_lite.serve import main as serve

    try:
        return serve(serve_args)
    finally:
        dump()


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report(steps: list[Step]) -> None:
    groups: dict[tuple[str, str, int], list[Step]] = defaultdict(list)
    for s in steps:
        kind = f"prefill {s[5]:>4} tok" if s[5] else f"decode {s[4]} rows"
        groups[(s[0], kind, s[6])].append(s)
    print("| engine | step | threads | steps | wall ms (mean) | thread CPU ms (mean) | forward ms (mean) |")
    print("|---|---|---|---|---|---|---|")
    for (role, kind, threads), group in sorted(groups.items()):
        wall = 1000 * statistics.fmean(s[2] for s in group)
        cpu = 1000 * statistics.fmean(s[3] for s in group)
        fwd = 1000 * statistics.fmean(s[7] for s in group)
        print(f"| {role} | {kind} | {threads} | {len(group)} | {wall:.1f} | {cpu:.1f} | {fwd:.1f} |")
    # Between one decode step's end and the next one's start: the engine thread's loop (inbox, admission,
    # planning), not the step; a gap that long on every token is serving overhead outside the step.
    decode = sorted((s for s in steps if s[0] == "decode" and not s[5]), key=lambda s: s[1])
    gaps = [b[1] - (a[1] + a[2]) for a, b in itertools.pairwise(decode) if b[1] - (a[1] + a[2]) < 0.05]
    if gaps:
        print(f"decode engine, between consecutive steps: median {1000 * statistics.median(gaps):.2f} ms")
    if steps:
        span = max(s[1] + s[2] for s in steps) - min(s[1] for s in steps)
        for role in sorted({s[0] for s in steps}):
            busy = sum(s[2] for s in steps if s[0] == role)
            print(f"{role}: busy {100 * busy / span:.0f} % of {span:.1f} s")


def sampling_bench(rows: int = 8, vocab: int = 49152, reps: int = 200) -> None:
    """``sample_batch`` alone on one thread: ``rows`` temperature-1.0 rows of SmolLM2's vocabulary; beside it
    what it did before issue 29's change, a softmax and ``torch.multinomial`` per row."""
    import torch

    from dynamo_lite.engines.reference.sampling import Sampler, sample_batch
    from dynamo_lite.protocol import SamplingOptions

    torch.set_num_threads(1)
    logits = torch.randn(rows, vocab) * 3
    samplers = [Sampler(SamplingOptions(temperature=1.0), torch.device("cpu")) for _ in range(rows)]

    def per_row_multinomial() -> None:
        for i, s in enumerate(samplers):
            int(torch.multinomial(torch.softmax(logits[i] / s.temperature, dim=-1), 1, generator=s.generator))

    def batched() -> None:
        sample_batch(logits, samplers, [None] * rows)  # nothing suppressed: ``logits`` stays as it is

    for name, run in (("sample_batch", batched), ("per-row multinomial (before)", per_row_multinomial)) * 2:
        run()
        started = time.perf_counter()
        for _ in range(reps):
            run()
        print(f"{name}, {rows} rows x {vocab}: {(time.perf_counter() - started) / reps * 1e3:.2f} ms")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[2:])
    serve_args = list(DEFAULT_SERVE_ARGS)
    if "--" in argv:
        serve_args = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    p = argparse.ArgumentParser(prog="python -m benchmarks.served_steps", description=__doc__)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--port", type=int, default=18431)
    p.add_argument("--sampling", action="store_true", help="time sample_batch alone instead")
    args = p.parse_args(argv)
    if args.sampling:
        sampling_bench()
        return 0
    from benchmarks.load import BenchmarkConfig, run_benchmark_sync

    log_path = os.path.join(tempfile.mkdtemp(prefix="served-steps-"), "steps.json")
    url = f"http://127.0.0.1:{args.port}"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.served_steps",
        "--child",
        log_path,
        "--http-port",
        str(args.port),
    ]
    server = subprocess.Popen([*cmd, "--served-model-name", MODEL, "--log-level", "WARNING", *serve_args])
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    print("server did not come up", file=sys.stderr)
                    return 1
                time.sleep(0.5)
        cfg = BenchmarkConfig(
            url=url,
            model=MODEL,
            streaming=True,
            concurrency=args.concurrency,
            request_count=args.requests,
            warmup_request_count=args.warmup,
            input_tokens_mean=128,
            output_tokens_mean=64,
            extra_inputs={"ignore_eos": True},
            progress=False,
            artifact_dir=None,
        )
        server_cpu, client = process_cpu_s(server.pid), resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        summary = run_benchmark_sync(cfg).summary
        wall = time.perf_counter() - started
        server_cpu = process_cpu_s(server.pid) - server_cpu
        after = resource.getrusage(resource.RUSAGE_SELF)
        client_cpu = after.ru_utime + after.ru_stime - client.ru_utime - client.ru_stime
        server.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        report(json.loads(Path(log_path).read_text()))
        print(
            f"c={args.concurrency}: {summary.output_token_throughput:.1f} output tok/s, ITL p50 "
            f"{summary.metrics['inter_token_latency_ms'].p50:.2f} ms; {wall:.1f} s, server CPU "
            f"{server_cpu:.1f} s, load client CPU {client_cpu:.1f} s; load average {os.getloadavg()[0]:.2f}"
        )
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
