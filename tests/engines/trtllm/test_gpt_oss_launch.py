"""``launch/gpt_oss_disagg.sh``: syntax, the exact commands (dry run), and that it stops what it started.

The non-dry runs use a fake ``PYTHON`` (a shell script that logs its arguments and sleeps), so the script's
process handling is tested for real without etcd, NATS or GPUs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "launch" / "gpt_oss_disagg.sh"
SERVICES = "--namespace dynamo --etcd-endpoints http://127.0.0.1:2379 --nats-url nats://127.0.0.1:4222"


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFILL_", "DECODE_", "MODEL_PATH"))
    }
    full_env.update(env or {})
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd="/"
    )


def test_syntax() -> None:
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_dry_run_prints_the_exact_commands() -> None:
    out = run("--dry-run", env={"GPU_ARCH": "blackwell"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"# dry run: these commands would run from {ROOT} (nothing is started)",
        "+ python3 -m dynamo_lite.clear_namespace --namespace dynamo --etcd-endpoints http://127.0.0.1:2379",
        f"+ python3 -m dynamo_lite.frontend {SERVICES} --router-mode round-robin --http-host 127.0.0.1 "
        "--http-port 8000 &",
        f"+ CUDA_VISIBLE_DEVICES=0,1,2,3 python3 -m dynamo_lite.worker {SERVICES} "
        "--mode prefill --engine trtllm "
        "--model-path openai/gpt-oss-120b --served-model-name openai/gpt-oss-120b "
        "--extra-engine-args engine_configs/gpt_oss/prefill.yaml --disaggregation-strategy prefill_first "
        "--max-batch-size 32 &",
        f"+ CUDA_VISIBLE_DEVICES=4,5,6,7 python3 -m dynamo_lite.worker {SERVICES} "
        "--mode decode --engine trtllm "
        "--model-path openai/gpt-oss-120b --served-model-name openai/gpt-oss-120b "
        "--extra-engine-args engine_configs/gpt_oss/decode.yaml --disaggregation-strategy prefill_first "
        "--max-batch-size 128 &",
    ]


def test_hopper_gpus_get_the_triton_moe_configs() -> None:
    out = run("--dry-run", env={"GPU_ARCH": "hopper"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "--extra-engine-args engine_configs/gpt_oss/hopper/prefill.yaml" in lines[3]
    assert "--extra-engine-args engine_configs/gpt_oss/hopper/decode.yaml" in lines[4]


def test_dry_run_by_environment_with_overrides() -> None:
    env = {
        "DRY_RUN": "1",
        "MODEL_PATH": "/models/gpt oss",
        "SERVED_MODEL_NAME": "gpt-oss-120b",
        "DISAGGREGATION_STRATEGY": "decode_first",
        "NAMESPACE": "ns1",
        "HTTP_PORT": "9000",
        "ETCD_ENDPOINTS": "http://10.1.1.1:2379",
        "NATS_URL": "nats://10.1.1.1:4222",
        "PREFILL_GPUS": "0,1",
        "DECODE_GPUS": "2,3",
        "PREFILL_ENGINE_ARGS": "/etc/p.yaml",
        "DECODE_EXTRA_FLAGS": "--kv-failure-policy fail",
        "PYTHON": "/opt/venv/bin/python",
    }
    out = run(env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1] == (
        "+ /opt/venv/bin/python -m dynamo_lite.clear_namespace --namespace ns1 --etcd-endpoints http://10.1.1.1:2379"
    )
    assert "--http-port 9000" in lines[2] and "--namespace ns1" in lines[2]
    assert lines[3].startswith("+ CUDA_VISIBLE_DEVICES=0,1 /opt/venv/bin/python -m dynamo_lite.worker")
    assert "--model-path '/models/gpt oss' --served-model-name gpt-oss-120b" in lines[3]
    assert "--extra-engine-args /etc/p.yaml --disaggregation-strategy decode_first" in lines[3]
    assert "--nats-url nats://10.1.1.1:4222" in lines[3]
    assert lines[4].startswith("+ CUDA_VISIBLE_DEVICES=2,3 ")
    # decode_first: the decode worker places prefills with the frontend's --router-mode
    assert lines[4].endswith("--max-batch-size 128 --router-mode round-robin --kv-failure-policy fail &")


def test_unknown_option_is_refused_with_usage() -> None:
    out = run("--bogus")
    assert out.returncode == 2
    assert "unknown option: --bogus" in out.stderr
    assert "--dry-run" in out.stderr


FAKE_PYTHON = """#!/usr/bin/env bash
echo "$$ ${CUDA_VISIBLE_DEVICES:-none} $*" >> "$FAKE_LOG"
case "$*" in
    *clear_namespace*) exit 0 ;;
    *"--mode decode"*) if [[ -n "${FAKE_DECODE_EXIT:-}" ]]; then sleep 0.5; exit "$FAKE_DECODE_EXIT"; fi ;;
esac
exec sleep 60
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> tuple[Path, Path]:
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return python, tmp_path / "calls.log"


def logged(log: Path, count: int, timeout: float = 10) -> list[list[str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= count:
            return [line.split() for line in lines]
        time.sleep(0.05)
    raise AssertionError(
        f"expected {count} commands in {log}, got: {log.read_text() if log.exists() else ''}"
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill -0: look at its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def start_script(python: Path, log: Path, **env: str) -> subprocess.Popen[str]:
    # A long grace period: children that obey SIGTERM must be gone well before it ends.
    full_env = {**os.environ, "PYTHON": str(python), "FAKE_LOG": str(log), "STOP_TIMEOUT_S": "30", **env}
    return subprocess.Popen(
        ["bash", str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env
    )


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_stops_every_child(fake_python: tuple[Path, Path]) -> None:
    python, log = fake_python
    proc = start_script(python, log)
    pids: list[int] = []
    try:
        calls = logged(log, 4)
        pids = [int(c[0]) for c in calls[1:]]
        assert [c[3] for c in calls] == ["dynamo_lite.clear_namespace", "dynamo_lite.frontend"] + [
            "dynamo_lite.worker"
        ] * 2
        assert [c[1] for c in calls[2:]] == ["0,1,2,3", "4,5,6,7"]
        assert all(alive(pid) for pid in pids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 143
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        kill_leftovers(pids)


def test_a_child_exiting_stops_the_rest(fake_python: tuple[Path, Path]) -> None:
    python, log = fake_python
    proc = start_script(python, log, FAKE_DECODE_EXIT="3")
    pids: list[int] = []
    try:
        calls = logged(log, 4)
        pids = [int(c[0]) for c in calls[1:]]
        assert proc.wait(timeout=10) == 3
        assert "decode (pid" in proc.stderr.read()
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        kill_leftovers(pids)
