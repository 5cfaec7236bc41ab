"""The seed's load on the gpt-oss-20b or -120b shape (``--shape``) through HTTP: one aggregated worker vs a prefill
and a decode worker (separate processes sharing one GPU, KV by CUDA IPC), measured by ``benchmarks.load``
(genai-perf definitions).

    python -m benchmarks.gpu.gpt_oss_http [--topologies agg disagg shared] [--concurrency 64 256] [--out DIR]

Each topology is a real deployment on loopback: etcd, nats-server, ``python -m dynamo_lite.worker`` processes
(torch engine, bf16 with MXFP4 experts by default (``--quantization``), random weights made on the GPU:
``load_format: dummy``, CUDA graphs) and
``python -m dynamo_lite.frontend``. The load: ``--concurrency`` streaming completions kept in flight (closed loop),
ISL 1000 (synthetic prompts, exact token counts), OSL 2000 with ``ignore_eos``, greedy (``--temperature``), one
request per stream (``--waves`` more to measure longer). Reported from the client's records: output tok/s, TTFT
and ITL p50/p99 (ITL = (latency - TTFT) / (tokens - 1) per request), the inter-chunk gap p99; and the decode
worker's KV pulls (disagg).

``shared``: ``disagg`` with ONE copy of the weights: a weights holder process
(``python -m dynamo_lite.engines.reference.shared_weights``) owns them and both workers map them
(``--shared-weights``); each process's GPU memory (nvidia-smi) is recorded once the workers are up.
``--kill-decode-after S`` (shared/disagg): S seconds into the first load, the decode worker is killed with SIGKILL
and started again (it maps the weights again: memory recorded after the restart); the frontend migrates the
streams it had (``--migration-limit 3``), and the run's error count says whether any request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from benchmarks.gpu.common import log
from benchmarks.local_stack import LocalStack, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {
    "20b": {"num_hidden_layers": 24, "num_local_experts": 32},
    "120b": {},
}  # 120b: the config's defaults


def model_folder(folder: Path, tiny: bool = False, shape_name: str = "20b") -> Path:
    """config.json of the ``shape_name`` shape (``tiny``: the tiny model's), gpt-oss's tokenizer and generation
    config; no weights (dummy)."""
    from dynamo_lite.gpt_oss import vocab
    from dynamo_lite.gpt_oss.tiny import GENERATION_CONFIG, TINY_SHAPE, gpt_oss_config

    folder.mkdir(parents=True, exist_ok=True)
    shape = TINY_SHAPE if tiny else SHAPES[shape_name]
    (folder / "config.json").write_text(json.dumps(gpt_oss_config(**shape), indent=1))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    if not (folder / "tokenizer.json").exists():
        vocab.write_tokenizer(folder)
    return folder


def metric_total(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name + "{"))


def start_worker(
    stack: LocalStack, name: str, mode: str, args: argparse.Namespace, common: list[str]
) -> None:
    max_batch = args.prefill_batch if mode == "prefill" else args.max_batch
    cmd = [sys.executable, "-m", "dynamo_lite.worker", "--mode", mode, "--engine", "torch", *common]
    cmd += ["--device", args.device, "--dtype", args.dtype, "--max-batch-size", str(max_batch)]
    cmd += ["--quantization", args.quantization]
    cmd += ["--max-num-tokens", str(args.chunk), "--max-seq-len", str(args.max_seq), "--metrics-port", "0"]
    cmd += ["--free-gpu-memory-fraction", "0.9", "--extra-engine-args", str(args.yaml)]
    if args.device == "cpu":
        cmd += ["--threads", "1"]
    stack.spawn(name, cmd)


def wait_worker(stack: LocalStack, name: str, timeout: float) -> int:
    """The worker's metrics port, once it printed READY."""
    path = Path(stack.tmp) / f"{name}.log"

    def ready() -> bool:
        if stack.procs[name].poll() is not None:
            raise RuntimeError(f"{name} exited:\n{path.read_text(errors='replace')[-4000:]}")
        return "READY worker" in path.read_text(errors="replace")

    wait_for(ready, timeout, f"{name} ready")
    line = next(ln for ln in path.read_text().splitlines() if ln.startswith("READY worker"))
    parts = dict(p.split("=", 1) for p in line.split()[3:])
    return int(parts["metrics_port"])


def run_load(
    url: str, model: str, folder: Path, concurrency: int, args: argparse.Namespace, out: Path
) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.load",
        "--url",
        url,
        "--model",
        model,
        "--tokenizer",
        str(folder),
    ]
    cmd += ["--endpoint-type", "completions", "--streaming", "--concurrency", str(concurrency)]
    cmd += ["--request-count", str(concurrency * args.waves), "--warmup-request-count", "0"]
    cmd += ["--synthetic-input-tokens-mean", str(args.isl), "--synthetic-input-tokens-stddev", "0"]
    cmd += ["--output-tokens-mean", str(args.osl), "--extra-inputs", "ignore_eos:true", "--no-progress"]
    cmd += ["--extra-inputs", f"temperature:{args.temperature}"]
    cmd += ["--request-timeout", "1200", "--artifact-dir", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.load_timeout)
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-2000:])
    profile = json.loads((out / "profile_export.json").read_text())
    s = profile["summary"]
    m = s["metrics"]

    def pct(name: str, q: str) -> float:
        return m.get(name, {}).get(q, float("nan"))

    return {
        "concurrency": concurrency,
        "requests": s["requests"],
        "completed": s["completed"],
        "errors": s["errors"],
        "output_tok_s": s["output_token_throughput"],
        "ttft_p50_ms": pct("time_to_first_token_ms", "p50"),
        "ttft_p99_ms": pct("time_to_first_token_ms", "p99"),
        "itl_p50_ms": pct("inter_token_latency_ms", "p50"),
        "itl_p99_ms": pct("inter_token_latency_ms", "p99"),
        "chunk_gap_p99_ms": pct("inter_chunk_gap_ms", "p99"),
        "request_latency_p50_s": pct("request_latency_ms", "p50") / 1e3,
        "wall_s": time.perf_counter() - started,
    }


