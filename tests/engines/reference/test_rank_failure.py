"""A rank that dies takes its engine down cleanly: kill -9 a follower of a 2-rank engine mid-stream (or while
idle) and the stream ends with an error within 2 s, the engine reports its failure (the worker deregisters on
it), and no rank is left running; kill -9 rank 0's process and its follower exits too."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from contextlib import aclosing
from pathlib import Path

import pytest

from dynamo_lite.engines.base import EngineError, EngineSettings
from dynamo_lite.engines.reference import build_engine
from dynamo_lite.protocol import GenerateRequest, SamplingOptions

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dynamo_lite.tiny_llama import write_model_folder

    return write_model_folder(tmp_path_factory.mktemp("tiny-llama"))


def settings(folder: Path) -> EngineSettings:
    return EngineSettings(
        role="agg",
        model_path=str(folder),
        dtype="float32",
        threads=1,
        max_batch_size=2,
        max_seq_len=512,
        tensor_parallel_size=2,
        extra={"warmup": False},
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
        env={**os.environ, "PYTHONPATH": str(ROOT)},
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
