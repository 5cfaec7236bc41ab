"""dynamo_lite vs NVIDIA Dynamo 1.6.1 (frontend + mocker), side by side on this machine, same client and load.

    python -m benchmarks.compare_dynamo                       # all five setups, 2 rounds each
    python -m benchmarks.compare_dynamo --setups agg,disagg --rounds 3 --profile auto
    python -m benchmarks.compare_dynamo --setups disagg --mode both    # also one token per event (per-token)

Dynamo is installed into its own venv (``~/.cache/dynamo_lite/dynamo-1.6.1-venv``, reused when present) from
PyPI without its unreachable ``aisimulate`` dependency, and gets a model folder made from our cached SmolLM2
files. Both systems run their mocker engine at zero simulated time
(dynamo_lite: ``--speedup-ratio 0``; Dynamo: ``--speedup-ratio 1e6``, see DYNAMO_SPEEDUP for why not its 0).

Per setup and round the two systems alternate (Dynamo, dynamo_lite, Dynamo, ...); each run starts its
servers fresh (and its own etcd + nats-server on free loopback ports where the setup uses them), measures
with ``benchmarks.load`` (streaming chat, ~200 prompt tokens, 64 output tokens, ``ignore_eos``, closed loop),
records every server process's CPU, and stops everything by PID. The table gives medians over rounds and the
dynamo_lite/Dynamo ratio as the median of the per-round ratios (paired runs share the box's load of the
moment). JSON and server logs go to the artifact dir; ``--profile`` adds a py-spy run of dynamo_lite's
frontend.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.load import Summary

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file, not only as ``python -m benchmarks.compare_dynamo``
    sys.path.insert(0, str(ROOT))

DYNAMO = "dynamo"
DYNAMO_LITE = "dynamo_lite"
SYSTEMS = (DYNAMO, DYNAMO_LITE)
DYNAMO_VERSION = "1.6.1"
CACHE_DIR = Path.home() / ".cache" / "dynamo_lite"
# ai-dynamo 1.6.1's requirements minus aisimulate (planner only; it downloads from an unreachable host).
DYNAMO_DEPS = (
    "aiohttp>=3.14.3,<4",
    "certifi",
    "kubernetes>=32.0.1,<33",
    "msgspec>=0.19",
    "prometheus-client>=0.23.1,<1",
    "pyzmq>=26",
    "redis>=6.2,<9",
    "tqdm",
    "transformers>=4.56",
    "typing-extensions",
    "zstandard>=0.23,<1",
    "pydantic>=2.10.6,<=2.13.5",
    "uvloop>=0.21",
)
LOOPBACK = "127.0.0.1"
# Dynamo's mocker at zero engine time. Its help says --speedup-ratio 0 means "infinite speedup (no simulation
# delays)", yet measured here 0 gives ~88 req/s with an ~8 ms inter-token gap and idle CPUs, while 1e4 and 1e6
# give ~460-480 req/s CPU-bound: a huge finite ratio is the fastest it goes (simulated steps become µs).
DYNAMO_SPEEDUP = 1e6


# ---- what is compared ----
@dataclass(frozen=True, slots=True)
class Setup:
    """One deployment shape, run the same way on both systems."""

    name: str
    title: str
    topology: str  # "agg" | "disagg"
    services: bool  # etcd + NATS
    concurrency: int | None = None  # None: the run's --concurrency
    per_token: bool = False  # dynamo_lite's workers send one token per message (Dynamo's mocker always does)


MODES = ("default", "per-token", "both")
PER_TOKEN_SUFFIX = "+per_token"


def setups_for_mode(setups: Sequence[Setup], mode: str) -> list[Setup]:
    """``setups`` in the default mode, the per-token mode (named ``<setup>+per_token``) or both, interleaved.
    Per-token: dynamo_lite's workers run with ``--stream-per-token`` (in the embedded setups, which have no
    such flag, one token per engine step is what they send already: the events per request column shows it)."""
    per_token = [
        dataclasses.replace(
            s, name=s.name + PER_TOKEN_SUFFIX, title=s.title + ", one token per event", per_token=True
        )
        for s in setups
    ]
    if mode == "default":
        return list(setups)
    if mode == "per-token":
        return per_token
    return [x for pair in zip(setups, per_token, strict=True) for x in pair]


SETUPS: dict[str, Setup] = {
    s.name: s
    for s in (
        Setup("agg", "aggregated, no etcd/NATS", "agg", services=False),
        Setup("agg_etcd_nats", "aggregated, etcd + NATS", "agg", services=True),
        Setup("disagg", "disaggregated 1 prefill + 1 decode, etcd + NATS", "disagg", services=True),
        Setup("agg_c1", "aggregated, 1 concurrent stream", "agg", services=False, concurrency=1),
        Setup(
            "disagg_c1",
            "disaggregated 1 prefill + 1 decode, etcd + NATS, 1 concurrent stream",
            "disagg",
            services=True,
            concurrency=1,
        ),
    )
}


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds to wait for things outside the measurement itself."""

    ready: float = 120.0  # servers up, model listed, a probe request answered
    stop: float = 15.0  # SIGTERM → exit, before SIGKILL
    service_ready: float = 20.0  # etcd / nats-server
    probe: float = 20.0  # one small request
    install: float = 900.0  # each pip step of the Dynamo venv


