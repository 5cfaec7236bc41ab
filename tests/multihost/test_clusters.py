"""Issue 10.2: etcd and NATS as three-node clusters; one node of each dies (kill -9) under load.

etcd: 3 members (``--initial-cluster a=...,b=...,c=...``); NATS: 3 servers joined by routes. The mocker
workers (prefill + decode) and the frontend get every endpoint (``--etcd-endpoints a,b,c``,
``--nats-url nats://..,nats://..,nats://..``). A few clients stream chats back to back while a node is killed:

- an etcd member (the first endpoint, the one every process connects to first): nothing fails, no worker's
  registration lapses, and the frontend still sees workers come and go;
- the NATS server the frontend is connected to, then the one the decode worker is connected to: streams in
  flight may fail, but cleanly (503 or an error event, never a hang); every request started after the kill
  plus a short reconnect window succeeds.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import Proc, free_port, spawn, start_frontend, start_worker, wait_until

pytestmark = pytest.mark.timeout(120)

MODEL = "smol-mock"
LEASE_TTL = 2
# speedup 1: a decode step takes ~10 ms; 24 tokens ≈ a quarter of a second per request.
WORKER_ARGS = ("--served-model-name", MODEL, "--speedup-ratio", "1", "--lease-ttl", str(LEASE_TTL))
MAX_TOKENS = 24
CLIENTS = 4
RECONNECT_WINDOW_S = 2.0  # after a NATS server dies, requests started this much later must all succeed
HANG_LIMIT_S = 5.0  # no request may take longer than this, failed or not


def _get_json(url: str, data: bytes | None = None) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=2) as r:
        return json.loads(r.read())


@dataclass
class Member:
    """One etcd member or NATS server of a cluster."""

    name: str
    proc: Proc
    port: int  # clients
    admin_port: int  # etcd: peers; NATS: monitoring

    def alive(self) -> bool:
        return self.proc.alive()


@dataclass
class Clusters:
    """A 3-member etcd and a 3-server NATS; duck-types ``tests.conftest.Services`` for start_worker()."""

    tmp: Path
    etcd: list[Member] = field(default_factory=list)
    nats: list[Member] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)

    @property
    def etcd_endpoints(self) -> str:
        return ",".join(f"127.0.0.1:{m.port}" for m in self.etcd)

    @property
    def nats_url(self) -> str:
        return ",".join(f"nats://127.0.0.1:{m.port}" for m in self.nats)

    def runtime_args(self, namespace: str) -> list[str]:
        return [
            "--namespace",
            namespace,
            "--etcd-endpoints",
            self.etcd_endpoints,
            "--nats-url",
            self.nats_url,
        ]

    def etcd_leader(self) -> Member | None:
        status = {m.name: _get_json(f"http://127.0.0.1:{m.port}/v3/maintenance/status", b"{}")
                  for m in self.etcd if m.alive()}  # fmt: skip
        leaders = {st.get("leader") for st in status.values()}
        return next((m for m in self.etcd if m.name in status
                     and status[m.name].get("header", {}).get("member_id") in leaders), None)  # fmt: skip

    def move_etcd_leader(self, to: Member) -> None:
        """Make ``to`` the raft leader (etcd's MoveLeader, asked of the current leader)."""
        leader = self.etcd_leader()
        if leader is to:
            return
        assert leader is not None
        target = _get_json(f"http://127.0.0.1:{to.port}/v3/maintenance/status", b"{}")["header"]["member_id"]
        _get_json(f"http://127.0.0.1:{leader.port}/v3/maintenance/transfer-leadership",
                  json.dumps({"targetID": target}).encode())  # fmt: skip
        wait_until(lambda: self.etcd_leader() is to, 5, interval=0.1, what=f"{to.name} leads")

    def nats_server_of(self, client_name: str) -> Member | None:
        """The live NATS server a client (by connection name) is connected to, from the servers' /connz."""
        for m in self.nats:
            if not m.alive():
                continue
            connz = _get_json(f"http://127.0.0.1:{m.admin_port}/connz?limit=1024")
            if any(c.get("name") == client_name for c in connz.get("connections", [])):
                return m
        return None

    def close(self) -> None:
        for proc in [*self.procs, *(m.proc for m in self.nats), *(m.proc for m in self.etcd)]:
            proc.kill()
        for proc in [*self.procs, *(m.proc for m in self.nats), *(m.proc for m in self.etcd)]:
            proc.popen.wait(10)


def start_etcd_cluster(c: Clusters, names: tuple[str, ...] = ("a", "b", "c")) -> None:
    ports = {n: (free_port(), free_port()) for n in names}
    initial = ",".join(f"{n}=http://127.0.0.1:{peer}" for n, (_, peer) in ports.items())
    token = f"dl-{uuid.uuid4().hex[:8]}"
    for n, (port, peer) in ports.items():
        cmd = [
            "etcd", "--name", n, "--data-dir", str(c.tmp / f"etcd-{n}"),
            "--listen-client-urls", f"http://127.0.0.1:{port}",
            "--advertise-client-urls", f"http://127.0.0.1:{port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", initial, "--initial-cluster-token", token, "--initial-cluster-state", "new",
        ]  # fmt: skip
        c.etcd.append(Member(f"etcd-{n}", spawn(f"etcd-{n}", cmd, c.tmp), port, peer))

    def healthy(m: Member) -> bool:
        if not m.alive():
            raise RuntimeError(f"{m.name} exited:\n{m.proc.log()[-2000:]}")
        try:
            return _get_json(f"http://127.0.0.1:{m.port}/health").get("health") == "true"
        except OSError:
            return False

    wait_until(lambda: all(healthy(m) for m in c.etcd), 30, interval=0.2, what="etcd cluster healthy")


def start_nats_cluster(c: Clusters, names: tuple[str, ...] = ("a", "b", "c")) -> None:
    ports = {n: (free_port(), free_port(), free_port()) for n in names}
    cluster_name = f"dl-{uuid.uuid4().hex[:8]}"
    for n, (port, monitor, route) in ports.items():
        routes = ",".join(f"nats://127.0.0.1:{r}" for other, (_, _, r) in ports.items() if other != n)
        cmd = [
            "nats-server", "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor),
            "--cluster_name", cluster_name, "--cluster", f"nats://127.0.0.1:{route}", "--routes", routes,
        ]  # fmt: skip
        c.nats.append(Member(f"nats-{n}", spawn(f"nats-{n}", cmd, c.tmp), port, monitor))

    def routed(m: Member) -> bool:
        if not m.alive():
            raise RuntimeError(f"{m.name} exited:\n{m.proc.log()[-2000:]}")
        try:
            return _get_json(f"http://127.0.0.1:{m.admin_port}/routez").get("num_routes") == len(names) - 1
        except OSError:
            return False

    wait_until(lambda: all(routed(m) for m in c.nats), 20, interval=0.2, what="NATS cluster routed")


@dataclass
class Stack:
    clusters: Clusters
    namespace: str
    frontend: Proc
    prefill: Proc
    decode: Proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.frontend.port}"

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=2).json()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    import shutil

    if not (shutil.which("etcd") and shutil.which("nats-server")):
        pytest.skip("etcd and nats-server binaries are needed (apt-get install etcd-server nats-server)")
    c = Clusters(tmp_path)
    try:
        start_etcd_cluster(c)
        start_nats_cluster(c)
        ns = f"cl{uuid.uuid4().hex[:8]}"
        prefill = start_worker(c, ns, "prefill", *WORKER_ARGS)  # type: ignore[arg-type]
        c.procs.append(prefill)
        decode = start_worker(c, ns, "decode", *WORKER_ARGS)  # type: ignore[arg-type]
        c.procs.append(decode)
        frontend = start_frontend(c, ns)  # type: ignore[arg-type]
        c.procs.append(frontend)
        s = Stack(c, ns, frontend, prefill, decode)

        def ready() -> bool:
            inst = s.health()["instances"]
            return len(inst["prefill"]) == 1 and len(inst["decode"]) == 1

        wait_until(ready, 15, interval=0.1, what="frontend sees both workers")
        yield s
    finally:
        c.close()


