"""Issue 10.1: dynamo_lite across hosts, where the hosts are network namespaces on one bridge.

etcd, nats-server, the frontend, a prefill worker, two decode workers (torch engine, the real SmolLM2) and the
test's client each run in a namespace of their own with their own address; they meet only through the
bridge, over TCP. Network namespaces still share /dev/shm and the machine's ``host_id``, so the decode workers
are told not to map shared memory (``kv_use_shm: false``): the KV has to cross the veth link.

Then a decode worker's cable is pulled mid-stream: the stream moves to the other decode worker
(``--migration-limit 1``); with no decode worker left, a cut ends the stream with an error event within
seconds. A cut worker's registration expires after its lease (``--lease-ttl 2``); plugged back in, it
registers again by itself and serves.

Needs root (``ip netns``); skipped where namespaces can't be made.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import Proc, spawn, wait_until
from tests.multihost.netns import Host, Network, namespaces_usable

pytestmark = pytest.mark.timeout(120)

MODEL = "SmolLM2-135M-Instruct"
LEASE_TTL = 2
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4  # SmolLM2-135M: layers x (K, V) x kv heads x head dim x fp32
CLIENT = str(Path(__file__).with_name("ns_client.py"))
# Servers and clients in the namespaces must talk to each other, never to a proxy of the host.
NO_PROXY_ENV = {"http_proxy": "", "https_proxy": "", "HTTP_PROXY": "", "HTTPS_PROXY": "", "grpc_proxy": "",
                "all_proxy": "", "ALL_PROXY": "", "no_proxy": "*", "NO_PROXY": "*"}  # fmt: skip
# fp32 pinned: the KV byte counts below are fp32's (dtype auto would pick bf16 on an AMX CPU).
TORCH_WORKER = ("--engine", "torch", "--dtype", "float32", "--threads", "1", "--max-batch-size", "4",
                "--max-seq-len", "2048", "--lease-ttl", str(LEASE_TTL))  # fmt: skip
PORTS = {"etcd": 2379, "etcd_peer": 2380, "nats": 4222, "http": 8000, "kv": 7000, "metrics": 9100}


def _skip_reason() -> str | None:
    import shutil

    if not (shutil.which("etcd") and shutil.which("nats-server")):
        return "etcd and nats-server binaries are needed (apt-get install etcd-server nats-server)"
    return namespaces_usable()


@dataclass
class Stream:
    """A streaming chat run by the client host; its SSE events arrive in ``events`` as they come."""

    popen: subprocess.Popen
    events: list[dict] = field(default_factory=list)
    closed: bool = False  # the client exited and every line it printed is in ``events``
    changed: threading.Condition = field(default_factory=threading.Condition)

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self.changed:
                self.events.append(json.loads(line))
                self.changed.notify_all()
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise TimeoutError(f"{what}: not seen in {timeout}s; last events: {self.events[-5:]}")
                self.changed.wait(left)

    def finish(self, timeout: float, what: str = "end of stream") -> None:
        with self.changed:
            if not self.closed:
                self.changed.wait_for(lambda: self.closed, timeout)
            if not self.closed:
                raise TimeoutError(f"{what}: still open after {timeout}s; last events: {self.events[-5:]}")
        self.popen.wait(5)

    def data_events(self) -> int:
        return sum(1 for e in self.events if "data" in e)

    def contents(self) -> list[dict]:
        return [e for e in self.events if isinstance(e.get("data"), dict) and e["data"].get("choices")]

    def errors(self) -> list[dict]:
        return [e for e in self.events if isinstance(e.get("data"), dict) and "error" in e["data"]]

    def usage(self) -> dict | None:
        return next(
            (
                e["data"]["usage"]
                for e in self.events
                if isinstance(e.get("data"), dict) and e["data"].get("usage")
            ),
            None,
        )

    def text(self) -> str:
        return "".join(e["data"]["choices"][0]["delta"].get("content") or "" for e in self.contents())


@dataclass
class Cluster:
    """The running deployment: its hosts, its processes, and a client host to reach them from."""

    net: Network
    tmp: Path
    namespace: str
    procs: dict[str, Proc] = field(default_factory=dict)

    def host(self, name: str) -> Host:
        return self.net.hosts[name]

    @property
    def frontend(self) -> str:
        return f"http://{self.host('fe').ip}:{PORTS['http']}"

    # ---- the client host -----------------------------------------------------------------------------------
    def client(self, *args: str, timeout: float = 30) -> dict:
        out = subprocess.run(
            self.host("cl").cmd(sys.executable, CLIENT, *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_env(),
        )
        lines = out.stdout.strip().splitlines()
        if not lines:
            raise RuntimeError(f"ns_client {args}: no output; stderr: {out.stderr[-2000:]}")
        return json.loads(lines[-1])

    def get_json(self, url: str) -> dict:
        reply = self.client("get", url)
        if reply.get("status") != 200:
            raise RuntimeError(f"GET {url}: {reply}")
        return json.loads(reply["body"])

    def stream(self, body: dict) -> Stream:
        popen = subprocess.Popen(
            self.host("cl").cmd(
                sys.executable, CLIENT, "stream", f"{self.frontend}/v1/chat/completions", json.dumps(body)
            ),
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        s = Stream(popen)
        threading.Thread(target=s._read, daemon=True).start()
        return s

    def chat(self, body: dict, timeout: float = 60) -> Stream:
        s = self.stream(body)
        s.finish(timeout)
        return s

    def health(self) -> dict:
        reply = self.client("get", f"{self.frontend}/health")  # 503 while a role has no live worker
        if reply.get("status") not in (200, 503):
            raise RuntimeError(f"GET /health: {reply}")
        return json.loads(reply["body"])

    def metrics(self, worker: str) -> dict[str, float]:
        """The worker's ``dynamo_lite_worker_*`` samples, summed over labels (``_total`` dropped)."""
        reply = self.client("get", f"http://{self.host(worker).ip}:{PORTS['metrics']}/metrics")
        out: dict[str, float] = {}
        for line in reply["body"].splitlines():
            if line.startswith("dynamo_lite_worker_"):
                name = line.split("{", 1)[0].split(" ", 1)[0].removesuffix("_total")
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def instance_keys(self) -> list[str]:
        reply = self.client(
            "etcd-keys",
            f"http://{self.host('etcd').ip}:{PORTS['etcd']}",
            f"dynamo_lite/{self.namespace}/instances/",
        )
        return reply["keys"]

    def instance_id(self, worker: str) -> str:
        return self.procs[worker].extra["instance_id"]

    def registered(self, worker: str) -> bool:
        return any(k.endswith("/" + self.instance_id(worker)) for k in self.instance_keys())

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
        for proc in self.procs.values():
            try:
                proc.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.net.close()