@dataclass(slots=True)
class Ports:
    http: int
    etcd: int = 0
    etcd_peer: int = 0
    nats: int = 0
    bootstrap: int = 0

    @property
    def etcd_endpoint(self) -> str:
        return f"{LOOPBACK}:{self.etcd}"

    @property
    def nats_url(self) -> str:
        return f"nats://{LOOPBACK}:{self.nats}"


@dataclass(slots=True)
class ProcSpec:
    """A server process to start: ``role`` names it in logs, CPU columns and the JSON."""

    role: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # on top of os.environ
    drop_env: tuple[str, ...] = ()


def free_port() -> int:
    """A free TCP port on loopback (the kernel's choice; a tiny race until the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def allocate_ports(setup: Setup, pick: Callable[[], int] = free_port) -> Ports:
    ports = Ports(http=pick())
    if setup.services:
        ports.etcd, ports.etcd_peer, ports.nats = pick(), pick(), pick()
    if setup.topology == "disagg":
        ports.bootstrap = pick()
    return ports


# ---- command lines ----
def service_commands(ports: Ports, data_dir: Path) -> list[ProcSpec]:
    """etcd and nats-server on loopback (all four etcd URL flags, or it binds/advertises the host address)."""
    client, peer = f"http://{LOOPBACK}:{ports.etcd}", f"http://{LOOPBACK}:{ports.etcd_peer}"
    urls = (
        f"--listen-client-urls {client} --advertise-client-urls {client} "
        f"--listen-peer-urls {peer} --initial-advertise-peer-urls {peer} --initial-cluster bench={peer}"
    )
    etcd = ["etcd", "--name", "bench", "--data-dir", str(data_dir / "etcd-data"), *urls.split()]
    nats = ["nats-server", "-a", LOOPBACK, "-p", str(ports.nats)]
    return [ProcSpec("etcd", etcd), ProcSpec("nats", nats)]


def dynamo_env(setup: Setup, ports: Ports, run_dir: Path, log_level: str) -> dict[str, str]:
    """Dynamo's settings by environment: loopback wherever it lets us choose; HOME redirected, since Dynamo
    caches model cards under ``$HOME/.cache/dynamo``."""
    env = {
        "HOME": str(run_dir / "home"),
        "HF_HUB_OFFLINE": "1",
        "DYN_TCP_RPC_HOST": LOOPBACK,
        "DYN_TCP_RESPONSE_STREAM_HOST": LOOPBACK,
        "DYN_EVENT_PLANE_HOST": LOOPBACK,
        "DYN_SYSTEM_HOST": LOOPBACK,
        "DYN_LOG": log_level,
    }
    if setup.services:
        env["ETCD_ENDPOINTS"] = f"http://{ports.etcd_endpoint}"
        env["NATS_SERVER"] = ports.nats_url
    else:
        env["DYN_FILE_KV"] = str(run_dir / "dynkv")
    return env


def dynamo_commands(
    setup: Setup,
    python: str,
    model_dir: Path,
    model_name: str,
    ports: Ports,
    run_dir: Path,
    speedup_ratio: float = DYNAMO_SPEEDUP,
    request_plane: str = "tcp",
    log_level: str = "warn",
) -> list[ProcSpec]:
    """Dynamo's frontend + mocker(s): file discovery + zmq events without services, else etcd + NATS."""
    if setup.services:
        planes = f"--discovery-backend etcd --request-plane {request_plane} --event-plane nats".split()
    else:
        planes = "--discovery-backend file --request-plane tcp --event-plane zmq".split()
    env = dynamo_env(setup, ports, run_dir, log_level)
    drop = ("PYTHONPATH", "VIRTUAL_ENV")
    http = f"--http-host {LOOPBACK} --http-port {ports.http} --router-mode round-robin".split()
    frontend = [python, "-m", "dynamo.frontend", *http, *planes]
    model = ["--model-path", str(model_dir), "--model-name", model_name]
    mocker = [python, "-m", "dynamo.mocker", *model, "--speedup-ratio", f"{speedup_ratio:g}", *planes]
    specs = [ProcSpec("frontend", frontend, env, drop)]
    if setup.topology == "agg":
        return [*specs, ProcSpec("worker", mocker, env, drop)]
    prefill = f"--kv-transfer-bandwidth 0 --disaggregation-mode prefill --bootstrap-ports {ports.bootstrap}"
    decode = "--kv-transfer-bandwidth 0 --disaggregation-mode decode"
    specs.append(ProcSpec("prefill", [*mocker, *prefill.split()], env, drop))
    specs.append(ProcSpec("decode", [*mocker, *decode.split()], env, drop))
    return specs