# ---- load --------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    started: float
    seconds: float
    status: int  # HTTP status; 0: the connection failed
    result: str  # "ok" | "error-event" | "http-error" | "broken" (a stream cut short without an error)
    tokens: int = 0
    message: str = ""


async def one_chat(client: httpx.AsyncClient, url: str) -> Outcome:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": MAX_TOKENS,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
    t0 = time.monotonic()
    status, tokens, error, done = 0, 0, "", False
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            status = r.status_code
            if status != 200:
                payload = json.loads(await r.aread())
                return Outcome(
                    t0, time.monotonic() - t0, status, "http-error", 0, payload["error"]["message"]
                )
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]["message"]
                elif event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return Outcome(t0, time.monotonic() - t0, status, "broken", 0, repr(e))
    seconds = time.monotonic() - t0
    if error and done:
        return Outcome(t0, seconds, status, "error-event", tokens, error)
    if done and tokens == MAX_TOKENS:
        return Outcome(t0, seconds, status, "ok", tokens)
    return Outcome(t0, seconds, status, "broken", tokens, f"done={done} error={error!r}")


async def load(url: str, seconds: float, outcomes: list[Outcome]) -> None:
    """``CLIENTS`` clients stream chats back to back for ``seconds``."""
    until = time.monotonic() + seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < until:
            outcome = await one_chat(client, url)
            outcomes.append(outcome)
            if outcome.result != "ok":
                await asyncio.sleep(0.05)

    async with httpx.AsyncClient(timeout=httpx.Timeout(HANG_LIMIT_S * 3)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(CLIENTS)))