def _env() -> dict[str, str]:
    import os

    return {**os.environ, **NO_PROXY_ENV}


def _start(cluster: Cluster, name: str, host: str, *argv: str) -> Proc:
    proc = spawn(name, cluster.host(host).cmd(*argv), cluster.tmp, NO_PROXY_ENV)
    cluster.procs[name] = proc
    return proc


def _start_worker(cluster: Cluster, host: str, mode: str, *extra: str) -> Proc:
    h = cluster.host(host)
    etcd, nats = cluster.host("etcd"), cluster.host("nats")
    return _start(
        cluster, host, host, sys.executable, "-m", "dynamo_lite.worker", "--mode", mode, *TORCH_WORKER,
        "--namespace", cluster.namespace, "--etcd-endpoints", f"{etcd.ip}:{PORTS['etcd']}",
        "--nats-url", f"nats://{nats.ip}:{PORTS['nats']}", "--advertise-host", h.ip,
        "--metrics-host", h.ip, "--metrics-port", str(PORTS["metrics"]), *extra,
    )  # fmt: skip


def _wait_worker(proc: Proc, timeout: float) -> None:
    def ready() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.log()[-3000:]}")
        return "READY worker" in proc.log()

    wait_until(ready, timeout, interval=0.2, what=f"{proc.name} ready")
    line = next(ln for ln in proc.log().splitlines() if ln.startswith("READY worker"))
    proc.extra["instance_id"] = line.split()[2]


