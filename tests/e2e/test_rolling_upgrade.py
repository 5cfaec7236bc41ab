"""Issue 26: a rolling upgrade under streaming load, across a wire change (the next version adds a field to every
message, ``next_wire``): each worker is replaced one at a time — a new one started, then the old one stopped
(SIGTERM: it deregisters and drains) — and the frontend too, while old and new processes serve together in
both directions (old frontend ↔ new workers, new frontend ↔ an old worker). No request fails."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx

from tests.conftest import Proc, Services, start_frontend, start_worker, wait_until
from tests.e2e.test_faults_mocker import WORKER_ARGS
from tests.e2e.test_nats_outage import complete, one

NEXT = ("tests.e2e.next_wire",)


def workers_in(frontend: Proc) -> dict[str, list[str]]:
    return httpx.get(f"http://127.0.0.1:{frontend.port}/health", timeout=2).json()["instances"]


def test_a_rolling_upgrade_across_a_wire_change_fails_no_request(services: Services, procs_to_stop) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"

    def worker(mode: str, launch: tuple[str, ...] = ()) -> Proc:
        proc = start_worker(services, ns, mode, *WORKER_ARGS, launch=launch)
        procs_to_stop.append(proc)
        return proc

    def frontend(launch: tuple[str, ...] = ()) -> Proc:
        proc = start_frontend(services, ns, "--migration-limit", "3", launch=launch)
        procs_to_stop.append(proc)
        return proc

    old = {"prefill": worker("prefill"), "decode-a": worker("decode"), "decode-b": worker("decode")}
    fronts = [frontend()]  # the one taking the load is the last
    wait_until(lambda: len(workers_in(fronts[-1])["decode"]) == 2, 15, what="workers discovered")
    url = [f"http://127.0.0.1:{fronts[-1].port}/v1/chat/completions"]  # where the load goes

    async def load(stop: asyncio.Event, results: list[dict]) -> None:
        async def client_loop() -> None:
            async with httpx.AsyncClient(timeout=30) as client:  # a fresh pool per frontend
                target = url[0]
                while not stop.is_set():
                    if url[0] != target:
                        return await client_loop()
                    await one(client, target, results)

        await asyncio.gather(*(client_loop() for _ in range(12)))

    def replace(name: str, mode: str) -> None:
        new = worker(mode, NEXT)
        assert "NEXT WIRE" in new.log()
        wait_until(lambda: new.extra["instance_id"] in workers_in(fronts[-1])[mode], 10, what=f"new {name}")
        time.sleep(1.0)  # both serve for a while
        assert old[name].stop(timeout=30) == 0  # deregisters, drains its streams, exits

    async def run() -> list[dict]:
        results: list[dict] = []
        stop = asyncio.Event()
        loader = asyncio.create_task(load(stop, results))
        await asyncio.sleep(1.5)
        await asyncio.to_thread(
            replace, "decode-a", "decode"
        )  # old frontend ↔ a new and an old decode worker
        await asyncio.to_thread(
            replace, "prefill", "prefill"
        )  # an old decode worker pulls from a new prefill
        fronts.append(await asyncio.to_thread(frontend, NEXT))
        assert "NEXT WIRE" in fronts[-1].log()
        await asyncio.to_thread(wait_until, lambda: len(workers_in(fronts[-1])["decode"]) == 2, 15)
        url[0] = f"http://127.0.0.1:{fronts[-1].port}/v1/chat/completions"  # new frontend ↔ old decode-b
        await asyncio.sleep(2.0)
        assert await asyncio.to_thread(fronts[0].stop, 30) == 0  # the old frontend drains its last streams
        await asyncio.to_thread(replace, "decode-b", "decode")
        await asyncio.sleep(1.5)
        stop.set()
        await loader
        return results

    results = asyncio.run(run())
    failed = [r for r in results if not complete(r)]
    assert len(results) > 100 and not failed, (len(results), failed[:5])