def dynamo_lite_commands(
    setup: Setup,
    python: str,
    ports: Ports,
    namespace: str,
    log_level: str = "WARNING",
    stream_interval_ms: float | None = None,
) -> list[ProcSpec]:
    """dynamo_lite: the embedded mode without services; frontend + worker processes over etcd + NATS.
    ``stream_interval_ms`` sets the workers' token coalescing window (None: their default); a per-token setup
    gives them ``--stream-per-token``."""
    env = {"HF_HUB_OFFLINE": "1"}
    engine = "--engine mocker --speedup-ratio 0".split()
    http = f"--http-host {LOOPBACK} --http-port {ports.http}".split()
    if not setup.services:
        serve = [python, "-m", "dynamo_lite", "serve", *engine, "--topology", setup.topology, *http]
        return [ProcSpec("frontend", [*serve, "--log-level", log_level], env)]
    runtime = [
        "--namespace",
        namespace,
        "--etcd-endpoints",
        ports.etcd_endpoint,
        "--nats-url",
        ports.nats_url,
    ]
    runtime += ["--log-level", log_level]
    frontend = [python, "-m", "dynamo_lite.frontend", *http, "--router-mode", "round-robin", *runtime]
    specs = [ProcSpec("frontend", frontend, env)]
    for mode in ["agg"] if setup.topology == "agg" else ["prefill", "decode"]:
        argv = [python, "-m", "dynamo_lite.worker", "--mode", mode, *engine, *runtime]
        if stream_interval_ms is not None:
            argv += ["--stream-interval-ms", f"{stream_interval_ms:g}"]
        if setup.per_token:
            argv.append("--stream-per-token")
        specs.append(ProcSpec("worker" if mode == "agg" else mode, argv, env))
    return specs


def health_ready(system: str, setup: Setup, health: dict[str, Any]) -> bool:
    """Whether ``/health`` shows every worker role the setup needs (so no request runs on a partial stack).
    dynamo_lite's embedded mode has its workers in-process: the model listing and the probe request decide."""
    if system == DYNAMO:
        components = {i.get("component") for i in health.get("instances", []) if isinstance(i, dict)}
        return {"prefill", "backend"} <= components if setup.topology == "disagg" else "backend" in components
    if not setup.services:
        return True
    instances = health.get("instances", {})
    roles = ("prefill", "decode") if setup.topology == "disagg" else ("agg",)
    return isinstance(instances, dict) and all(instances.get(r) for r in roles)


# ---- Dynamo's venv and model folder ----
def ensure_dynamo_venv(venv: Path, version: str = DYNAMO_VERSION, timeout_s: float = 900.0) -> Path:
    """Install ai-dynamo (+ runtime) ``version`` into ``venv`` once; later calls return its python at once."""
    python = venv / "bin" / "python"
    marker = venv / ".dynamo_lite_ready"
    if python.exists() and marker.exists() and marker.read_text().strip() == version:
        return python
    print(f"installing ai-dynamo=={version} into {venv} (a minute or two) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=timeout_s)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = venv / "wheels"
    subprocess.run(
        [
            *pip,
            "download",
            "--no-deps",
            "-d",
            str(wheels),
            f"ai-dynamo=={version}",
            f"ai-dynamo-runtime=={version}",
        ],
        check=True,
        timeout=timeout_s,
    )
    found = sorted(str(w) for w in wheels.glob(f"ai_dynamo*-{version}-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", *found], check=True, timeout=timeout_s)
    subprocess.run([*pip, "install", *DYNAMO_DEPS], check=True, timeout=timeout_s)
    subprocess.run(
        [str(python), "-c", "import dynamo.frontend, dynamo.mocker"], check=True, timeout=timeout_s
    )
    marker.write_text(version)
    return python


def prepare_dynamo_model_folder(src: Path, dst: Path) -> Path:
    """Dynamo's model folder made from an HF-style one (``src`` is untouched): tokenizer.json,
    tokenizer_config.json with the chat template inline, config.json with ``architectures`` (Dynamo's model
    card parser requires it), generation_config.json with the eos id."""
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    if not config.get("architectures"):
        model_type = str(config.get("model_type", "llama"))
        config["architectures"] = [f"{model_type.capitalize()}ForCausalLM"]
    gen_path = src / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    for key in ("bos_token_id", "eos_token_id"):
        if generation.get(key) is None and config.get(key) is not None:
            generation[key] = config[key]
    generation.setdefault("eos_token_id", 2)
    tok_cfg_path = src / "tokenizer_config.json"
    tok_config = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}
    jinja = src / "chat_template.jinja"
    if not tok_config.get("chat_template") and jinja.exists():
        tok_config["chat_template"] = jinja.read_text()
    if not tok_config.get("chat_template"):
        raise ValueError(f"{src} has no chat template (tokenizer_config.json or chat_template.jinja)")
    _write_if_changed(dst / "config.json", json.dumps(config, indent=2))
    _write_if_changed(dst / "generation_config.json", json.dumps(generation, indent=2))
    _write_if_changed(dst / "tokenizer_config.json", json.dumps(tok_config, indent=2))
    if (
        not (dst / "tokenizer.json").exists()
        or (dst / "tokenizer.json").read_bytes() != (src / "tokenizer.json").read_bytes()
    ):
        shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    return dst


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