def _bring_up(tmp: Path) -> Cluster:
    net = Network.create()
    cluster = Cluster(net, tmp, f"mh{uuid.uuid4().hex[:8]}")
    try:
        for name in ("etcd", "nats", "fe", "pf", "dc1", "dc2", "cl"):
            net.add_host(name)
        e, n = cluster.host("etcd").ip, cluster.host("nats").ip
        _start(
            cluster, "etcd", "etcd", "etcd", "--name", "e", "--data-dir", str(tmp / "etcd-data"),
            "--listen-client-urls", f"http://{e}:{PORTS['etcd']}",
            "--advertise-client-urls", f"http://{e}:{PORTS['etcd']}",
            "--listen-peer-urls", f"http://{e}:{PORTS['etcd_peer']}",
            "--initial-advertise-peer-urls", f"http://{e}:{PORTS['etcd_peer']}",
            "--initial-cluster", f"e=http://{e}:{PORTS['etcd_peer']}",
        )  # fmt: skip
        _start(cluster, "nats", "nats", "nats-server", "-a", n, "-p", str(PORTS["nats"]))
        wait_until(
            lambda: cluster.client("get", f"http://{e}:{PORTS['etcd']}/health").get("status") == 200,
            20,
            interval=0.3,
            what="etcd healthy",
        )

        pf = cluster.host("pf")
        no_shm = tmp / "decode.yaml"
        no_shm.write_text("# network namespaces share /dev/shm: force the KV over TCP\nkv_use_shm: false\n")
        _start_worker(cluster, "pf", "prefill", "--kv-bind-host", pf.ip, "--kv-advertise-host", pf.ip,
                      "--kv-port", str(PORTS["kv"]))  # fmt: skip
        for dc in ("dc1", "dc2"):
            _start_worker(cluster, dc, "decode", "--extra-engine-args", str(no_shm))
        for name in ("pf", "dc1", "dc2"):  # three torch processes loading at once on a small machine
            _wait_worker(cluster.procs[name], 90)

        fe = cluster.host("fe")
        _start(
            cluster, "frontend", "fe", sys.executable, "-m", "dynamo_lite.frontend", "--http-host", fe.ip,
            "--http-port", str(PORTS["http"]), "--migration-limit", "1", "--namespace", cluster.namespace,
            "--etcd-endpoints", f"{e}:{PORTS['etcd']}", "--nats-url", f"nats://{n}:{PORTS['nats']}",
        )  # fmt: skip

        def serving() -> bool:
            if not cluster.procs["frontend"].alive():
                raise RuntimeError(f"frontend exited:\n{cluster.procs['frontend'].log()[-3000:]}")
            try:
                health = cluster.health()
            except (RuntimeError, json.JSONDecodeError):
                return False
            return len(health["instances"]["prefill"]) == 1 and len(health["instances"]["decode"]) == 2

        wait_until(serving, 40, interval=0.3, what="frontend sees 1 prefill + 2 decode workers")
    except BaseException:
        for proc in cluster.procs.values():
            print(f"---- {proc.name} ----\n{proc.log()[-2000:]}")
        cluster.close()
        raise
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = _skip_reason()
    if reason:
        pytest.skip(f"multi-host test needs network namespaces: {reason}")
    subprocess.run(
        [sys.executable, "-m", "dynamo_lite", "prepare"], check=True, timeout=300, capture_output=True
    )
    c = _bring_up(tmp_path_factory.mktemp("netns"))
    try:
        yield c
    finally:
        c.close()


