"""A rank that dies takes its engine down cleanly: kill -9 a follower of a 2-rank engine mid-stream (or while
idle) and the stream ends with an error within 2 s, the engine reports its failure (the worker deregisters on
it), and no rank is left running; kill -9 rank 0's process and its follower exits too. Wherever rank 0 waits
when the follower dies — joining the groups, loading, in a step's collective with a follower that stopped
answering, in a KV handoff — it knows within 2 s, not after ``rank_timeout_s``, and no KV stays held."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import aclosing
from pathlib import Path

import pytest
from reference_testing import project_env

from dynamo_lite.engines.base import EngineError, EngineSettings
from dynamo_lite.engines.reference import build_engine
from dynamo_lite.engines.reference.rank_runner import RankState
from dynamo_lite.protocol import GenerateRequest, Phase, SamplingOptions

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dynamo_lite.tiny_llama import write_model_folder

    return write_model_folder(tmp_path_factory.mktemp("tiny-llama"))


def settings(folder: Path, role: str = "agg", **extra: object) -> EngineSettings:
    return EngineSettings(
        role=role,
        model_path=str(folder),
        dtype="float32",
        threads=1,
        max_batch_size=2,
        max_seq_len=512,
        tensor_parallel_size=2,
        extra={"warmup": False, **extra},
    )


def watch_failure(engine) -> tuple[list[BaseException], asyncio.Event]:  # noqa: ANN001
    """The engine's failures as they are reported (from its thread), and an event set on the first."""
    failures: list[BaseException] = []
    failed = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_failure(error: BaseException) -> None:
        failures.append(error)
        loop.call_soon_threadsafe(failed.set)

    engine.on_failure = on_failure
    return failures, failed


def gone(pid: int) -> bool:
    """Exited (a zombie waiting to be reaped counts as gone: it runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


async def test_a_follower_killed_mid_stream_fails_the_stream_and_the_engine(llama: Path) -> None:
    engine = build_engine(settings(llama))
    failures, failed = watch_failure(engine)
    await engine.start()
    [follower] = engine._ranks.pids
    opts = SamplingOptions(max_tokens=400, temperature=0.0, ignore_eos=True)
    req = GenerateRequest(request_id="r", model="tiny", token_ids=[1, 2, 3], sampling=opts)
    received, killed_at, ended_at = 0, 0.0, 0.0
    try:
        with pytest.raises(EngineError) as raised:
            async with aclosing(engine.generate(req)) as chunks:
                async for chunk in chunks:
                    received += len(chunk.token_ids)
                    if received >= 3 and not killed_at:
                        os.kill(follower, signal.SIGKILL)
                        killed_at = time.monotonic()
        ended_at = time.monotonic()
        assert raised.value.status == 503
        assert 3 <= received < 400 and ended_at - killed_at < 2.0
        await asyncio.wait_for(failed.wait(), 2.0)
        assert failures and gone(follower)
        with pytest.raises(EngineError, match="not running"):
            async with aclosing(engine.generate(req)) as chunks:
                await anext(chunks)
    finally:
        await engine.stop()
    assert gone(follower)


async def test_a_follower_killed_while_idle_fails_the_engine(llama: Path) -> None:
    engine = build_engine(settings(llama))
    failures, failed = watch_failure(engine)
    await engine.start()
    try:
        [follower] = engine._ranks.pids
        os.kill(follower, signal.SIGKILL)
        await asyncio.wait_for(failed.wait(), 2.0)
        assert failures and "rank 1 exited" in str(failures[0])
    finally:
        await engine.stop()


@pytest.mark.parametrize("when", ["spawned", "joined"])
async def test_a_follower_dying_while_the_engine_starts_fails_the_start_at_once(
    llama: Path, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``spawned``: the follower dies while importing torch, before it joined the groups (rank 0 waits in the
    rendezvous, which alone would wait ``rank_timeout_s``); ``joined``: it dies as the ranks load (rank 0 loaded,
    held before it gathers every rank's weight bytes until the follower is dead: the tiny model loads faster than
    a kill could otherwise land in that window)."""
    killed = threading.Event()
    gather = RankState.gather_weight_bytes

    def gather_once_killed(self: RankState, *args: object) -> None:
        killed.wait(120)
        gather(self, *args)

    if when == "joined":
        monkeypatch.setattr(RankState, "gather_weight_bytes", gather_once_killed)
    engine = build_engine(settings(llama))
    starting = asyncio.create_task(engine.start())

    def spawned() -> None:
        while engine._ranks is None or not engine._ranks.procs:
            time.sleep(0.01)

    await asyncio.to_thread(spawned)
    ranks = engine._ranks
    [follower] = ranks.pids
    if when == "joined":
        await asyncio.to_thread(ranks.joined.wait, 120)
    os.kill(follower, signal.SIGKILL)
    killed_at = time.monotonic()
    killed.set()
    try:
        with pytest.raises(Exception, match="rank 1 exited|Connection|closed|reset"):
            await asyncio.wait_for(starting, 30)
        took = time.monotonic() - killed_at
        print(f"follower killed once {when}: start failed {took:.3f} s later")
        assert took < 2.0 and gone(follower)
    finally:
        await engine.stop()


def shm_segments(pid: int) -> set[str]:
    """The KV shared-memory segments process ``pid`` created (``dynamo_lite.kv.shm`` names)."""
    return {p.name for p in Path("/dev/shm").glob(f"dlkv_{pid}_*")}