def worker_slots(log_path: Path) -> int:
    """KV cache slots of a torch worker (its "loaded" log line): the most sequences it decodes at once."""
    import re

    found = re.findall(r"(\d+) slots x \d+ tokens", log_path.read_text(errors="replace"))
    if not found:
        raise RuntimeError(f"no slot count in {log_path}")
    return int(found[-1])


def start_holder(stack: LocalStack, topology: str, folder: Path, args: argparse.Namespace) -> str:
    """The weights holder of the ``shared`` topology, ready; returns its socket."""
    sock = str(Path(stack.tmp) / "weights.sock")
    name = f"{topology}-holder"
    cmd = [sys.executable, "-m", "dynamo_lite.engines.reference.shared_weights", "--socket", sock]
    cmd += ["--model-path", str(folder), "--device", args.device, "--dtype", args.dtype]
    cmd += ["--quantization", args.quantization, "--extra-engine-args", str(args.yaml)]
    stack.spawn(name, cmd)
    path = Path(stack.tmp) / f"{name}.log"

    def ready() -> bool:
        if stack.procs[name].poll() is not None:
            raise RuntimeError(f"{name} exited:\n{path.read_text(errors='replace')[-4000:]}")
        return "READY weights holder" in path.read_text(errors="replace")

    wait_for(ready, args.start_timeout, "weights holder ready")
    return sock


