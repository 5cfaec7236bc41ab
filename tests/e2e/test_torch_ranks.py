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


def rank_processes(pid: int) -> list[int]:
    """The follower ranks among ``pid``'s children (a prefill worker has a shared-memory tracker too)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out.extend(int(c) for c in (task / "children").read_text().split())
    return [c for c in out if b"rank_worker" in Path(f"/proc/{c}/cmdline").read_bytes()]


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


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
    [follower] = rank_processes(ranked.pid)
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


@pytest.mark.slow
def test_the_seeds_flags_and_yamls_on_cpu(
    services: Services, procs_to_stop: list[Proc], tmp_path: Path
) -> None:
    """The seed's command lines with ``--engine torch --device cpu``: a TP4/EP4 prefill worker (heads split) and a
    TP4/EP4 decode worker with the decode YAML's ``enable_attention_dp: true``, tiny gpt-oss, 10 processes on
    loopback; greedy output equals one rank's, the KV handed from the head-split prefill to the attention-DP
    decode (no recompute), each rank copying its own part of the KV."""
    import asyncio as aio

    from tokenizers import Tokenizer

    from dynamo_lite.engines.base import EngineSettings
    from dynamo_lite.engines.reference import build_engine
    from dynamo_lite.gpt_oss.tiny import write_model_folder
    from dynamo_lite.protocol import GenerateRequest, SamplingOptions

    folder = write_model_folder(tmp_path / "tiny-gpt-oss")
    root = Path(__file__).resolve().parents[2]
    seed = ("--tensor-parallel-size", "4", "--expert-parallel-size", "4", "--device", "cpu", "--dtype", "float32",
            "--threads", "1", "--model-path", str(folder), "--lease-ttl", "3")  # fmt: skip
    ns = f"t{uuid.uuid4().hex[:8]}"
    yaml = root / "engine_configs" / "gpt_oss"
    prefill = start_worker(services, ns, "prefill", *seed, "--extra-engine-args", str(yaml / "prefill.yaml"),
                           engine="torch", ready_timeout=240)  # fmt: skip
    procs_to_stop.append(prefill)
    decode = start_worker(services, ns, "decode", *seed, "--extra-engine-args", str(yaml / "decode.yaml"),
                          engine="torch", ready_timeout=240)  # fmt: skip
    procs_to_stop.append(decode)
    assert len(rank_processes(prefill.pid)) == 3 and len(rank_processes(decode.pid)) == 3
    frontend = start_frontend(services, ns)
    procs_to_stop.append(frontend)
    url = f"http://127.0.0.1:{frontend.port}"
    wait_until(lambda: folder.name in httpx.get(url + "/v1/models", timeout=2).text, 20, what="model listed")

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompts = [tok.encode(t).ids for t in ("The quick brown fox jumps over", "Disaggregated serving splits")]
    texts = []
    for ids in prompts:
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": folder.name, "prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": True})  # fmt: skip
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])

    async def one_rank() -> list[list[int]]:
        engine = build_engine(
            EngineSettings(model_path=str(folder), dtype="float32", threads=1, max_seq_len=128)
        )
        await engine.start()
        try:
            out = []
            for ids in prompts:
                opts = SamplingOptions(max_tokens=8, temperature=0.0, ignore_eos=True)
                req = GenerateRequest(request_id="r", model="m", token_ids=ids, sampling=opts)
                out.append([t async for c in engine.generate(req) for t in c.token_ids])
            return out
        finally:
            await engine.stop()

    expected = aio.run(one_rank())
    assert texts == [tok.decode(ids, skip_special_tokens=True) for ids in expected]
    metrics = httpx.get(f"http://127.0.0.1:{decode.port}/metrics", timeout=3).text
    assert "dynamo_lite_worker_kv_transfers_total" in metrics
    transfers = sum(
        float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines()
        if ln.startswith("dynamo_lite_worker_kv_transfers_total{")
    )  # fmt: skip
    assert transfers == len(prompts)
    # Rank by rank: every rank of both workers copied its own part through shared memory, none fell back to rank 0.
    assert "gathering the KV on rank 0" not in prefill.log() and "relaying the KV" not in decode.log()
    assert "not copied" not in prefill.log() + decode.log()
