"""etcd discovery against a real etcd: leases, watches, lease loss, etcd restarts, clearing a namespace."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING

import aetcd
import pytest

from dynamo_lite.protocol import DiscoveryEvent, InstanceInfo, ModelCard
from dynamo_lite.runtime import keys
from dynamo_lite.runtime.config import RuntimeSettings
from dynamo_lite.runtime.discovery_etcd import EtcdDiscovery, parse_endpoints
from dynamo_lite.runtime.registry import LiveView, register
from dynamo_lite.runtime.runtime import Runtime

if TYPE_CHECKING:
    from conftest import Launcher, Proc

ROOT = Path(__file__).resolve().parents[2]


def endpoints(proc: Proc) -> str:
    return f"127.0.0.1:{proc.port}"


@pytest.fixture
async def raw(etcd_server: Proc) -> AsyncIterator[aetcd.Client]:
    """A plain etcd client, behind the back of the code under test."""
    client = aetcd.Client(host="127.0.0.1", port=etcd_server.port, timeout=5)
    await client.connect()
    yield client
    await client.close()


async def present(client: aetcd.Client, key: str) -> bool:
    return (await client.get(key.encode())) is not None


async def eventually(predicate, within: float, interval: float = 0.05) -> float:  # noqa: ANN001
    """Poll an async predicate on state in etcd; returns the seconds it took to become true."""
    t0 = time.monotonic()
    while not await predicate():
        if time.monotonic() - t0 > within:
            raise TimeoutError(f"not true within {within}s")
        await asyncio.sleep(interval)
    return time.monotonic() - t0


def test_parse_endpoints() -> None:
    assert parse_endpoints("http://127.0.0.1:2379, host2:2380,[::1]:2381,host3") == [
        ("127.0.0.1", 2379),
        ("host2", 2380),
        ("::1", 2381),
        ("host3", 2379),
    ]
    with pytest.raises(ValueError):
        parse_endpoints(" , ")


async def test_put_get_watch_and_close_revokes(etcd_server: Proc, raw: aetcd.Client) -> None:
    d = await EtcdDiscovery.connect(endpoints(etcd_server), ttl_s=5)
    other = await EtcdDiscovery.connect(endpoints(etcd_server), ttl_s=5)
    watch = other.watch_prefix("t1/")
    pending = asyncio.ensure_future(watch.__anext__())
    await asyncio.sleep(0.3)  # let the watch be created on the server
    await d.put("t1/a", b"1")
    await d.put("t1/b", b"2")
    await d.put("t2/x", b"elsewhere")
    assert {e.key: e.value for e in await d.get_prefix("t1/")} == {"t1/a": b"1", "t1/b": b"2"}
    await d.delete("t1/b")
    async with aclosing(watch):
        events: list[DiscoveryEvent] = [await asyncio.wait_for(pending, 3.0)]
        events += [await asyncio.wait_for(watch.__anext__(), 3.0) for _ in range(2)]
        assert [(e.key, e.value) for e in events] == [("t1/a", b"1"), ("t1/b", b"2"), ("t1/b", None)]
        assert events[0].revision < events[1].revision < events[2].revision
        # close() revokes the lease: the remaining key vanishes at once, and the watcher is told.
        await d.close()
        gone = await asyncio.wait_for(watch.__anext__(), 3.0)
    assert (gone.key, gone.value) == ("t1/a", None)
    assert not await present(raw, "t1/a")
    assert await present(raw, "t2/x") is False  # t2/x was d's too
    await other.close()


async def test_keys_vanish_within_the_ttl_when_the_owner_is_killed(
    etcd_server: Proc, raw: aetcd.Client, tmp_path: Path
) -> None:
    script = (
        "import asyncio, sys\n"
        "from dynamo_lite.runtime.discovery_etcd import EtcdDiscovery\n"
        "async def main():\n"
        "    d = await EtcdDiscovery.connect(sys.argv[1], ttl_s=2)\n"
        "    await d.put('t3/owned', b'x')\n"
        "    print('READY', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, endpoints(etcd_server), stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)  # type: ignore[union-attr]
        assert line.strip() == b"READY"
        await asyncio.sleep(2.5)  # longer than the TTL: the keep-alive holds the key
        assert await present(raw, "t3/owned")
        proc.kill()  # SIGKILL: no revoke, the lease must expire by itself
        took = await eventually(lambda: _absent(raw, "t3/owned"), within=5.0)
        assert took < 2 + 1.5  # TTL + margin
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 5)


async def _absent(client: aetcd.Client, key: str) -> bool:
    return not await present(client, key)


async def test_revoked_lease_is_regranted_and_keys_rewritten(etcd_server: Proc, raw: aetcd.Client) -> None:
    d = await EtcdDiscovery.connect(endpoints(etcd_server), ttl_s=2)
    try:
        await d.put("t4/a", b"1")
        await d.put("t4/b", b"2")
        await d.put("t4/c", b"3")
        await d.delete("t4/c")  # deleted keys are not resurrected
        old = d.lease_id
        await raw.revoke_lease(old)  # what a lease expiry during a long outage looks like
        assert not await present(raw, "t4/a")
        await eventually(lambda: present(raw, "t4/a"), within=3.0)
        await eventually(lambda: present(raw, "t4/b"), within=1.0)
        assert d.lease_renewals == 1 and d.lease_id != old
        assert not await present(raw, "t4/c")
        # The new lease is kept alive too.
        await asyncio.sleep(2.5)
        assert await present(raw, "t4/a")
        info = await raw.get_lease_info(d.lease_id, keys=True)
        assert sorted(info.keys) == [b"t4/a", b"t4/b"]
    finally:
        await d.close()


async def test_clear_namespace_removes_only_that_namespace(etcd_server: Proc, raw: aetcd.Client) -> None:
    root = RuntimeSettings().root
    await raw.put(f"{root}/ns-a/instances/decode/generate/1".encode(), b"x")
    await raw.put(f"{root}/ns-a/models/m/1".encode(), b"x")
    await raw.put(f"{root}/ns-ab/models/m/1".encode(), b"x")  # a namespace whose name extends ns-a
    await raw.put(f"{root}/ns-b/models/m/1".encode(), b"x")
    cmd = [
        sys.executable,
        "-m",
        "dynamo_lite.clear_namespace",
        "--namespace",
        "ns-a",
        "--etcd-endpoints",
        endpoints(etcd_server),
    ]
    out = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "removed 2 keys" in out.stdout
    assert [kv.key for kv in await raw.get_prefix(f"{root}/ns-a/".encode())] == []
    assert await present(raw, f"{root}/ns-ab/models/m/1")
    assert await present(raw, f"{root}/ns-b/models/m/1")
    # Without an etcd endpoint it refuses instead of guessing.
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "dynamo_lite.clear_namespace"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={"PATH": ""},
    )
    assert out.returncode == 1 and "etcd-endpoints" in out.stderr


def _instance(ns: str, iid: str) -> tuple[InstanceInfo, ModelCard]:
    info = InstanceInfo(
        iid, ns, "decode", "generate", keys.request_address(ns, "decode", "generate", iid), "m"
    )
    return info, ModelCard("m", "/m", "/m/tokenizer.json", role="decode")


async def test_live_view_over_etcd(etcd_server: Proc) -> None:
    settings = RuntimeSettings(
        namespace="lv-etcd", etcd_endpoints=endpoints(etcd_server), nats_url="", lease_ttl_s=2
    )
    worker, frontend = await Runtime.connect(settings), await Runtime.connect(settings)
    view = LiveView(frontend)
    await view.start()
    try:
        await register(worker, *_instance("lv-etcd", "w1"))
        await eventually(_true(lambda: "w1" in view.instances and "w1" in view.cards.get("m", {})), 3.0)
        await worker.close()  # revokes the lease: instance and card go together
        await eventually(_true(lambda: not view.instances and not view.cards), 3.0)
    finally:
        await view.stop()
        await frontend.close()


def _true(predicate):  # noqa: ANN001, ANN202
    async def check() -> bool:
        return bool(predicate())

    return check


async def test_etcd_restart_shorter_than_the_ttl_keeps_keys_and_the_view(launcher: Launcher) -> None:
    proc = await asyncio.to_thread(launcher.etcd, "etcd-r")
    port, peer = proc.port, proc.extra["peer_port"]
    settings = RuntimeSettings(
        namespace="restart", etcd_endpoints=f"127.0.0.1:{port}", nats_url="", lease_ttl_s=4
    )
    key = keys.instance_key(settings.root, "restart", "decode", "generate", "w1")
    worker, frontend = await Runtime.connect(settings), await Runtime.connect(settings)
    late: Runtime | None = None
    view = LiveView(frontend)
    raw = aetcd.Client(host="127.0.0.1", port=port, timeout=5)
    try:
        await register(worker, *_instance("restart", "w1"))
        await view.start()
        assert "w1" in view.instances
        proc.kill()
        proc.popen.wait(5)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(launcher.etcd, "etcd-r", port, peer)  # same port, same data dir
        assert await present(raw, key)  # the lease survived the restart
        # A worker registering after the restart is seen: the view re-watched.
        late = await Runtime.connect(settings)
        await register(late, *_instance("restart", "w2"))
        await eventually(_true(lambda: {"w1", "w2"} <= set(view.instances)), 8.0)
        # Keep-alives resumed: after more than a TTL the first worker is still registered, on the same lease.
        await asyncio.sleep(settings.lease_ttl_s + 0.5)
        assert await present(raw, key)
        assert worker.discovery.lease_renewals == 0  # type: ignore[attr-defined]
        assert {"w1", "w2"} <= set(view.instances)
        await late.close()
        late = None
        await eventually(_true(lambda: "w2" not in view.instances), 3.0)
    finally:
        await view.stop()
        for rt in (worker, frontend, late):
            if rt is not None:
                await rt.close()
        await raw.close()