# ---- processes ----
class Stack:
    """Server processes started by this script, each in its own session; stopped by PID, newest first."""

    def __init__(self, log_dir: Path, timeouts: Timeouts) -> None:
        self.log_dir = log_dir
        self.timeouts = timeouts
        self.procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, spec: ProcSpec, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k not in spec.drop_env}
        env.update(spec.env)
        log = (self.log_dir / f"{spec.role}.log").open("wb")
        proc = subprocess.Popen(
            spec.argv,
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append((spec.role, proc, log))
        return proc

    @property
    def pids(self) -> dict[str, int]:
        return {role: p.pid for role, p, _ in self.procs}

    def check_alive(self) -> None:
        for role, p, _ in self.procs:
            if p.poll() is not None:
                raise RuntimeError(
                    f"{role} (pid {p.pid}) exited with {p.returncode}; see {self.log_dir}/{role}.log"
                )

    def stop(self) -> None:
        for _role, p, log in reversed(self.procs):
            if p.poll() is None:
                _signal_group(p.pid, signal.SIGTERM)
                try:
                    p.wait(self.timeouts.stop)
                except subprocess.TimeoutExpired:
                    _signal_group(p.pid, signal.SIGKILL)
                    p.wait(self.timeouts.stop)
            log.close()
        self.procs.clear()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the session this script gave ``pid`` (its own process group), so helpers it spawned go too."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _http_get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback URLs we built
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _probe(url: str, model: str, timeout: float) -> bool:
    """One small streamed chat request must complete with [DONE]."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "stream": True,
            "ignore_eos": True,
        }
    ).encode()
    req = urllib.request.Request(
        f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310
            return r.status == 200 and b"[DONE]" in r.read()
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(
    stack: Stack, url: str, model: str, ready: Callable[[dict[str, Any]], bool], t: Timeouts
) -> float:
    """Wait until the model is listed, /health shows the roles and a probe request succeeds; seconds taken."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < t.ready:
        stack.check_alive()
        try:
            status, body = _http_get(f"{url}/v1/models", 2.0)
            listed = status == 200 and any(m.get("id") == model for m in json.loads(body).get("data", []))
            health = json.loads(_http_get(f"{url}/health", 2.0)[1] or b"{}") if listed else {}
            if listed and ready(health) and _probe(url, model, t.probe):
                return time.monotonic() - t0
        except (OSError, ValueError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {t.ready:.0f} s; logs in {stack.log_dir}")


def wait_services(ports: Ports, timeout_s: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            status, body = _http_get(f"http://{ports.etcd_endpoint}/health", 1.0)
            if status == 200 and b"true" in body:
                with socket.create_connection((LOOPBACK, ports.nats), timeout=1.0):
                    return
        except (OSError, http.client.HTTPException):  # not up yet (or another server on the port, briefly)
            pass
        time.sleep(0.1)
    raise TimeoutError("etcd / nats-server did not come up")


# ---- one measured run ----
# Which way is better, for the "where dynamo_lite loses" line: +1 higher is better, -1 lower is better.
BETTER = {
    "req_s": 1,
    "tok_s": 1,
    "ttft_p50_ms": -1,
    "ttft_p99_ms": -1,
    "frontend_cpu_us_per_req": -1,
    "events_per_fe_core_s": 1,
}
PER_TOKEN_ONLY = {"events_per_fe_core_s"}
FRONTEND = "frontend"  # the role; its child processes (a multi-process frontend) are "frontend/<pid>"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_bytes()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def run_metrics(summary: Summary, roles: dict[str, int]) -> dict[str, float]:
    """The comparison's numbers from a ``benchmarks.load`` Summary; ``roles`` maps role → server PID."""
    m = summary.metrics
    completed = max(summary.completed, 1)

    def cpu(pid: int) -> float:
        usage = summary.server_cpu.get(pid)
        return usage.percent if usage is not None else float("nan")

    def cpu_s(pid: int) -> float:
        usage = summary.server_cpu.get(pid)
        return usage.seconds if usage is not None else float("nan")

    fe_pids = [pid for role, pid in roles.items() if role == FRONTEND or role.startswith(FRONTEND + "/")]
    fe_cpu_s = sum(cpu_s(p) for p in fe_pids)
    events = m["events_per_request"].mean if "events_per_request" in m else float("nan")
    out = {
        "req_s": summary.request_throughput,
        "tok_s": summary.output_token_throughput,
        "ttft_p50_ms": m["time_to_first_token_ms"].p50 if "time_to_first_token_ms" in m else float("nan"),
        "ttft_p99_ms": m["time_to_first_token_ms"].p99 if "time_to_first_token_ms" in m else float("nan"),
        "itl_p50_ms": m["inter_token_latency_ms"].p50 if "inter_token_latency_ms" in m else float("nan"),
        "tokens_per_chunk": m["tokens_per_chunk"].mean if "tokens_per_chunk" in m else float("nan"),
        "frontend_cpu_pct": sum(cpu(p) for p in fe_pids),
        "frontend_cpu_us_per_req": 1e6 * fe_cpu_s / completed,
        "events_per_req": events,
        # SSE events the clients got per CPU-second of the frontend's processes (/proc utime + stime).
        "events_per_fe_core_s": events * summary.completed / fe_cpu_s if fe_cpu_s > 0 else float("nan"),
        "servers_cpu_pct": sum(cpu(p) for p in roles.values()),
        "servers_cpu_us_per_req": 1e6 * sum(cpu_s(p) for p in roles.values()) / completed,
        "client_cpu_pct": summary.client_cpu.percent if summary.client_cpu else float("nan"),
        "errors": float(summary.errors),
    }
    for role, pid in roles.items():
        out[f"cpu_pct.{role}"] = cpu(pid)
    return out


@dataclass(slots=True)
class Workload:
    concurrency: int = 64
    request_count: int = 2000
    warmup: int = 100
    c1_request_count: int = 1000
    c1_warmup: int = 20
    max_seconds: float | None = 15.0  # measured window cap, so a slow run stays bounded in time
    input_tokens: int = 200
    output_tokens: int = 64

    def for_setup(self, setup: Setup) -> tuple[int, int, int]:
        """(concurrency, measured requests, warmup requests)."""
        if setup.concurrency == 1:
            return 1, self.c1_request_count, self.c1_warmup
        return setup.concurrency or self.concurrency, self.request_count, self.warmup


@dataclass(slots=True)
class Context:
    """Everything a run needs that does not change between runs."""

    artifact_dir: Path
    workload: Workload
    model_name: str
    tokenizer: str
    dynamo_python: str | None
    dynamo_model_dir: Path | None
    dynamo_speedup: float = DYNAMO_SPEEDUP
    dynamo_request_plane: str = "tcp"
    dynamo_log: str = "warn"
    lite_log: str = "WARNING"
    lite_stream_interval_ms: float | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)


def build_specs(ctx: Context, system: str, setup: Setup, ports: Ports, run_dir: Path) -> list[ProcSpec]:
    if system == DYNAMO:
        assert ctx.dynamo_python and ctx.dynamo_model_dir
        return dynamo_commands(
            setup,
            ctx.dynamo_python,
            ctx.dynamo_model_dir,
            ctx.model_name,
            ports,
            run_dir,
            ctx.dynamo_speedup,
            ctx.dynamo_request_plane,
            ctx.dynamo_log,
        )
    namespace = f"bench{ports.http}"
    return dynamo_lite_commands(
        setup, sys.executable, ports, namespace, ctx.lite_log, ctx.lite_stream_interval_ms
    )


def run_once(
    ctx: Context,
    system: str,
    setup: Setup,
    label: str,
    request_count: int | None = None,
    during: Callable[[dict[str, int]], Callable[[], None]] | None = None,
) -> dict[str, Any]:
    """Start ``system`` fresh for ``setup``, measure one load run, stop everything. ``during(pids)`` starts
    something alongside the load (a profiler) and returns a function that waits for it."""
    from benchmarks.load import BenchmarkConfig, run_benchmark_sync

    run_dir = ctx.artifact_dir / setup.name / label
    run_dir.mkdir(parents=True, exist_ok=True)
    ports = allocate_ports(setup)
    stack = Stack(run_dir, ctx.timeouts)
    load_before = os.getloadavg()
    try:
        if setup.services:
            for spec in service_commands(ports, run_dir):
                stack.start(spec)
            wait_services(ports, ctx.timeouts.service_ready)
        specs = build_specs(ctx, system, setup, ports, run_dir)
        for spec in specs:
            stack.start(spec)
        url = f"http://{LOOPBACK}:{ports.http}"
        ready_s = wait_ready(
            stack, url, ctx.model_name, lambda h: health_ready(system, setup, h), ctx.timeouts
        )
        roles = dict(stack.pids)
        for pid in descendants(roles[FRONTEND]):  # a frontend of several processes counts as one
            roles[f"{FRONTEND}/{pid}"] = pid
        concurrency, count, warmup = ctx.workload.for_setup(setup)
        cfg = BenchmarkConfig(
            url=url,
            model=ctx.model_name,
            streaming=True,
            concurrency=concurrency,
            request_count=request_count or count,
            warmup_request_count=warmup,
            measurement_seconds=ctx.workload.max_seconds,
            input_tokens_mean=ctx.workload.input_tokens,
            output_tokens_mean=ctx.workload.output_tokens,
            extra_inputs={"ignore_eos": True},
            tokenizer=ctx.tokenizer,
            server_pids=list(roles.values()),
            progress=False,
        )
        finish = during(stack.pids) if during else None
        try:
            result = run_benchmark_sync(cfg)
        finally:
            if finish:
                finish()
        stack.check_alive()
        metrics = run_metrics(result.summary, roles)
        summary = result.summary
        return {
            "system": system,
            "setup": setup.name,
            "label": label,
            "ready_s": ready_s,
            "pids": roles,
            "completed": summary.completed,
            "errors": summary.errors,
            "errors_by_kind": summary.errors_by_kind,
            "error_samples": summary.error_samples,
            "duration_s": summary.duration_s,
            "concurrency": concurrency,
            "request_count": cfg.request_count,
            "warmup": warmup,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "metrics": metrics,
            "argv": {s.role: s.argv for s in specs},
        }
    finally:
        stack.stop()


# ---- statistics and the table ----
def median(values: Sequence[float]) -> float:
    clean = [v for v in values if v == v]  # drop NaN
    return statistics.median(clean) if clean else float("nan")


def paired_ratio(lite: Sequence[float], dynamo: Sequence[float]) -> float:
    """Median over rounds of dynamo_lite/Dynamo, each round's runs paired (they ran back to back)."""
    ratios = [a / b for a, b in zip(lite, dynamo, strict=False) if b and a == a and b == b]
    return median(ratios)


def summarize_setup(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians per system and paired ratios for one setup's runs."""
    by_system: dict[str, list[dict[str, float]]] = {s: [] for s in SYSTEMS}
    for r in runs:
        by_system[r["system"]].append(r["metrics"])
    keys = sorted({k for ms in by_system.values() for m in ms for k in m})
    medians = {
        s: {k: median([m.get(k, float("nan")) for m in ms]) for k in keys} for s, ms in by_system.items()
    }
    ratios = {
        k: paired_ratio(
            [m.get(k, float("nan")) for m in by_system[DYNAMO_LITE]],
            [m.get(k, float("nan")) for m in by_system[DYNAMO]],
        )
        for k in keys
    }
    return {"median": medians, "ratio": ratios, "rounds": {s: len(ms) for s, ms in by_system.items()}}


def losses(summary: dict[str, Any], tolerance: float = 0.05, per_token: bool = True) -> dict[str, float]:
    """Metrics where dynamo_lite is worse than Dynamo by more than ``tolerance`` (ratio, as in the table).
    Events per frontend core-second compare like with like only per token (``per_token``): in the default mode
    dynamo_lite's events carry several tokens each."""
    out = {}
    for key, sign in BETTER.items():
        if key in PER_TOKEN_ONLY and not per_token:
            continue
        r = summary["ratio"].get(key, float("nan"))
        if r == r and ((sign > 0 and r < 1 - tolerance) or (sign < 0 and r > 1 + tolerance)):
            out[key] = r
    return out


_COLUMNS = (
    ("req/s", "req_s", "{:.0f}"),
    ("out tok/s", "tok_s", "{:.0f}"),
    ("TTFT p50 ms", "ttft_p50_ms", "{:.1f}"),
    ("TTFT p99 ms", "ttft_p99_ms", "{:.1f}"),
    ("tok/chunk", "tokens_per_chunk", "{:.2f}"),
    ("events/req", "events_per_req", "{:.1f}"),
    ("events/FE core-s", "events_per_fe_core_s", "{:.0f}"),
    ("FE CPU %", "frontend_cpu_pct", "{:.0f}"),
    ("FE CPU µs/req", "frontend_cpu_us_per_req", "{:.0f}"),
    ("all servers µs/req", "servers_cpu_us_per_req", "{:.0f}"),
)


def format_table(setups: Sequence[Setup], summaries: dict[str, dict[str, Any]]) -> str:
    """Markdown: per setup a Dynamo row, a dynamo_lite row (medians of rounds) and the paired-ratio row."""
    head = "| setup | system | " + " | ".join(c[0] for c in _COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(_COLUMNS) + 2)]
    for setup in setups:
        s = summaries.get(setup.name)
        if not s:
            continue
        n = s["rounds"]
        for system, name in ((DYNAMO, f"Dynamo {DYNAMO_VERSION}"), (DYNAMO_LITE, "dynamo_lite")):
            cells = [fmt.format(s["median"][system].get(key, float("nan"))) for _, key, fmt in _COLUMNS]
            lines.append(f"| {setup.title} | {name} (n={n[system]}) | " + " | ".join(cells) + " |")
        ratio_cells = [f"{s['ratio'].get(key, float('nan')):.2f}×" for _, key, _ in _COLUMNS]
        lines.append(f"| {setup.title} | **dynamo_lite / Dynamo** | " + " | ".join(ratio_cells) + " |")
    return "\n".join(lines)


# ---- py-spy ----
def top_frames(raw: str, n: int = 15) -> dict[str, Any]:
    """py-spy ``-f raw`` (collapsed stacks, ``f1;f2;...;leaf COUNT``) → top ``n`` functions by self and by
    inclusive samples, as (frame, samples, % of all samples). Line numbers are dropped: a function's lines add
    up.
    """
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = [_strip_line(f) for f in stack.split(";")]
        self_counts[frames[-1]] += k
        for f in set(frames):
            incl_counts[f] += k

    def top(c: Counter[str]) -> list[tuple[str, int, float]]:
        return [(f, k, 100.0 * k / total) for f, k in c.most_common(n)] if total else []

    return {"self": top(self_counts), "inclusive": top(incl_counts), "total_samples": total}


def _strip_line(frame: str) -> str:
    """``send (asyncio/selector_events.py:1234)`` → ``send (asyncio/selector_events.py)``."""
    head, sep, tail = frame.rpartition(":")
    if sep and tail.endswith(")") and tail[:-1].isdigit():
        return head + ")"
    return frame


def pyspy_during(
    out: Path, role: str, delay_s: float, duration_s: int, rate: int
) -> Callable[[dict[str, int]], Callable[[], None]]:
    """A ``during`` hook for ``run_once``: py-spy records ``role``'s process, ``delay_s`` into the load."""

    def start(pids: dict[str, int]) -> Callable[[], None]:
        argv = [
            "py-spy",
            "record",
            "-p",
            str(pids[role]),
            "-f",
            "raw",
            "-o",
            str(out),
            "-d",
            str(duration_s),
            "-r",
            str(rate),
            "--nonblocking",
        ]
        holder: dict[str, subprocess.Popen[bytes]] = {}

        def launch() -> None:
            holder["p"] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        timer = threading.Timer(delay_s, launch)
        timer.start()

        def finish() -> None:
            timer.join()
            p = holder.get("p")
            if p is not None:
                try:
                    _, err = p.communicate(timeout=duration_s + 30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    _, err = p.communicate()
                if p.returncode != 0:
                    print(
                        f"py-spy failed ({p.returncode}): {err.decode(errors='replace')[-500:]}", flush=True
                    )

        return finish

    return start


# ---- the whole comparison ----
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare_dynamo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of: {', '.join(SETUPS)}")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="default",
        help="default: each system as it ships; per-token: dynamo_lite's workers send one token per message "
        "(--stream-per-token), as Dynamo's mocker does (setups named <setup>+per_token); both: each setup twice",
    )
    p.add_argument("--rounds", type=int, default=2, help="runs per system and setup, alternating the systems")
    p.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma-separated subset of: dynamo, dynamo_lite"
    )
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--request-count", type=int, default=2000)
    p.add_argument("--warmup-request-count", type=int, default=100)
    p.add_argument("--c1-request-count", type=int, default=1000, help="measured requests of the c=1 setups")
    p.add_argument(
        "--max-seconds", type=float, default=15.0, help="stop a run's measurement after this long (0: no cap)"
    )
    p.add_argument("--input-tokens", type=int, default=200)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--artifact-dir", default="", help="default: artifacts/compare_dynamo-<timestamp>")
    p.add_argument("--dynamo-venv", default=str(CACHE_DIR / f"dynamo-{DYNAMO_VERSION}-venv"))
    p.add_argument(
        "--dynamo-speedup-ratio",
        type=float,
        default=DYNAMO_SPEEDUP,
        help="Dynamo's mocker divides simulated time by this (its 0, 'infinite', is slower here: see README)",
    )
    p.add_argument(
        "--dynamo-request-plane",
        choices=("tcp", "nats"),
        default="tcp",
        help="Dynamo's request plane in the etcd + NATS setups (its default: tcp)",
    )
    p.add_argument("--dynamo-log", default="warn", help="DYN_LOG for Dynamo (info logs every request)")
    p.add_argument("--lite-log", default="WARNING", help="--log-level for dynamo_lite")
    p.add_argument(
        "--lite-stream-interval-ms",
        type=float,
        default=None,
        help="dynamo_lite workers' --stream-interval-ms in the etcd + NATS setups (0: one message per step)",
    )
    p.add_argument(
        "--profile",
        default="",
        help="setups (comma-separated) or 'auto' (where dynamo_lite loses): "
        "one extra dynamo_lite run each with py-spy on its frontend",
    )
    p.add_argument("--profile-seconds", type=int, default=8)
    p.add_argument("--profile-rate", type=int, default=200)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    setups = setups_for_mode([SETUPS[name] for name in args.setups.split(",") if name], args.mode)
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    artifact_dir = Path(args.artifact_dir or ROOT / "artifacts" / f"compare_dynamo-{stamp}").resolve()
    artifact_dir.mkdir(parents=True, exist_ok=True)

    from dynamo_lite.model_files import resolve_model

    model = resolve_model()
    dynamo_python = dynamo_model = None
    if DYNAMO in systems:
        dynamo_python = str(ensure_dynamo_venv(Path(args.dynamo_venv)))
        dynamo_model = prepare_dynamo_model_folder(model.folder, CACHE_DIR / "dynamo-model-smollm2")
    ctx = Context(
        artifact_dir=artifact_dir,
        workload=Workload(
            args.concurrency,
            args.request_count,
            args.warmup_request_count,
            args.c1_request_count,
            max_seconds=args.max_seconds or None,
            input_tokens=args.input_tokens,
            output_tokens=args.output_tokens,
        ),
        model_name=model.default_served_name,
        tokenizer=str(model.folder),
        dynamo_python=dynamo_python,
        dynamo_model_dir=dynamo_model,
        dynamo_speedup=args.dynamo_speedup_ratio,
        dynamo_request_plane=args.dynamo_request_plane,
        dynamo_log=args.dynamo_log,
        lite_log=args.lite_log,
        lite_stream_interval_ms=args.lite_stream_interval_ms,
    )
    report: dict[str, Any] = {
        "config": {**vars(args), "workload": dataclasses.asdict(ctx.workload)},
        "cpus": os.cpu_count(),
        "runs": [],
        "summary": {},
        "profiles": {},
    }
    json_path = artifact_dir / "compare_dynamo.json"
    t_start = time.monotonic()
    for setup in setups:
        runs = []
        for rnd in range(1, args.rounds + 1):
            for system in systems:
                print(
                    f"[{time.monotonic() - t_start:6.0f} s] {setup.name} round {rnd}: {system} ...",
                    flush=True,
                )
                run = run_once(ctx, system, setup, f"{system}-r{rnd}")
                m = run["metrics"]
                print(
                    f"    {m['req_s']:.0f} req/s, {m['tok_s']:.0f} tok/s, TTFT p50 {m['ttft_p50_ms']:.1f} ms "
                    f"p99 {m['ttft_p99_ms']:.1f} ms, frontend {m['frontend_cpu_pct']:.0f}% CPU, "
                    f"errors {run['errors']}, load avg {run['loadavg_before'][0]:.1f}",
                    flush=True,
                )
                runs.append(run)
                report["runs"].append(run)
                json_path.write_text(json.dumps(report, indent=1, default=str))
        if set(systems) == set(SYSTEMS):
            report["summary"][setup.name] = summarize_setup(runs)
            report["summary"][setup.name]["losses"] = losses(
                report["summary"][setup.name], per_token=setup.per_token
            )
    profile = set(args.profile.split(",")) if args.profile and args.profile != "auto" else set()
    if args.profile == "auto":
        profile = {name for name, s in report["summary"].items() if s["losses"]}
    for setup in setups:
        if setup.name in profile:
            report["profiles"][setup.name] = profile_lite(ctx, setup, report, args)
            json_path.write_text(json.dumps(report, indent=1, default=str))
    report["elapsed_s"] = time.monotonic() - t_start
    json_path.write_text(json.dumps(report, indent=1, default=str))
    print_report(setups, report, json_path)
    return 0


def profile_lite(
    ctx: Context, setup: Setup, report: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """An extra (unmeasured) dynamo_lite run of ``setup`` with py-spy on its frontend; its top frames."""
    past = [
        r["metrics"]["req_s"]
        for r in report["runs"]
        if r["setup"] == setup.name and r["system"] == DYNAMO_LITE
    ]
    rate = median(past) if past else 100.0
    delay = 3.0  # past prompt building and the warmup
    count = max(ctx.workload.for_setup(setup)[1], int(rate * (delay + args.profile_seconds + 4)))
    out = ctx.artifact_dir / setup.name / "dynamo_lite-profile.raw"
    print(f"profiling dynamo_lite's frontend in {setup.name} ({count} requests) ...", flush=True)
    run = run_once(
        ctx,
        DYNAMO_LITE,
        setup,
        "dynamo_lite-profile",
        request_count=count,
        during=pyspy_during(out, "frontend", delay, args.profile_seconds, args.profile_rate),
    )
    frames = top_frames(out.read_text()) if out.exists() else {}
    return {"raw": str(out), "run_metrics": run["metrics"], "top": frames}


def print_report(setups: Sequence[Setup], report: dict[str, Any], json_path: Path) -> None:
    print()
    print(format_table(setups, report["summary"]))
    print(
        "\nratio = median over rounds of dynamo_lite/Dynamo (paired runs); FE = frontend process "
        "(dynamo_lite's "
        "embedded mode: the one process holding frontend + worker); all servers = every server process, "
        "etcd and nats-server included"
    )
    for name, s in report["summary"].items():
        if s["losses"]:
            lost = ", ".join(f"{k} {v:.2f}×" for k, v in s["losses"].items())
            print(f"dynamo_lite loses in {name}: {lost}")
    for name, p in report["profiles"].items():
        top = p.get("top") or {}
        print(
            f"\npy-spy, dynamo_lite frontend, {name} ({top.get('total_samples', 0)} samples): top self frames"
        )
        for frame, k, pct in top.get("self", [])[:12]:
            print(f"  {pct:5.1f}%  {k:6d}  {frame}")
    print(f"\nJSON and logs: {json_path.parent} ({report['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
