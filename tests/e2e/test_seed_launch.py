"""Issue 16: the seed's manual launch, with its flags as written (``dynamo.`` → ``dynamo_lite.``).

NVIDIA Dynamo's "gpt-oss-120b disaggregated with TensorRT-LLM" guide starts, with etcd and NATS on their
default ports: ``clear_namespace``, ``frontend --router-mode round-robin --http-port 8000`` and the two
``python3 -m dynamo.trtllm`` workers. Here they run inside a network namespace of their own (its own
127.0.0.1:2379 / 4222 / 8000), the engine is the STAND-IN ``tensorrt_llm`` (tests/engines/trtllm/standin; not
TensorRT-LLM, which needs GPUs), and the model folder is SmolLM2's tokenizer and config. The seed's curl must
answer 200. A second frontend in another namespace, with no copy of the model folder (the folder is gone by
then), serves the same model from the files its workers published with the card.

Needs root (``ip netns``), etcd and nats-server; skipped where those are missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, Proc, spawn, wait_until
from tests.multihost.netns import Host, Network, namespaces_usable

pytestmark = pytest.mark.timeout(180)

STANDIN = ROOT / "tests" / "engines" / "trtllm" / "standin"
SERVED = "openai/gpt-oss-120b"
NO_PROXY = {"http_proxy": "", "https_proxy": "", "HTTP_PROXY": "", "HTTPS_PROXY": "", "grpc_proxy": "",
            "all_proxy": "", "ALL_PROXY": "", "no_proxy": "*", "NO_PROXY": "*"}  # fmt: skip
SEED_CURL_BODY = {
    "model": SERVED,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Explain the concept of disaggregated serving in LLM inference."},
    ],
    "stream": False,
    "max_tokens": 200,
}
POST = """import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=60) as r:
        print(json.dumps({"status": r.status, "body": json.loads(r.read())}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": e.read().decode(errors="replace")}))
"""


def _skip_reason() -> str | None:
    if not (shutil.which("etcd") and shutil.which("nats-server")):
        return "etcd and nats-server binaries are needed (apt-get install etcd-server nats-server)"
    return namespaces_usable()


def _post(host: Host, url: str, body: dict) -> dict:
    out = subprocess.run(host.cmd(sys.executable, "-c", POST, url, json.dumps(body)),
                         capture_output=True, text=True, timeout=90, env={**_env()})  # fmt: skip
    assert out.stdout.strip(), out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env(**extra: str) -> dict[str, str]:
    import os

    return {**os.environ, **NO_PROXY, **extra}


@pytest.fixture
def net() -> Iterator[Network]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    network = Network.create()
    try:
        yield network
    finally:
        network.close()


def _start(procs: list[Proc], tmp: Path, host: Host, name: str, *argv: str, env: dict | None = None) -> Proc:
    proc = spawn(name, host.cmd(*argv), tmp, {**NO_PROXY, **(env or {})})
    procs.append(proc)
    return proc


def _ready(proc: Proc, marker: str, timeout: float) -> None:
    def seen() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.log()[-3000:]}")
        return marker in proc.log()

    wait_until(seen, timeout, interval=0.2, what=f"{proc.name}: {marker}")


def test_the_seeds_manual_launch_serves_and_a_remote_frontend_needs_no_model_folder(
    net: Network, tmp_path: Path
) -> None:
    from dynamo_lite.model_files import resolve_model

    model = tmp_path / "model"
    shutil.copytree(resolve_model().folder, model, ignore=shutil.ignore_patterns("*.safetensors", ".*"))
    node, remote = net.add_host("node"), net.add_host("fe2")
    procs: list[Proc] = []
    py = sys.executable
    try:
        # etcd and NATS on their default ports, in the node's own namespace (reachable from the other host too)
        _start(procs, tmp_path, node, "etcd", "etcd", "--name", "n", "--data-dir", str(tmp_path / "etcd"),
               "--listen-client-urls", f"http://127.0.0.1:2379,http://{node.ip}:2379",
               "--advertise-client-urls", f"http://{node.ip}:2379",
               "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls",
               "http://127.0.0.1:2380", "--initial-cluster", "n=http://127.0.0.1:2380")  # fmt: skip
        _start(procs, tmp_path, node, "nats", "nats-server", "-a", "0.0.0.0", "-p", "4222")
        _ready(procs[0], "ready to serve client requests", 20)
        _ready(procs[1], "Server is ready", 20)

        # The seed's commands, flags as written. No --etcd-endpoints/--nats-url: the defaults find them.
        clear = subprocess.run(node.cmd(py, "-m", "dynamo_lite.clear_namespace", "--namespace", "dynamo"),
                               capture_output=True, text=True, timeout=60, cwd=ROOT, env=_env())  # fmt: skip
        assert clear.returncode == 0, clear.stderr
        frontend = _start(procs, tmp_path, node, "frontend", py, "-m", "dynamo_lite.frontend",
                          "--router-mode", "round-robin", "--http-port", "8000",
                          env={"DYNAMO_LITE_CACHE": str(tmp_path / "cache-fe1")})  # fmt: skip
        worker_env = {"PYTHONPATH": f"{STANDIN}:{ROOT}"}
        prefill = _start(procs, tmp_path, node, "prefill", "env", "CUDA_VISIBLE_DEVICES=0,1,2,3",
                         py, "-m", "dynamo_lite.trtllm", "--model-path", str(model),
                         "--served-model-name", SERVED, "--extra-engine-args", "engine_configs/gpt_oss/prefill.yaml",
                         "--disaggregation-mode", "prefill", "--disaggregation-strategy", "prefill_first",
                         "--max-num-tokens", "20000", "--max-batch-size", "32", "--free-gpu-memory-fraction", "0.9",
                         "--tensor-parallel-size", "4", "--expert-parallel-size", "4", env=worker_env)  # fmt: skip
        decode = _start(procs, tmp_path, node, "decode", "env", "CUDA_VISIBLE_DEVICES=4,5,6,7",
                        py, "-m", "dynamo_lite.trtllm", "--model-path", str(model),
                        "--served-model-name", SERVED, "--extra-engine-args", "engine_configs/gpt_oss/decode.yaml",
                        "--disaggregation-mode", "decode", "--disaggregation-strategy", "prefill_first",
                        "--max-num-tokens", "16384", "--max-batch-size", "128", "--free-gpu-memory-fraction", "0.9",
                        "--tensor-parallel-size", "4", "--expert-parallel-size", "4", env=worker_env)  # fmt: skip
        for worker in (prefill, decode):
            _ready(worker, "READY worker", 90)
        _ready(frontend, "READY frontend", 30)

        # The prefill's flags that its YAML overrides are named; --max-seq-len absent: the model's length.
        log = prefill.log()
        assert "--max-num-tokens 20000 is overridden by engine_configs/gpt_oss/prefill.yaml" in log
        assert "--free-gpu-memory-fraction 0.9 is overridden by engine_configs/gpt_oss/prefill.yaml" in log
        assert "max_seq_len=8192 [flag]" in log  # SmolLM2's context length, from its config.json

        shutil.rmtree(model)  # no frontend below has a model folder to read
        reply = _post(node, "http://localhost:8000/v1/chat/completions", SEED_CURL_BODY)  # the seed's curl
        assert reply["status"] == 200, reply
        assert reply["body"]["choices"][0]["message"]["content"]
        assert reply["body"]["usage"]["completion_tokens"] > 1

        remote_fe = _start(procs, tmp_path, remote, "frontend2", py, "-m", "dynamo_lite.frontend",
                           "--http-host", remote.ip, "--http-port", "8000",
                           "--etcd-endpoints", f"http://{node.ip}:2379", "--nats-url", f"nats://{node.ip}:4222",
                           env={"DYNAMO_LITE_CACHE": str(tmp_path / "cache-fe2")})  # fmt: skip
        _ready(remote_fe, "READY frontend", 30)
        deadline = time.monotonic() + 20
        while True:
            reply = _post(
                remote, f"http://{remote.ip}:8000/v1/chat/completions", {**SEED_CURL_BODY, "max_tokens": 20}
            )
            if reply["status"] == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert reply["status"] == 200, reply
        assert reply["body"]["choices"][0]["message"]["content"]
        assert any((tmp_path / "cache-fe2" / "card_files" / "blobs").iterdir())  # fetched from etcd
        assert "Traceback" not in prefill.log() + decode.log()
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            try:
                proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass


@pytest.mark.parametrize("module", ["dynamo_lite.frontend", "dynamo_lite.worker"])
def test_without_etcd_and_nats_it_exits_within_5s_with_one_line(net: Network, module: str) -> None:
    host = net.add_host("lonely")  # a namespace where nothing listens on 2379 or 4222
    started = time.monotonic()
    out = subprocess.run(host.cmd(sys.executable, "-m", module), capture_output=True, text=True,
                         timeout=30, cwd=ROOT, env=_env())  # fmt: skip
    took = time.monotonic() - started
    assert out.returncode != 0 and took < 5.0, (took, out.stderr)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert "http://127.0.0.1:2379" in lines[0] and "launch/services.sh start" in lines[0]
    assert "python -m dynamo_lite serve" in lines[0]
