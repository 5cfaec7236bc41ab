"""``python -m dynamo_lite.frontend --workers 2``: two frontend processes on one port under a supervisor, against
real etcd + NATS and mocker workers, through the official openai client."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import openai
import pytest

from tests.conftest import Proc, Services, killed_on_failure, spawn, start_worker, wait_until

MODEL = "smol-mock"
WORKER_ARGS = ("--served-model-name", MODEL, "--speedup-ratio", "0")
MAX_TOKENS = 5
ACCESS_LINE = re.compile(r"dynamo_lite\.access\[(\d+)\]: ")


def child_pids(pid: int) -> set[int]:
    """The live children of ``pid`` (zombies not reaped yet excluded)."""
    try:
        raw = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return set()
    return {c for c in map(int, raw.split()) if running(c)}


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def supervisor_dir(child: int) -> Path:
    """The directory the supervisor gave ``child`` (its metrics socket's)."""
    cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
    return Path(cmdline[cmdline.index(b"--supervisor-dir") + 1].decode())


def start_frontend_workers(services: Services, namespace: str, *args: str, workers: int = 2) -> Proc:
    cmd = [sys.executable, "-m", "dynamo_lite.frontend", "--http-host", "127.0.0.1", "--http-port", "0"]
    cmd += ["--workers", str(workers), *services.runtime_args(namespace), *args]
    proc = spawn(f"frontend-workers-{uuid.uuid4().hex[:6]}", cmd, services.tmp)

    def ready() -> str | None:
        if not proc.alive():
            raise RuntimeError(f"frontend exited early:\n{proc.log()[-3000:]}")
        return next((ln for ln in proc.log().splitlines() if ln.startswith("READY frontend ")), None)

    with killed_on_failure(proc):
        line = wait_until(ready, 60, what="frontend READY")
    proc.port = int(line.rsplit(":", 1)[1])
    return proc


def chat(port: int) -> str:
    """One streamed chat request on a connection of its own (the kernel picks the process per connection)."""
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0) as client:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=MAX_TOKENS,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as {sample with labels: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in samples.items() if k.split("{")[0] == name and all(w in k for w in want))


@pytest.fixture
def frontend(services: Services):
    ns = f"w{uuid.uuid4().hex[:8]}"
    procs: list[Proc] = []  # each one owned as soon as it runs
    try:
        for mode in ("prefill", "decode"):
            procs.append(start_worker(services, ns, mode, *WORKER_ARGS))
        fe = start_frontend_workers(services, ns)
        procs.append(fe)
        yield fe
    finally:
        for p in reversed(procs):
            p.stop()


def test_both_processes_serve_and_metrics_add_up(frontend: Proc) -> None:
    children = child_pids(frontend.pid)
    assert len(children) == 2
    sent = 24  # on 24 connections: all on one process has odds 2^-23
    for _ in range(sent):
        assert chat(frontend.port)
    served = Counter(int(m.group(1)) for m in ACCESS_LINE.finditer(frontend.log()))
    assert set(served) == children, served  # every access line names its process: both served
    assert sum(served.values()) == sent
    for _ in range(8):  # probes answer from either process (a connection each)
        for probe in ("live", "ready", "health"):
            with urllib.request.urlopen(f"http://127.0.0.1:{frontend.port}/{probe}", timeout=5) as r:
                assert r.status == 200
    for _ in range(4):  # whichever process answers the scrape, it reports the whole frontend
        m = scrape(frontend.port)
        assert m["dynamo_lite_frontend_processes"] == 2
        assert total(m, "dynamo_frontend_requests_total", status="success") == sent
        assert total(m, "dynamo_frontend_output_tokens_total") == sent * MAX_TOKENS
        assert total(m, "dynamo_frontend_time_to_first_token_seconds_count") == sent
        assert total(m, "dynamo_frontend_inflight_requests") == 0


def test_a_killed_process_is_restarted_and_the_port_keeps_answering_and_none_outlives_the_supervisor(
    frontend: Proc,
) -> None:
    victim, survivor = sorted(child_pids(frontend.pid))
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not running(victim), 10, what="the killed process gone")
    for _ in range(6):
        assert chat(frontend.port)  # the survivor has the port meanwhile
    wait_until(lambda: "restarted: pid" in frontend.log(), 30, what="the replacement ready")
    children = child_pids(frontend.pid)
    assert survivor in children and victim not in children and len(children) == 2
    assert "exited with -9" in frontend.log()
    assert scrape(frontend.port)["dynamo_lite_frontend_processes"] == 2
    for _ in range(6):
        assert chat(frontend.port)
    directory = supervisor_dir(survivor)
    # The supervisor itself: its children get SIGTERM from the kernel, and drain.
    frontend.kill(signal.SIGKILL)
    wait_until(lambda: not any(running(p) for p in children), 30, what="the orphaned children gone")
    shutil.rmtree(directory)  # what a SIGKILLed supervisor could not remove


def test_sigterm_stops_every_process(frontend: Proc) -> None:
    children = child_pids(frontend.pid)
    assert len(children) == 2
    directory = supervisor_dir(min(children))
    assert directory.is_dir()
    assert chat(frontend.port)
    frontend.popen.send_signal(signal.SIGTERM)
    assert frontend.popen.wait(30) == 0
    assert not any(running(pid) for pid in children)
    assert not directory.exists()  # the supervisor's directory (metrics sockets) is removed


def test_children_failing_at_start_fail_the_supervisor(services: Services) -> None:
    """etcd unreachable: every child fails the same way; the supervisor exits 1 instead of restarting."""
    cmd = [sys.executable, "-m", "dynamo_lite.frontend", "--http-host", "127.0.0.1", "--http-port", "0"]
    cmd += ["--workers", "2", "--etcd-endpoints", "127.0.0.1:1", "--nats-url", services.nats_url]
    proc = spawn("frontend-bad-etcd", cmd, services.tmp)
    try:
        assert proc.popen.wait(60) == 1
    finally:
        proc.kill()
    assert "exited with 1 while starting" in proc.log()
    assert "READY" not in proc.log()