def _chat_body(content: str, max_tokens: int, stream_usage: bool = True, **extra: object) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": stream_usage},
        **extra,
    }


def _decode_totals(cluster: Cluster) -> dict[str, float]:
    """KV import counters of both decode workers, and the bytes their interfaces received."""
    totals = {"transfers": 0.0, "bytes": 0.0, "seconds": 0.0, "recomputes": 0.0, "rx": 0.0}
    for dc in ("dc1", "dc2"):
        m = cluster.metrics(dc)
        totals["transfers"] += m["dynamo_lite_worker_kv_transfers"]
        totals["bytes"] += m["dynamo_lite_worker_kv_transfer_bytes"]
        totals["seconds"] += m["dynamo_lite_worker_kv_transfer_seconds"]
        totals["recomputes"] += m["dynamo_lite_worker_kv_recomputes"]
        totals["rx"] += cluster.net.counters(cluster.host(dc))["rx"]
    return totals


def test_disaggregated_chat_pulls_the_kv_over_the_veth_link(cluster: Cluster) -> None:
    # A short prompt: the answer is right (the imported KV is the prompt's), the usage adds up.
    before = _decode_totals(cluster)
    chat = cluster.chat(_chat_body("What is the capital of France?", 16))
    after = _decode_totals(cluster)
    assert not chat.errors(), chat.errors()
    assert "Paris" in chat.text(), chat.text()
    usage = chat.usage()
    assert usage is not None and 0 < usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert after["transfers"] - before["transfers"] == 1 and after["recomputes"] == before["recomputes"]
    kv_bytes = after["bytes"] - before["bytes"]
    assert kv_bytes == usage["prompt_tokens"] * KV_BYTES_PER_TOKEN, (kv_bytes, usage)
    # Over TCP through the bridge, not shared memory: the decode host's interface received the KV.
    assert after["rx"] - before["rx"] >= kv_bytes

    # A long prompt, for a transfer time worth measuring.
    rows = []
    for items in (30, 220):  # about 200 and 1500 prompt tokens
        before = _decode_totals(cluster)
        prompt = "Summarize this text. " + " ".join(f"item{i} is blue." for i in range(items))
        chat = cluster.chat(_chat_body(prompt, 4, ignore_eos=True), timeout=90)
        after = _decode_totals(cluster)
        assert not chat.errors(), chat.errors()
        usage = chat.usage()
        assert usage is not None and usage["completion_tokens"] == 4, chat.events[-3:]
        kv_bytes = after["bytes"] - before["bytes"]
        seconds = after["seconds"] - before["seconds"]
        assert after["transfers"] - before["transfers"] == 1 and after["recomputes"] == before["recomputes"]
        assert kv_bytes == usage["prompt_tokens"] * KV_BYTES_PER_TOKEN
        assert after["rx"] - before["rx"] >= kv_bytes
        rows.append((usage["prompt_tokens"], kv_bytes, seconds, after["rx"] - before["rx"]))
    for tokens, nbytes, seconds, rx in rows:
        print(
            f"\nKV over veth (TCP): {tokens} prompt tokens, {nbytes / 1e6:.1f} MB in {seconds * 1e3:.1f} ms "
            f"= {nbytes / seconds / 1e6:.0f} MB/s (decode host received {rx / 1e6:.1f} MB)"
        )


def _serving_decoder(cluster: Cluster, candidates: list[str]) -> str:
    def busy() -> str | None:
        for dc in candidates:
            if cluster.metrics(dc)["dynamo_lite_worker_active_seqs"] > 0:
                return dc
        return None

    return wait_until(busy, 10, interval=0.1, what="a decode worker with an active sequence")


def _lease_expiry(cluster: Cluster, worker: str, cut_at: float) -> float:
    """Seconds from ``cut_at`` until ``worker``'s instance key is gone from etcd (at most the TTL + 2 s)."""
    wait_until(
        lambda: not cluster.registered(worker),
        cut_at + LEASE_TTL + 2 - time.monotonic(),
        interval=0.1,
        what=f"{worker}'s lease expiry",
    )
    return time.monotonic() - cut_at