@pytest.mark.parametrize("when", ["handoff", "step"])
async def test_a_decode_follower_killed_while_rank_0_waits_on_it(llama: Path, when: str) -> None:
    """A disaggregated request on a 2-rank attention-DP decode engine (the seed's decode layout). The follower
    is stopped (SIGSTOP) so rank 0 surely waits on it in a collective — the KV handoff's (stopped before the
    request) or a step's (after 3 tokens) — then killed: the stream fails within 2 s, the engine reports its
    failure, no rank is left and no KV is held (the prefill's hold freed, no segment of ours left)."""
    prefill = build_engine(dataclasses.replace(settings(llama, "prefill"), tensor_parallel_size=1))
    decode = build_engine(settings(llama, "decode", enable_attention_dp=True))
    await prefill.start()
    await decode.start()
    failures, failed = watch_failure(decode)
    [follower] = decode._ranks.pids
    opts = SamplingOptions(max_tokens=400, temperature=0.0, ignore_eos=True)
    ids = [1, 2, 3, 4, 5]
    try:
        first = [c async for c in prefill.generate(GenerateRequest(
            request_id="r", model="tiny", token_ids=ids, sampling=opts, phase=Phase.PREFILL))]  # fmt: skip
        assert first[0].kv is not None and prefill.exporter.held_bytes > 0
        req = GenerateRequest(request_id="r", model="tiny", token_ids=ids, sampling=opts, phase=Phase.DECODE,
                              kv=first[0].kv, generated_ids=first[0].token_ids)  # fmt: skip
        received, killed_at = 0, 0.0

        async def kill_soon() -> None:
            nonlocal killed_at
            await asyncio.sleep(0.3)  # rank 0 is now blocked on the stopped follower
            os.kill(follower, signal.SIGKILL)
            killed_at = time.monotonic()

        killer = None
        if when == "handoff":  # stopped before the request: rank 0 waits for its part of the KV import
            os.kill(follower, signal.SIGSTOP)
            killer = asyncio.create_task(kill_soon())
        with pytest.raises(EngineError) as raised:
            async with aclosing(decode.generate(req)) as chunks:
                async for chunk in chunks:
                    received += len(chunk.token_ids)
                    if received >= 3 and killer is None:
                        os.kill(follower, signal.SIGSTOP)
                        killer = asyncio.create_task(kill_soon())
        assert killer is not None and killer.done()
        took = time.monotonic() - killed_at
        print(f"follower killed in the {when}: stream failed {took:.3f} s later ({raised.value})")
        assert raised.value.status == 503 and took < 2.0
        assert (received == 0) if when == "handoff" else (3 <= received < 400)
        await asyncio.wait_for(failed.wait(), 2.0)
        assert failures and gone(follower)
        assert prefill.exporter.held_bytes == 0  # pulled (and released) or never left held
    finally:
        if not gone(follower):
            os.kill(follower, signal.SIGKILL)
        await decode.stop()
        await prefill.stop()
    assert gone(follower) and not shm_segments(os.getpid())


async def test_a_rank_that_cannot_copy_its_kv_part_fails_that_handoff_only(llama: Path) -> None:
    """A follower that can't map the handoff's segment reports so; rank 0 raises ``KvHandoffError`` and the ranks
    stay in step. An import then has rank 0 relay the KV over the data group instead; an export fails its request
    (``kv_export_failed``)."""
    from types import SimpleNamespace

    import torch

    from dynamo_lite.engines.reference.rank_comm import KvWrite
    from dynamo_lite.engines.reference.rank_runner import KvHandoffError
    from dynamo_lite.kv.layout import KvLayout

    engine = build_engine(settings(llama))
    await engine.start()
    try:
        runner, cfg = engine._runner, engine.model_config
        layout = KvLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, "float32", 4)
        mine = [
            torch.zeros(shape) for shape, _ in layout.parts
        ]  # rank 0's own views of the (missing) segment
        slot = runner.slots.allocate()
        try:
            with torch.inference_mode(), pytest.raises(KvHandoffError, match=r"ranks \[1\] could not"):
                runner._send(KvWrite(slot, 4, -1, "dlkv_0_gone", layout), mine)
            # An import (``write_kv``) then has rank 0 relay the KV to the rank that could not copy it.
            kv = [torch.randn(shape) for shape, _ in layout.parts]
            pulled = SimpleNamespace(
                layout=layout, shm_name="dlkv_0_gone", on_device=False, cuda_ipc=b"",
                tensors=lambda: kv, write_into=lambda dests: [d.copy_(k) for d, k in zip(dests, kv, strict=True)],
            )  # fmt: skip
            state = runner.state
            with torch.inference_mode():
                runner.write_kv(slot, pulled)
            assert state.kv_relayed_by_rank == [layout.nbytes // 2] * 2
            [part] = engine._cache.slot_parts(slot, 4)
            assert torch.equal(part, kv[0][:, :, : cfg.num_kv_heads // 2])  # rank 0's half of the heads
        finally:
            runner.slots.free(slot)
        opts = SamplingOptions(max_tokens=4, temperature=0.0, ignore_eos=True)
        req = GenerateRequest(request_id="after", model="tiny", token_ids=[1, 2, 3], sampling=opts)
        async with aclosing(engine.generate(req)) as chunks:
            assert sum(len(c.token_ids) for c in [c async for c in chunks]) == 4
    finally:
        await engine.stop()


SCRIPT = """
import asyncio, sys
from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.reference import build_engine

async def main():
    s = EngineSettings(role="agg", model_path=sys.argv[1], dtype="float32", threads=1, max_batch_size=1,
                       max_seq_len=64, tensor_parallel_size=2, extra={"warmup": False})
    engine = build_engine(s)
    await engine.start()
    print(engine._ranks.pids[0], flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_rank_zero_killed_takes_its_follower_down(llama: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(llama)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=project_env(),
    )
    try:
        follower = int(proc.stdout.readline())
        assert not gone(follower)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 2.0
        while not gone(follower) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(follower)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