def summarize(label: str, outcomes: list[Outcome], event_at: float) -> None:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.result] = counts.get(o.result, 0) + 1
    failed = [o for o in outcomes if o.result != "ok"]
    window = (f", failures started {min(o.started for o in failed) - event_at:+.2f}s..."
              f"{max(o.started for o in failed) - event_at:+.2f}s around it") if failed else ""  # fmt: skip
    slowest = max(o.seconds for o in outcomes)
    print(f"\n{label}: {len(outcomes)} requests {counts}{window}; slowest {slowest:.2f}s")
    for o in failed[:6]:
        print(f"    {o.started - event_at:+.2f}s {o.result} status={o.status} {o.message[:120]}")


def check_clean(outcomes: list[Outcome]) -> None:
    """No hang, and every failure is a clean one: a 503 answer or an error event followed by [DONE]."""
    assert outcomes
    assert max(o.seconds for o in outcomes) < HANG_LIMIT_S, max(outcomes, key=lambda o: o.seconds)
    broken = [o for o in outcomes if o.result == "broken" or (o.result == "http-error" and o.status != 503)]
    assert not broken, broken[:5]


# ---- the tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("victim_leads", [False, True], ids=["follower", "leader"])
def test_etcd_member_killed_under_load(stack: Stack, victim_leads: bool) -> None:
    c = stack.clusters
    victim = c.etcd[0]  # every process tries the first endpoint first: all are connected to it
    c.move_etcd_leader(victim if victim_leads else c.etcd[1])
    workers = {"prefill": stack.prefill.extra["instance_id"], "decode": stack.decode.extra["instance_id"]}
    gaps: list[tuple[float, dict]] = []

    async def watch_health(until: float) -> None:
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < until:
                inst = (await client.get(f"{stack.url}/health")).json()["instances"]
                seen = {role: inst[role] for role in workers}
                if seen != {role: [iid] for role, iid in workers.items()}:
                    gaps.append((time.monotonic(), seen))
                await asyncio.sleep(0.1)

    async def run() -> tuple[list[Outcome], float]:
        outcomes: list[Outcome] = []
        began = time.monotonic()
        tasks = [
            asyncio.create_task(load(stack.url, 8.0, outcomes)),
            asyncio.create_task(watch_health(began + 8)),
        ]
        await asyncio.sleep(2.0)
        victim.proc.kill(signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.gather(*tasks)
        return outcomes, killed_at

    outcomes, killed_at = asyncio.run(run())
    role = "the leader" if victim_leads else "a follower"
    summarize(
        f"etcd member {victim.name} ({role}; every process's first endpoint) killed", outcomes, killed_at
    )
    check_clean(outcomes)
    assert all(o.result == "ok" for o in outcomes), [o for o in outcomes if o.result != "ok"][:5]
    # Keep-alives moved to a live member in time: no registration lapsed, none had to be re-granted.
    assert not gaps, gaps[:3]
    for proc in (stack.prefill, stack.decode, stack.frontend):
        assert "etcd lease was lost" not in proc.log(), proc.log()[-2000:]

    # The frontend's watch moved too: a new worker shows up at once, a dead one leaves after its lease.
    extra = start_worker(c, stack.namespace, "decode", *WORKER_ARGS)  # type: ignore[arg-type]
    c.procs.append(extra)
    ready_at = time.monotonic()
    wait_until(
        lambda: len(stack.health()["instances"]["decode"]) == 2, 3, interval=0.05, what="new worker seen"
    )
    seen_after = time.monotonic() - ready_at
    extra.kill(signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: len(stack.health()["instances"]["decode"]) == 1, LEASE_TTL + 3, interval=0.05,
               what="killed worker gone")  # fmt: skip
    print(f"after the member loss: a new worker seen {seen_after:.2f}s after READY, a killed one gone "
          f"{time.monotonic() - killed:.2f}s after kill -9 (lease TTL {LEASE_TTL}s)")  # fmt: skip


def test_nats_servers_killed_under_load(stack: Stack) -> None:
    c = stack.clusters
    targets = [("frontend", "dynamo_lite-frontend"), ("decode worker", "dynamo_lite-decode")]
    for label, client_name in targets:
        victim = wait_until(lambda name=client_name: c.nats_server_of(name), 5, interval=0.1,
                            what=f"the NATS server of the {label}")  # fmt: skip
        users = [n for n in ("dynamo_lite-frontend", "dynamo_lite-prefill", "dynamo_lite-decode")
                 if c.nats_server_of(n) is victim]  # fmt: skip

        async def run(victim: Member = victim) -> tuple[list[Outcome], float]:
            outcomes: list[Outcome] = []
            task = asyncio.create_task(load(stack.url, 7.0, outcomes))
            await asyncio.sleep(2.0)
            victim.proc.kill(signal.SIGKILL)
            killed_at = time.monotonic()
            await task
            return outcomes, killed_at

        outcomes, killed_at = asyncio.run(run())
        summarize(
            f"NATS server {victim.name} of the {label} killed (its clients: {users})", outcomes, killed_at
        )
        check_clean(outcomes)
        before = [o for o in outcomes if o.started + o.seconds < killed_at]
        assert before and all(o.result == "ok" for o in before)
        late = [o for o in outcomes if o.started > killed_at + RECONNECT_WINDOW_S]
        assert len(late) >= 8, len(late)
        assert all(o.result == "ok" for o in late), [o for o in late if o.result != "ok"][:5]


def test_frontend_watch_moves_to_a_live_member_at_once(tmp_path: Path) -> None:
    """In process: a live view on a 3-member etcd; its member dies; a change made through another member
    must reach it within seconds, whatever the view's own lease TTL (here 30 s: keep-alives every 10 s)."""
    import shutil

    import aetcd

    from dynamo_lite.protocol import InstanceInfo, encode
    from dynamo_lite.runtime.config import RuntimeSettings
    from dynamo_lite.runtime.discovery_etcd import EtcdDiscovery
    from dynamo_lite.runtime.registry import LiveView
    from dynamo_lite.runtime.runtime import Runtime

    if not shutil.which("etcd"):
        pytest.skip("etcd binary is needed (apt-get install etcd-server)")
    c = Clusters(tmp_path)
    try:
        start_etcd_cluster(c)
        c.move_etcd_leader(c.etcd[1])  # no election when etcd[0] dies: only the client's failover is measured

        async def run() -> float | None:
            settings = RuntimeSettings(namespace="w", etcd_endpoints=c.etcd_endpoints, lease_ttl_s=30)
            discovery = await EtcdDiscovery.connect(c.etcd_endpoints, settings.lease_ttl_s)
            view = LiveView(Runtime(settings, discovery, None))  # type: ignore[arg-type]
            await view.start()
            writer = aetcd.Client(host="127.0.0.1", port=c.etcd[2].port)
            try:
                c.etcd[0].proc.kill(signal.SIGKILL)
                killed = time.monotonic()
                info = InstanceInfo("i1", "w", "decode", "generate", "dynamo_lite.w.decode.generate.i1", "m")
                await writer.put(b"dynamo_lite/w/instances/decode/generate/i1", encode(info))
                while time.monotonic() - killed < 6.0:
                    if "i1" in view.instances:
                        return time.monotonic() - killed
                    await asyncio.sleep(0.05)
                return None
            finally:
                await view.stop()
                await discovery.close()
                await writer.close()

        seen_after = asyncio.run(run())
        print(f"\nlive view saw a change {seen_after}s after its etcd member died")
        assert seen_after is not None and seen_after < 3.0
    finally:
        c.close()