def gpu_memory(stack: LocalStack) -> dict[str, float]:
    """GPU memory per process of ours, in MiB, as nvidia-smi reports it (what proves one copy of the weights:
    the holder holds them, each worker only its KV cache, activations and context)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": repr(e)}  # type: ignore[dict-item]
    by_pid = {str(p.pid): name for name, p in stack.procs.items() if p.poll() is None}
    found: dict[str, float] = {}
    for line in out.splitlines():
        pid, _, used = (x.strip() for x in line.partition(","))
        if pid in by_pid:
            found[by_pid[pid]] = float(used)
    return found


def kill_and_restart_decode(
    stack: LocalStack, topology: str, args: argparse.Namespace, common: list[str], ports: dict, result: dict
) -> None:
    """``--kill-decode-after``: SIGKILL the decode worker mid-load, start it again, record what happened."""
    time.sleep(args.kill_decode_after)
    info: dict = {}
    result["decode_restart"] = info
    try:
        victim = stack.procs[f"{topology}-decode"]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
        info["killed_pid"] = victim.pid
        started = time.perf_counter()
        start_worker(stack, f"{topology}-decode-restarted", "decode", args, common)
        ports["decode"] = wait_worker(stack, f"{topology}-decode-restarted", args.start_timeout)
        info["restart_ready_s"] = time.perf_counter() - started
        info["gpu_memory_MiB_after"] = gpu_memory(stack)
        log(f"{topology}: decode worker killed and restarted in {info['restart_ready_s']:.0f} s; GPU memory "
            f"(MiB): {info['gpu_memory_MiB_after']}")  # fmt: skip
    except Exception as e:
        info["error"] = repr(e)


def run_topology(topology: str, folder: Path, args: argparse.Namespace, results: list[dict]) -> dict:
    """Start the deployment, run each concurrency, stop it; ``results`` (with this topology's entry appended) is
    written to ``--json`` after every run, so a timeout keeps what was measured."""
    stack = LocalStack()
    result: dict = {"topology": topology}
    results.append(result)
    try:
        ns = f"b{uuid.uuid4().hex[:6]}"
        services = ["--namespace", ns, *stack.start_services()]
        common = ["--model-path", str(folder), *services]
        modes = ["agg"] if topology == "agg" else ["decode", "prefill"]
        started = time.perf_counter()
        if topology == "shared":
            common += ["--shared-weights", start_holder(stack, topology, folder, args)]
            result["holder_ready_s"] = time.perf_counter() - started
        for mode in modes:
            start_worker(stack, f"{topology}-{mode}", mode, args, common)
        ports = {mode: wait_worker(stack, f"{topology}-{mode}", args.start_timeout) for mode in modes}
        result["workers_ready_s"] = time.perf_counter() - started
        port = free_port()
        frontend = [
            sys.executable,
            "-m",
            "dynamo_lite.frontend",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(port),
        ]
        if args.kill_decode_after:  # the one decode worker restarts: its streams wait for it, then migrate
            frontend += ["--migration-limit", "3", "--worker-return-timeout", "120"]
        stack.spawn(f"{topology}-frontend", [*frontend, *services])
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: folder.name in urllib.request.urlopen(url + "/v1/models", timeout=2).read().decode(), 60,
                 "model listed")  # fmt: skip
        body = json.dumps({"model": folder.name, "prompt": "Hello", "max_tokens": 4}).encode()
        warm = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        urllib.request.urlopen(warm, timeout=120).read()  # the first request's one-time costs, unmeasured
        log(f"{topology}: workers ready in {result['workers_ready_s']:.0f} s")
        slots = worker_slots(Path(stack.tmp) / f"{topology}-{modes[0]}.log")
        result["decode_slots"] = slots
        result["gpu_memory_MiB"] = gpu_memory(stack)
        log(f"{topology}: GPU memory per process (MiB): {result['gpu_memory_MiB']}")
        runs = []
        for c in [
            c or slots for c in args.concurrency
        ]:  # 0: as many streams as the decoding worker has slots
            before = {m: metric_total(p, "dynamo_lite_worker_kv_transfers_total") for m, p in ports.items()}
            killer = None
            if args.kill_decode_after and topology != "agg" and not runs:
                killer = threading.Thread(
                    target=kill_and_restart_decode,
                    args=(stack, topology, args, common, ports, result),
                    daemon=True,
                )
                killer.start()
            run = run_load(url, folder.name, folder, c, args, Path(args.out) / f"{topology}-{c}")
            if killer is not None:
                killer.join(timeout=args.start_timeout)
                run["decode_killed"] = result.get("decode_restart", {})
                before["decode"] = 0.0  # a fresh process: its counters started at zero
            if topology != "agg":
                d = ports["decode"]
                run["kv_pulls"] = metric_total(d, "dynamo_lite_worker_kv_transfers_total") - before["decode"]
                run["kv_recomputes"] = metric_total(d, "dynamo_lite_worker_kv_recomputes_total")
                run["kv_GB_total"] = metric_total(d, "dynamo_lite_worker_kv_transfer_bytes_total") / 1e9
                run["kv_pull_s_total"] = metric_total(d, "dynamo_lite_worker_kv_transfer_seconds_total")
            runs.append(run)
            result["runs"] = runs
            save(results, args)
            log(f"{topology} c={c}: {json.dumps(run)}")
    except Exception as e:
        import traceback

        traceback.print_exc()
        result["error"] = repr(e)
        for name in stack.procs:
            path = Path(stack.tmp) / f"{name}.log"
            if path.exists():
                sys.stderr.write(f"---- {name} ----\n{path.read_text(errors='replace')[-3000:]}\n")
    finally:
        for name in stack.procs:  # the workers' and the frontend's logs, for the record
            path = Path(stack.tmp) / f"{name}.log"
            if path.exists() and name not in ("etcd", "nats"):
                (Path(args.out) / f"{name}.log").write_text(path.read_text(errors="replace")[-200_000:])
        stack.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topologies", nargs="+", default=["agg", "disagg"], choices=["agg", "disagg", "shared"])
    p.add_argument(
        "--kill-decode-after",
        type=float,
        default=0,
        help="disagg/shared: SIGKILL the decode worker this many seconds into the first load, then restart it",
    )
    p.add_argument(
        "--concurrency", type=int, nargs="+", default=[64, 256], help="0: the decoding worker's slots"
    )
    p.add_argument("--waves", type=int, default=1, help="requests per stream")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the engine samples row by row)")
    p.add_argument("--isl", type=int, default=1000)
    p.add_argument("--osl", type=int, default=2000)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="the tiny model (a CPU smoke test of the harness)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="20b", help="gpt-oss-20b or gpt-oss-120b")
    p.add_argument(
        "--quantization", default="mxfp4", help="the experts: mxfp4 (as the checkpoints) or none (bf16)"
    )
    p.add_argument("--max-batch", type=int, default=256, help="agg and decode workers")
    p.add_argument("--prefill-batch", type=int, default=32)
    p.add_argument("--chunk", type=int, default=4096, help="max_num_tokens per step")
    p.add_argument("--max-seq", type=int, default=3072)
    p.add_argument("--kv-pool-gib", type=int, default=8)
    p.add_argument("--start-timeout", type=float, default=300)
    p.add_argument("--load-timeout", type=float, default=400)
    p.add_argument("--model-dir", default="", help="default: /tmp/gpt-oss-SHAPE-shape")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpt-oss-http"))
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    folder = model_folder(Path(args.model_dir or f"/tmp/gpt-oss-{args.shape}-shape"), args.tiny, args.shape)
    args.yaml = Path(args.out) / "engine.yaml"
    args.yaml.write_text(
        f"load_format: dummy\nkv_cuda_pool_bytes: {args.kv_pool_gib << 30}\nkv_pull_timeout_s: 60\nkv_lease_s: 120\n"
    )
    results: list[dict] = []
    for topology in args.topologies:
        run_topology(topology, folder, args, results)
        save(results, args)
    print("\ntopology  streams  out tok/s  TTFT p50/p99 ms   ITL p50/p99 ms  chunk-gap p99  ok/err")
    for r in results:
        for run in r.get("runs", []):
            print(
                f"{r['topology']:<9} {run['concurrency']:>7} {run['output_tok_s']:>10.0f}  "
                f"{run['ttft_p50_ms']:>7.0f} /{run['ttft_p99_ms']:>7.0f}  "
                f"{run['itl_p50_ms']:>6.2f} /{run['itl_p99_ms']:>6.2f}"
                f"  {run['chunk_gap_p99_ms']:>9.1f}  {run['completed']}/{run['errors']}",
                flush=True,
            )
        if "error" in r:
            print(f"{r['topology']}: ERROR {r['error']}", flush=True)
    return 0 if all("error" not in r for r in results) else 1


def save(results: list[dict], args: argparse.Namespace) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
