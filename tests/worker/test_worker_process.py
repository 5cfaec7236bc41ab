"""Real worker processes on real etcd + NATS: register, serve, expose metrics, leave cleanly or by lease."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from contextlib import aclosing
from typing import TYPE_CHECKING

import aetcd

from dynamo_lite.protocol import GenerateChunk, GenerateRequest, Phase, SamplingOptions, decode, encode
from dynamo_lite.router.orchestrator import Router
from dynamo_lite.router.settings import RouterSettings
from dynamo_lite.runtime import keys
from dynamo_lite.runtime.config import DEFAULT_ROOT, RuntimeSettings
from dynamo_lite.runtime.registry import LiveView
from dynamo_lite.runtime.runtime import Runtime

if TYPE_CHECKING:
    from conftest import Launcher, Proc, Services

MODEL = "mock-model"
LEASE_TTL = 2


async def keys_of(client: aetcd.Client, proc: Proc, ns: str) -> list[str]:
    iid = proc.extra["instance_id"]
    got = await client.get_prefix(keys.namespace_prefix(DEFAULT_ROOT, ns).encode())
    return sorted(kv.key.decode() for kv in got if kv.key.decode().endswith("/" + iid))


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return r.read().decode()


async def until(predicate, within: float) -> None:  # noqa: ANN001
    """Poll state owned by another task or process (no event to wait on); fail after ``within`` seconds."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_worker_processes_serve_over_nats_and_leave_by_lease_or_drain(
    services: Services, launcher: Launcher
) -> None:
    ns = "procs"
    common = ("--served-model-name", MODEL, "--lease-ttl", str(LEASE_TTL))
    prefill = await asyncio.to_thread(
        launcher.worker, services, ns, "prefill", "--speedup-ratio", "0", *common
    )
    decode_w = await asyncio.to_thread(
        launcher.worker, services, ns, "decode", "--speedup-ratio", "1", *common
    )
    client = aetcd.Client(host="127.0.0.1", port=services.etcd.port, timeout=5)
    settings = RuntimeSettings(
        namespace=ns, etcd_endpoints=services.etcd_endpoints, nats_url=services.nats_url
    )
    runtime = await Runtime.connect(settings)
    view = LiveView(runtime)
    try:
        # Registered in etcd: the instance and its model card, both under the worker's lease.
        iid = decode_w.extra["instance_id"]
        assert await keys_of(client, decode_w, ns) == sorted(
            [
                keys.instance_key(DEFAULT_ROOT, ns, "decode", "generate", iid),
                keys.model_key(DEFAULT_ROOT, ns, MODEL, iid),
            ]
        )
        await view.start()
        router = Router(runtime, view, RouterSettings())
        assert [c.served_name for c in router.model_cards()] == [MODEL]

        # One disaggregated request across processes: prefill → KV descriptor → decode worker, over NATS.
        req = GenerateRequest("r1", MODEL, list(range(700, 764)), SamplingOptions(max_tokens=12))
        async with aclosing(router.generate(MODEL, req)) as chunks:
            out = [c async for c in chunks]
        assert sum(len(c.token_ids) for c in out) == 12 and out[-1].finish_reason == "length"

        # Metrics over HTTP, the request counted under its phase.
        text = await asyncio.to_thread(scrape, decode_w.port)
        assert (
            f'dynamo_lite_worker_kv_transfers_total{{instance="{iid}",model="{MODEL}",role="decode"}} 1.0'
            in text
        )
        assert "dynamo_lite_worker_active_seqs" in text
        assert 'phase="decode",role="decode",status="ok"} 1.0' in text
        assert 'phase="prefill",role="prefill",status="ok"} 1.0' in await asyncio.to_thread(
            scrape, prefill.port
        )

        # kill -9: nobody deregisters; the lease removes the keys within its TTL.
        prefill.kill(signal.SIGKILL)
        killed = time.monotonic()
        while await keys_of(client, prefill, ns):
            assert time.monotonic() - killed < LEASE_TTL + 1.5, "prefill keys outlived the lease TTL"
            await asyncio.sleep(0.05)
        await until(lambda: not view.instances_of("prefill"), 3.0)
        assert router.model_cards() == []  # prefill_first needs a prefill worker

        # SIGTERM mid-stream: deregister at once, finish the in-flight request, exit 0.
        assert decode_w.alive()
        long = GenerateRequest(
            "r2", MODEL, list(range(700, 764)), SamplingOptions(max_tokens=150), Phase.DECODE
        )
        address = view.instances[iid].address
        got: list[int] = []
        first_chunk = asyncio.Event()

        async def consume() -> None:
            stream = runtime.request_plane.stream(address, encode(long), first_timeout=10.0)
            async with aclosing(stream):
                async for payload in stream:
                    got.extend(decode(payload, GenerateChunk).token_ids)
                    first_chunk.set()

        consumer = asyncio.create_task(consume())
        await asyncio.wait_for(first_chunk.wait(), 10.0)
        decode_w.kill(signal.SIGTERM)
        async with asyncio.timeout(3.0):
            while await keys_of(client, decode_w, ns):  # noqa: ASYNC110 — state in etcd
                await asyncio.sleep(0.02)
        assert not consumer.done() and len(got) < 150  # deregistered while the request is still streaming
        await asyncio.wait_for(consumer, 10.0)
        assert len(got) == 150
        assert await asyncio.to_thread(decode_w.popen.wait, 15) == 0, decode_w.log()[-2000:]
        assert not await keys_of(client, decode_w, ns)
    finally:
        await view.stop()
        await runtime.close()
        await client.close()
        for p in (prefill, decode_w):
            p.stop()