def test_decode_link_cut_mid_stream(cluster: Cluster) -> None:
    body = _chat_body("Write a long story about a lighthouse keeper.", 128, ignore_eos=True)

    # 1. Two decode workers: cut the serving one's cable; the stream moves to the other and completes.
    stream = cluster.stream(body)
    stream.wait_for(lambda: stream.data_events() >= 8, 60, "first chunks")
    cut = _serving_decoder(cluster, ["dc1", "dc2"])
    spare = "dc2" if cut == "dc1" else "dc1"
    cluster.net.set_link(cluster.host(cut), up=False)
    cut_at = time.monotonic()
    # The cut worker can't renew its lease: its registration expires by itself (while the stream goes on).
    print(f"\n{cut}'s instance left etcd {_lease_expiry(cluster, cut, cut_at):.1f}s after its cable was cut")
    stream.finish(60, "migrated stream ends")
    assert not stream.errors(), stream.errors()
    usage = stream.usage()
    assert usage is not None and usage["completion_tokens"] == 128, usage
    assert stream.events[-2]["data"] == "[DONE]"
    after_cut = [e["t"] for e in stream.contents() if e["t"] > cut_at]
    assert after_cut, "no token arrived after the cut"
    print(f"migration: the next token came from {spare} {after_cut[0] - cut_at:.2f}s after the cut of {cut}")
    assert "migrating" in cluster.procs["frontend"].log()
    assert cluster.registered(spare)
    wait_until(
        lambda: cluster.health()["instances"]["decode"] == [cluster.instance_id(spare)],
        5,
        interval=0.2,
        what="frontend drops the cut worker",
    )

    # 2. No spare left: a cut ends the stream with an error event within seconds, never a hang.
    stream = cluster.stream(body)
    stream.wait_for(lambda: stream.data_events() >= 8, 60, "first chunks")
    assert _serving_decoder(cluster, [spare]) == spare
    cluster.net.set_link(cluster.host(spare), up=False)
    cut_at = time.monotonic()
    stream.finish(10, "failed stream ends")
    errors = stream.errors()
    assert len(errors) == 1, stream.events[-5:]
    error_after = errors[0]["t"] - cut_at
    print(f"no spare: error event {error_after:.2f}s after the cut: {errors[0]['data']['error']['message']}")
    assert error_after < 5.0
    assert stream.events[-2]["data"] == "[DONE]"
    print(
        f"{spare}'s instance left etcd {_lease_expiry(cluster, spare, cut_at):.1f}s after its cable was cut"
    )

    # 3. Cables back: both workers register again by themselves and serve.
    for dc in (cut, spare):
        cluster.net.set_link(cluster.host(dc), up=True)
    plugged = time.monotonic()
    wait_until(
        lambda: len(cluster.health()["instances"]["decode"]) == 2,
        15,
        interval=0.3,
        what="both decode workers registered again",
    )
    print(
        f"both decode workers registered again {time.monotonic() - plugged:.1f}s after the cables came back"
    )
    wait_until(
        lambda: all(cluster.metrics(dc)["dynamo_lite_worker_active_seqs"] == 0 for dc in (cut, spare)),
        30,
        interval=0.3,
        what="the cut workers finish what they were generating",
    )
    served_before = {dc: cluster.metrics(dc)["dynamo_lite_worker_requests"] for dc in (cut, spare)}
    for _ in range(2):
        chat = cluster.chat(_chat_body("What is the capital of France?", 8))
        assert not chat.errors() and "Paris" in chat.text(), chat.events[-4:]
    served = {
        dc: cluster.metrics(dc)["dynamo_lite_worker_requests"] - served_before[dc] for dc in (cut, spare)
    }
    assert served == {cut: 1, spare: 1}, served  # round-robin: each reconnected worker took one
