"""One weights copy per device, on CPU shared memory (the same mechanism as CUDA IPC, minus the GPU): the weights
tree survives the manifest; attached workers map the holder's arena instead of copying it; a worker that is
killed and restarted maps the same arena again; when the holder dies, an attached worker exits at once with a
clear message; an engine serving mapped weights gives the same tokens as one that loaded its own. CUDA: the same
checks on a GPU (skipped here)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path

import pytest
import torch
from gpt_oss_testing import NEW_TOKENS, prompts, tiny_folder

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.reference import build_engine
from dynamo_lite.engines.reference.gpt_oss_loader import GptOssConfig, random_gpt_oss_weights
from dynamo_lite.engines.reference.shared_weights import (
    HOLDER_LOST_EXIT,
    SharedWeightsError,
    WeightsHolder,
    attach,
)
from dynamo_lite.engines.reference.shared_weights.holder import arena_path
from dynamo_lite.engines.reference.shared_weights.tree import TreeError, flatten, unflatten
from dynamo_lite.gpt_oss.tiny import TINY_SHAPE, gpt_oss_config
from dynamo_lite.protocol import GenerateRequest, SamplingOptions

ROOT = Path(__file__).resolve().parents[3]


def _pythonpath() -> str:
    """The project first, then whatever the caller's path held (a device's wheels in a folder of their own)."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


CPU = torch.device("cpu")


def tiny_weights(mxfp4: bool) -> tuple[GptOssConfig, object]:
    cfg = GptOssConfig.from_dict(gpt_oss_config(**{**TINY_SHAPE, "vocab_size": 512}))
    return cfg, random_gpt_oss_weights(cfg, torch.float32, CPU, mxfp4=mxfp4)


def same_tree(a: object, b: object) -> None:
    ta, na = flatten(a)
    tb, nb = flatten(b)
    assert na == nb and ta.keys() == tb.keys()
    for path, t in ta.items():
        assert tb[path].dtype == t.dtype and torch.equal(tb[path], t), path


@pytest.mark.parametrize("mxfp4", [False, True])
def test_the_weights_tree_survives_flattening(mxfp4: bool) -> None:
    _, weights = tiny_weights(mxfp4)
    tensors, nodes = flatten(weights)
    assert ("layers", "list", 4) in nodes
    rebuilt = unflatten(tensors, nodes)
    assert type(rebuilt) is type(weights) and type(rebuilt.layers[0].gate_up) is type(
        weights.layers[0].gate_up
    )
    same_tree(rebuilt, weights)
    with pytest.raises(TreeError, match="not a registered"):
        unflatten(tensors, [("", "os.system", 0)])


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """The holder's threads see attaches and detaches a moment after the worker's side does."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def socket_path(tmp_path: Path):  # noqa: ANN201
    # A short path: Unix socket names are limited to ~107 bytes.
    path = Path(f"/tmp/dl-sw-{os.getpid()}-{tmp_path.name[-12:]}.sock")
    yield path
    path.unlink(missing_ok=True)
    arena_path(path).unlink(missing_ok=True)


def test_workers_map_one_copy_and_detach(socket_path: Path) -> None:
    _, weights = tiny_weights(mxfp4=True)
    holder = WeightsHolder(socket_path, "tiny|float32", weights, CPU)
    holder.start()
    try:
        first = attach(socket_path, "tiny|float32", CPU, role="prefill", timeout_s=5)
        second = attach(socket_path, "tiny|float32", CPU, role="decode", timeout_s=5)
        same_tree(first.weights, weights)
        # Both views are the holder's arena, not copies: a write through one shows through the other.
        a, b = first.weights.layers[1].qkv_bias, second.weights.layers[1].qkv_bias
        assert a.data_ptr() != b.data_ptr()  # two mappings of ...
        a[0] += 1.0
        assert b[0] == a[0]  # ... one file
        a[0] -= 1.0
        _wait_for(lambda: len(holder.attached) == 2)
        assert holder.attached == [os.getpid(), os.getpid()] and holder.attaches == 2
        first.close()
        second.close()
        _wait_for(lambda: not holder.attached)
        assert holder.attached == []
        with pytest.raises(SharedWeightsError, match="serves tiny\\|float32, this worker needs other"):
            attach(socket_path, "other", CPU, timeout_s=5)
    finally:
        holder.close()
    assert not socket_path.exists() and not arena_path(socket_path).exists()
    started = time.monotonic()
    with pytest.raises(SharedWeightsError, match="no weights holder at"):
        attach(socket_path, "tiny|float32", CPU, timeout_s=1)
    assert time.monotonic() - started < 5  # bounded: never a hang


_WORKER = """
import os, sys, time
import torch
from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.reference.config import from_settings
from dynamo_lite.engines.reference.loader import model_config
from dynamo_lite.engines.reference.shared_weights import attach
from dynamo_lite.engines.reference.shared_weights.tree import flatten
from dynamo_lite.engines.reference.startup import resolve_quantization, weights_fingerprint_of
from dynamo_lite.model_files import resolve_model

