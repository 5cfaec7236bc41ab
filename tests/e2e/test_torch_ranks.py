"""Issue 28 through etcd + NATS: a prefill worker and two decode workers of the torch engine (tiny llama, fp32),
one decode worker with 2 ranks (``--tensor-parallel-size 2 --enable-attention-dp``). kill -9 one of its ranks
mid-stream: the stream migrates to the other decode worker and completes, the 2-rank worker deregisters and
exits, and none of its ranks is left running."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import Proc, Services, start_frontend, start_worker, wait_until

pytest.importorskip("torch")

ARGS = (
    "--engine",
    "torch",
    "--threads",
    "1",
    "--dtype",
    "float32",
    "--max-seq-len",
    "512",
    "--lease-ttl",
    "2",
)


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out.extend(int(c) for c in (task / "children").read_text().split())
    return out


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def procs_to_stop():
    procs: list[Proc] = []
    yield procs
    for p in procs:
        p.kill()
    for p in procs:
        p.popen.wait(10)


def test_a_rank_killed_mid_stream_migrates_and_the_worker_leaves(
    services: Services, procs_to_stop: list[Proc], tmp_path: Path
) -> None:
    from dynamo_lite.tiny_llama import write_model_folder

    folder = write_model_folder(tmp_path / "tiny-llama")
    model = ("--model-path", str(folder))
    ns = f"t{uuid.uuid4().hex[:8]}"
    prefill = start_worker(services, ns, "prefill", *ARGS, *model, engine="torch", ready_timeout=120)
    procs_to_stop.append(prefill)
    ranked = start_worker(
        services, ns, "decode", *ARGS, *model, "--tensor-parallel-size", "2", "--enable-attention-dp",
        engine="torch", ready_timeout=120,
    )  # fmt: skip
    procs_to_stop.append(ranked)
    [follower] = children(ranked.pid)
    frontend = start_frontend(services, ns, "--migration-limit", "1", "--router-mode", "round-robin")
    procs_to_stop.append(frontend)
    url = f"http://127.0.0.1:{frontend.port}"

    def decoders() -> int:
        return len(httpx.get(url + "/health", timeout=2).json()["instances"].get("decode", []))

    wait_until(lambda: decoders() == 1, 20, what="the 2-rank decode worker discovered")
    other = start_worker(services, ns, "decode", *ARGS, *model, engine="torch", ready_timeout=120)
    procs_to_stop.append(other)
    wait_until(lambda: decoders() == 2, 20, what="both decode workers discovered")

    body = {"model": folder.name, "prompt": "one two three", "max_tokens": 300, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    killed_at: list[float] = []

    async def stream(client: httpx.AsyncClient, kill: bool) -> dict:
        seen = {"tokens": 0, "error": None, "done": False, "usage": None}
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line[6:] == "[DONE]":
                    seen["done"] = True
                    break
                event = orjson.loads(line[6:])
                if "error" in event:
                    seen["error"] = event["error"]
                elif event.get("usage"):
                    seen["usage"] = event["usage"]
                elif event.get("choices"):
                    seen["tokens"] += 1
                    if kill and seen["tokens"] == 5:
                        os.kill(follower, signal.SIGKILL)
                        killed_at.append(time.monotonic())
        return seen

    async def run() -> list[dict]:
        # Round-robin over the two decode workers: one of the two streams runs on the 2-rank worker.
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(stream(client, True), stream(client, False))

    results = asyncio.run(run())
    assert killed_at and all(r["done"] and r["error"] is None for r in results), results
    assert [r["usage"]["completion_tokens"] for r in results] == [300, 300]
    wait_until(lambda: not ranked.alive(), 10, what="the 2-rank worker exited")
    assert ranked.popen.wait(5) != 0 and gone(follower)
    wait_until(lambda: decoders() == 1, 10, what="the 2-rank worker deregistered")
    assert "engine failed" in ranked.log()
    assert "migrating" in frontend.log()