folder, socket_path, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
config = from_settings(EngineSettings(model_path=folder, dtype="float32"))
files = resolve_model(config.model_path)
cfg = model_config(files.config)
resolve_quantization(config, files, cfg)
shared = attach(socket_path, weights_fingerprint_of(config, files, cfg), torch.device("cpu"), "decode", timeout)
shared.watch_owner()
total = sum(float(t.double().sum()) for t in flatten(shared.weights)[0].values())
print(f"ATTACHED {total!r}", flush=True)
while True:  # a worker computing with the weights until the holder goes
    time.sleep(0.1)
"""


def _start_worker(folder: Path, socket_path: Path, timeout: float = 60) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_WORKER), str(folder), str(socket_path), str(timeout)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip


def _read_until(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"no {prefix!r} line; stderr: {proc.stderr.read()[-3000:]}")


def _maps(pid: int, path: Path) -> bool:
    return str(path) in Path(f"/proc/{pid}/maps").read_text()


def test_restarted_worker_remaps_and_the_holders_death_ends_workers(tmp_path_factory, socket_path) -> None:  # noqa: ANN001
    """The holder process serves the tiny gpt-oss; a worker attaches (mapping the arena, not a copy), is killed
    with SIGKILL, restarts and maps the same arena (still one file, the same bytes); then the holder is killed
    with SIGKILL and the worker exits by itself with HOLDER_LOST_EXIT and a message saying why."""
    folder = tiny_folder(tmp_path_factory)
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    holder = subprocess.Popen(
        [sys.executable, "-m", "dynamo_lite.engines.reference.shared_weights", "--socket", str(socket_path),
         "--model-path", str(folder), "--dtype", "float32", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    workers: list[subprocess.Popen] = []
    try:
        _read_until(holder, "READY weights holder")
        arena = arena_path(socket_path)
        assert arena.exists()
        arena_inode = arena.stat().st_ino
        workers.append(_start_worker(folder, socket_path))
        first = _read_until(workers[0], "ATTACHED")
        assert _maps(workers[0].pid, arena)
        os.kill(workers[0].pid, signal.SIGKILL)
        assert workers[0].wait(timeout=30) == -signal.SIGKILL
        workers.append(_start_worker(folder, socket_path))  # the restart
        assert _read_until(workers[1], "ATTACHED") == first  # the same weights ...
        assert _maps(workers[1].pid, arena) and arena.stat().st_ino == arena_inode  # ... from the same arena
        shm = [p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("dynamo-lite-weights-")]
        assert shm.count(arena.name) == 1
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        assert workers[1].wait(timeout=30) == HOLDER_LOST_EXIT  # by itself, promptly: never a hang
        err = workers[1].stderr.read()
        assert (
            f"FATAL: weights holder pid {holder.pid} is gone" in err and "Restart the weights holder" in err
        )
        late = _start_worker(folder, socket_path, timeout=1)  # the holder is gone: a clear error, not a wait
        workers.append(late)
        assert late.wait(timeout=60) != 0 and "no weights holder at" in late.stderr.read()
    finally:
        for proc in [*workers, holder]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def _request(i: int, ids: list[int]) -> GenerateRequest:
    opts = SamplingOptions(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return GenerateRequest(request_id=f"r{i}", model="tiny-gpt-oss", token_ids=ids, sampling=opts)


async def _tokens(engine, ids: list[int], i: int) -> list[int]:  # noqa: ANN001
    async with aclosing(engine.generate(_request(i, ids))) as chunks:
        return [t async for c in chunks for t in c.token_ids]


async def test_engine_on_mapped_weights_gives_the_same_tokens(tmp_path_factory, socket_path) -> None:  # noqa: ANN001
    from dynamo_lite.engines.reference.config import from_settings
    from dynamo_lite.engines.reference.loader import model_config
    from dynamo_lite.engines.reference.startup import (
        build_weights,
        resolve_quantization,
        weights_fingerprint_of,
    )
    from dynamo_lite.model_files import resolve_model

    folder = tiny_folder(tmp_path_factory)
    base = dict(model_path=str(folder), dtype="float32", threads=2, max_batch_size=4, max_num_tokens=48,
                max_seq_len=128)  # fmt: skip
    config = from_settings(EngineSettings(**base))
    files = resolve_model(config.model_path)
    cfg = model_config(files.config)
    resolve_quantization(config, files, cfg)
    fingerprint = weights_fingerprint_of(config, files, cfg)
    holder = WeightsHolder(
        socket_path, fingerprint, build_weights(config, files, cfg, torch.float32, CPU), CPU
    )
    holder.start()
    some = prompts()[3:6]
    try:
        own = build_engine(EngineSettings(**base))
        mapped = build_engine(EngineSettings(**base, shared_weights=str(socket_path)))
        await own.start()
        await mapped.start()
        try:
            assert len(holder.attached) == 1
            want = await asyncio.gather(*(_tokens(own, ids, i) for i, ids in enumerate(some)))
            got = await asyncio.gather(*(_tokens(mapped, ids, i) for i, ids in enumerate(some)))
            assert got == want
        finally:
            await own.stop()
            await mapped.stop()
        await asyncio.to_thread(_wait_for, lambda: not holder.attached)
        assert holder.attached == []  # a clean detach on stop
    finally:
        holder.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")
def test_cuda_weights_map_across_processes(socket_path: Path) -> None:
    """On a GPU: a worker process maps the holder's device memory (no copy: its allocated memory stays ~0) and
    reads the same values."""
    dev = torch.device("cuda", 0)
    cfg = GptOssConfig.from_dict(gpt_oss_config(**{**TINY_SHAPE, "vocab_size": 512}))
    weights = random_gpt_oss_weights(cfg, torch.bfloat16, dev, mxfp4=True)
    holder = WeightsHolder(socket_path, "tiny|cuda", weights, dev)
    holder.start()
    script = f"""
import torch
from dynamo_lite.engines.reference.shared_weights import attach
from dynamo_lite.engines.reference.shared_weights.tree import flatten
w = attach({str(socket_path)!r}, "tiny|cuda", torch.device("cuda", 0), timeout_s=30)
total = sum(float(t.double().sum()) for t in flatten(w.weights)[0].values())
print("ALLOCATED", torch.cuda.memory_allocated(), "TOTAL", repr(total))
"""
    try:
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": _pythonpath()}, cwd=ROOT)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        words = run.stdout.split()
        expected = sum(float(t.double().sum()) for t in flatten(weights)[0].values())
        assert int(words[words.index("ALLOCATED") + 1]) < 1 << 20
        assert float(words[words.index("TOTAL") + 1]) == expected
    finally:
        holder.close()
