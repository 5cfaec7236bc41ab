"""CUDA IPC KV handoff: copy planning, the device pool, and the exporter/importer protocol with its fallbacks.

Without a GPU the runtime is a host-memory fake (``FakeRuntime``): "device memory" is ctypes buffers, an IPC
handle names one, and pitched copies are row-by-row memmoves, so everything above the runtime calls (what is
copied where, which transport is chosen, when a pool range is freed) runs for real. ``test_real_cuda_*`` run
on a GPU only.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
import torch

from dynamo_lite.kv import cuda_ipc
from dynamo_lite.kv.config import KvTransferConfig
from dynamo_lite.kv.cuda_ipc import CudaKvPool, CudaSource, contiguous_strides, plan_copies
from dynamo_lite.kv.errors import KvPullError, KvTransferError
from dynamo_lite.kv.exporter import KvExporter
from dynamo_lite.kv.importer import pull_kv, release_kv
from dynamo_lite.kv.layout import KvLayout
from dynamo_lite.protocol import KvDescriptor, decode, encode

LAYOUT = KvLayout(num_layers=4, num_kv_heads=3, head_dim=16, dtype="float32", num_tokens=40)
CPU = torch.device("cpu")


class _Event:
    def __init__(self, log: list[str]) -> None:
        self._log = log

    def synchronize(self) -> None:
        self._log.append("event.synchronize")


class FakeRuntime:
    """Host memory standing in for device memory; the CPU device plays GPU 0."""

    def __init__(self, visible_gpus: int = 1, peer: bool = True) -> None:
        self.buffers: dict[int, Any] = {}
        self.device = 0
        self.visible = visible_gpus
        self.peer = peer
        self.log: list[str] = []

    def usable(self, device: Any) -> int:
        return 0 if getattr(device, "type", None) == "cpu" else -1

    def get_device(self) -> int:
        return self.device

    def set_device(self, index: int) -> None:
        self.device = index

    def malloc(self, nbytes: int) -> int:
        buf = (ctypes.c_ubyte * nbytes)()
        ptr = ctypes.addressof(buf)
        self.buffers[ptr] = buf
        return ptr

    def free(self, ptr: int) -> None:
        del self.buffers[ptr]
        self.log.append("free")

    def ipc_handle(self, ptr: int) -> bytes:
        return b"fake" + ptr.to_bytes(8, "little") + bytes(52)

    def ipc_open(self, handle: bytes) -> int:
        self.log.append("ipc_open")
        return int.from_bytes(handle[4:12], "little")

    def ipc_close(self, ptr: int) -> None:
        self.log.append("ipc_close")

    def memcpy_2d_async(
        self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream: int
    ) -> None:
        self.log.append("memcpy2d")
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)

    def stream(self, index: int) -> int:
        return 0

    def record_event(self, index: int, timing: bool = False) -> Any:
        return _Event(self.log)

    def synchronize(self, index: int) -> None:
        self.log.append("synchronize")

    def as_tensor(self, ptr: int, nbytes: int, index: int) -> Any:
        return torch.frombuffer((ctypes.c_ubyte * nbytes).from_address(ptr), dtype=torch.uint8)

    def gpu_uuid(self, index: int) -> str:
        return f"fake-gpu-{index}"

    def index_of_uuid(self, uuid: str) -> int:
        for i in range(self.visible):
            if self.gpu_uuid(i) == uuid:
                return i
        return -1

    def can_access_peer(self, index: int, peer: int) -> bool:
        return self.peer


@pytest.fixture
def fake() -> Iterator[FakeRuntime]:
    rt = FakeRuntime()
    cuda_ipc.set_runtime(rt)
    yield rt
    cuda_ipc.close_all()
    cuda_ipc.set_runtime(None)
    cuda_ipc.ALLOW_LOCAL_SHORTCUT = True


@pytest.fixture
async def exporter(fake: FakeRuntime) -> AsyncIterator[KvExporter]:
    exp = KvExporter(KvTransferConfig(lease_s=5.0))
    await exp.start()
    exp.use_cuda_pool(CudaKvPool(0, 8 << 20, fake))
    yield exp
    await exp.stop()


def _execute(plan: list[cuda_ipc.Copy2D], dst: torch.Tensor, src: torch.Tensor) -> None:
    for c in plan:
        for row in range(c.height):
            ctypes.memmove(
                dst.data_ptr() + c.dst_offset + row * c.dst_pitch,
                src.data_ptr() + c.src_offset + row * c.src_pitch,
                c.width,
            )


def _cache_and_slot(n: int, slot: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache like the engine's, ``[layers, 2, slots, kv_heads, max_seq, head_dim]``, and one slot's first
    ``n`` positions as ``[layers, 2, kv_heads, n, head_dim]``."""
    cache = torch.zeros(LAYOUT.num_layers, 2, 5, LAYOUT.num_kv_heads, 64, LAYOUT.head_dim)
    return cache, cache[:, :, slot, :, :n]


# ---- copy planning ----


def test_plan_fills_a_cache_slot_exactly() -> None:
    cache, slot = _cache_and_slot(LAYOUT.num_tokens)
    src = torch.randn(LAYOUT.shape)
    plan = plan_copies(LAYOUT.shape, slot.stride(), contiguous_strides(LAYOUT.shape), 4)
    _execute(plan, slot, src)
    assert torch.equal(slot, src)
    untouched = cache.clone()
    untouched[:, :, 2, :, : LAYOUT.num_tokens] = 0
    assert not untouched.any()  # nothing outside the slot's positions was written
    # (layers, K|V) merge into one dimension of 8 rows; the 3 kv heads are looped over: 3 copies, not 24.
    assert len(plan) == 3 and all(c.height == 8 for c in plan)


def test_plan_reads_a_cache_slot_and_merges_contiguous_dims() -> None:
    cache, slot = _cache_and_slot(LAYOUT.num_tokens)
    cache.normal_()
    out = torch.empty(LAYOUT.shape)
    _execute(plan_copies(LAYOUT.shape, contiguous_strides(LAYOUT.shape), slot.stride(), 4), out, slot)
    assert torch.equal(out, slot)
    full = torch.randn(3, 4, 5)
    dense = torch.empty(3, 4, 5)
    plan = plan_copies((3, 4, 5), dense.stride(), full.stride(), 4)
    assert len(plan) == 1 and plan[0].width == 3 * 4 * 5 * 4 and plan[0].height == 1
    _execute(plan, dense, full)
    assert torch.equal(dense, full)


def test_plan_keeps_pitches_within_the_limit() -> None:
    cache, slot = _cache_and_slot(LAYOUT.num_tokens)
    src = torch.randn(LAYOUT.shape)
    contiguous = contiguous_strides(LAYOUT.shape)
    # Rows over (layers, K|V) have a pitch of 5 slots x 3 heads x 64 x 16 x 4 bytes: forbid it, then every pitch.
    for limit, copies in ((slot.stride(1) * 4 - 1, 8), (16, 24)):
        slot.zero_()
        plan = plan_copies(LAYOUT.shape, slot.stride(), contiguous, 4, max_pitch=limit)
        assert len(plan) == copies and all(c.height == 1 or c.dst_pitch <= limit for c in plan)
        _execute(plan, slot, src)
        assert torch.equal(slot, src)


def test_plan_refuses_a_strided_innermost_dimension() -> None:
    t = torch.zeros(4, 6)[:, ::2]
    with pytest.raises(ValueError):
        plan_copies((4, 3), t.stride(), (3, 1), 4)


# ---- the pool ----


def test_pool_allocates_first_fit_and_coalesces(fake: FakeRuntime) -> None:
    pool = CudaKvPool(0, 1 << 20, fake)
    a, b, c = pool.alloc(100_000), pool.alloc(200_000), pool.alloc(300_000)
    assert a == 0 and b is not None and c is not None and a < b < c
    assert pool.alloc(1 << 20) is None
    pool.release(b)
    assert pool.alloc(150_000) == b  # the freed hole is reused
    pool.release(a)
    pool.release(b)
    pool.release(c)
    assert pool.free_bytes == pool.nbytes and pool.alloc(pool.nbytes) == 0  # one range again
    pool.close()
    assert fake.log[-1] == "free"


def test_descriptor_carries_cuda_fields_and_old_ones_still_decode() -> None:
    desc = KvDescriptor("t", "torch", 4, 64, cuda_ipc=b"\x01\x02", device_index=1, gpu_uuid="GPU-x")
    back = decode(encode(desc), KvDescriptor)
    assert (back.cuda_ipc, back.device_index, back.gpu_uuid) == (b"\x01\x02", 1, "GPU-x")
    plain = decode(encode(KvDescriptor("t", "torch", 4, 64, shm_name="s")), KvDescriptor)
    assert plain.cuda_ipc == b"" and plain.device_index == -1


# ---- the protocol ----


async def _publish(exporter: KvExporter) -> tuple[KvDescriptor, torch.Tensor]:
    hold = exporter.allocate(LAYOUT, "req")
    assert hold.on_device and hold.shm_name == ""
    src = torch.randn(LAYOUT.shape)
    hold.tensor().copy_(src)
    return exporter.publish(hold), src


async def test_cuda_ipc_pull_copies_into_the_slot_and_frees_the_range(
    exporter: KvExporter, fake: FakeRuntime
) -> None:
    pool = exporter.cuda_pool
    assert pool is not None
    desc, src = await _publish(exporter)
    assert desc.cuda_ipc and desc.gpu_uuid == "fake-gpu-0" and desc.device_index == 0
    assert "synchronize" in fake.log  # the writes were waited for before the descriptor left
    assert pool.free_bytes < pool.nbytes
    pulled = await pull_kv(desc, exporter.config, device=CPU)
    assert pulled.transport == "cuda_ipc" and pulled.buffer is None
    with pytest.raises(ValueError):
        pulled.tensor()
    cache, slot = _cache_and_slot(LAYOUT.num_tokens)
    pulled.write_into(slot)
    assert torch.equal(slot, src)
    assert "event.synchronize" not in fake.log
    pulled.close()
    assert fake.log[-1] == "event.synchronize"  # waited for the copy before saying DONE
    deadline = time.monotonic() + 2
    while exporter.held_count and time.monotonic() < deadline:
        await _tick()
    assert exporter.held_count == 0 and pool.free_bytes == pool.nbytes
    assert exporter.stats.cuda_transfers == 1


async def test_remote_pool_is_opened_once_per_process(exporter: KvExporter, fake: FakeRuntime) -> None:
    cuda_ipc.ALLOW_LOCAL_SHORTCUT = False  # act as another process: go through ipc_open
    for _ in range(3):
        desc, src = await _publish(exporter)
        async with await pull_kv(desc, exporter.config, device=CPU) as pulled:
            out = torch.empty(LAYOUT.shape)
            pulled.write_into(out)
            assert torch.equal(out, src)
    assert fake.log.count("ipc_open") == 1


async def test_invisible_gpu_falls_back_to_staging_through_shm(exporter: KvExporter) -> None:
    desc, src = await _publish(exporter)
    other_gpu = msgspec.structs.replace(desc, gpu_uuid="GPU-of-another-container")
    cuda_ipc.ALLOW_LOCAL_SHORTCUT = False
    async with await pull_kv(other_gpu, exporter.config, device=CPU) as pulled:
        assert pulled.transport == "staged"
        assert torch.equal(pulled.tensor(), src)
    await _until_freed(exporter)
    assert exporter.stats.shm_transfers == 1 and exporter.cuda_pool.free_bytes == exporter.cuda_pool.nbytes


async def test_no_peer_access_falls_back_to_staging(exporter: KvExporter, fake: FakeRuntime) -> None:
    fake.visible, fake.peer = 2, False
    desc, src = await _publish(exporter)
    on_gpu1 = msgspec.structs.replace(desc, gpu_uuid="fake-gpu-1")
    cuda_ipc.ALLOW_LOCAL_SHORTCUT = False
    async with await pull_kv(on_gpu1, exporter.config, device=CPU) as pulled:
        assert pulled.transport == "staged"
        assert torch.equal(pulled.tensor(), src)


async def test_cpu_consumer_and_other_hosts_get_host_copies(exporter: KvExporter) -> None:
    desc, src = await _publish(exporter)
    async with await pull_kv(desc, exporter.config) as pulled:  # no device: a CPU engine
        assert pulled.transport == "staged"
        assert torch.equal(pulled.tensor(), src)
    desc, src = await _publish(exporter)
    elsewhere = msgspec.structs.replace(desc, host_id="another-machine")
    async with await pull_kv(elsewhere, exporter.config, device=CPU) as pulled:
        assert pulled.transport == "tcp"
        out = torch.empty(LAYOUT.shape)
        pulled.write_into(out)
        assert torch.equal(out, src)
    await _until_freed(exporter)
    assert exporter.stats.tcp_transfers == 1


async def test_a_hold_is_pulled_once_and_release_frees_the_range(exporter: KvExporter) -> None:
    desc, _ = await _publish(exporter)
    async with await pull_kv(desc, exporter.config, device=CPU):
        with pytest.raises(KvPullError, match="CLAIMED|UNKNOWN"):
            await pull_kv(desc, exporter.config, device=CPU)
    desc, _ = await _publish(exporter)
    assert await release_kv(desc, exporter.config)
    await _until_freed(exporter)
    assert exporter.cuda_pool.free_bytes == exporter.cuda_pool.nbytes


async def test_a_full_pool_falls_back_to_host_memory(fake: FakeRuntime) -> None:
    exp = KvExporter(KvTransferConfig())
    await exp.start()
    try:
        exp.use_cuda_pool(CudaKvPool(0, 1 << 16, fake))  # one 64 KiB range; LAYOUT needs 30 KiB
        first = exp.allocate(LAYOUT, "a")
        second = exp.allocate(LAYOUT, "b")
        assert first.on_device and not second.on_device and second.shm_name
        desc = exp.publish(second)
        assert not desc.cuda_ipc and desc.shm_name
    finally:
        await exp.stop()


async def test_a_malformed_reference_is_a_pull_error(exporter: KvExporter) -> None:
    desc, _ = await _publish(exporter)
    with pytest.raises(KvPullError, match="cuda_ipc"):
        await pull_kv(msgspec.structs.replace(desc, cuda_ipc=b"\xc1garbage"), exporter.config, device=CPU)
    ref = cuda_ipc.decode_ref(desc.cuda_ipc)
    beyond = cuda_ipc.encode_ref(msgspec.structs.replace(ref, offset=ref.pool_nbytes))
    with pytest.raises(KvPullError, match="outside"):
        await pull_kv(msgspec.structs.replace(desc, cuda_ipc=beyond), exporter.config, device=CPU)


async def test_windowed_layout_copies_both_parts_from_their_offsets(
    exporter: KvExporter, fake: FakeRuntime
) -> None:
    """gpt-oss KV (full layers, then the windowed layers' ring) lands in two cache groups, each from its offset
    in the hold."""
    layout = KvLayout(4, 3, 16, "float32", 40, window=8, windowed_layers=(0, 2))
    hold = exporter.allocate(layout, "req-w")
    srcs = [torch.randn(shape) for shape, _ in layout.parts]
    for part, src in zip(hold.tensors(), srcs, strict=True):
        part.copy_(src)
    desc = exporter.publish(hold)
    cuda_ipc.ALLOW_LOCAL_SHORTCUT = False
    full_cache = torch.zeros(2, 2, 5, 3, 64, 16)  # [layers, K|V, slots, kv heads, max_seq, D]
    ring_cache = torch.zeros(2, 2, 5, 3, 8, 16)
    async with await pull_kv(desc, exporter.config, device=CPU) as pulled:
        assert pulled.transport == "cuda_ipc"
        pulled.write_into([full_cache[:, :, 3, :, :40], ring_cache[:, :, 3]])
    assert torch.equal(full_cache[:, :, 3, :, :40], srcs[0]) and torch.equal(ring_cache[:, :, 3], srcs[1])
    assert full_cache[:, :, :3].abs().sum() == 0 and ring_cache[:, :, 4].abs().sum() == 0
    await _until_freed(exporter)


async def test_each_rank_copies_its_kv_heads_out_of_the_hold(exporter: KvExporter, fake: FakeRuntime) -> None:
    """A ranked decode engine: every rank opens the prefill's pool itself and its GPU copies only its KV heads of
    every layer (a strided part of the hold: ``copy_into(src_strides=...)``) into its own cache slot, both parts
    of a windowed layout from their offsets; the claim (rank 0's pull) stays open until they are done."""
    from types import SimpleNamespace

    from dynamo_lite.engines.reference.rank_comm import KvWrite
    from dynamo_lite.engines.reference.rank_runner import RankState

    layout = KvLayout(4, 3, 16, "float32", 40, window=8, windowed_layers=(0, 2))
    hold = exporter.allocate(layout, "req-r")
    srcs = [torch.randn(shape) for shape, _ in layout.parts]
    for part, src in zip(hold.tensors(), srcs, strict=True):
        part.copy_(src)
    desc = exporter.publish(hold)
    cuda_ipc.ALLOW_LOCAL_SHORTCUT = False  # the ranks are other processes
    async with await pull_kv(desc, exporter.config, device=CPU) as pulled:
        assert pulled.transport == "cuda_ipc" and (pulled.cuda_ipc, pulled.gpu_uuid) == (
            desc.cuda_ipc,
            "fake-gpu-0",
        )
        cmd = KvWrite(3, 40, -1, "", layout, pulled.cuda_ipc, pulled.gpu_uuid)
        for h0, h1 in ((0, 1), (1, 3)):  # two ranks' KV heads (any ranges: one, then two heads)
            full = torch.zeros(
                2, 2, 5, h1 - h0, 64, 16
            )  # [layers, K|V, slots, this rank's heads, max_seq, D]
            ring = torch.zeros(2, 2, 5, h1 - h0, 8, 16)
            mine = [full[:, :, 3, :, :40], ring[:, :, 3]]
            rank = SimpleNamespace(device=CPU)
            moved = RankState._copy_from_gpu_pool(rank, cmd, mine, (h0, h1))  # type: ignore[arg-type]
            assert moved == layout.nbytes * (h1 - h0) // 3
            assert torch.equal(mine[0], srcs[0][:, :, h0:h1]) and torch.equal(mine[1], srcs[1][:, :, h0:h1])
            assert full[:, :, :3].abs().sum() == 0 and full[:, :, :, :, 40:].abs().sum() == 0
        assert exporter.held_count == 1  # rank 0's claim holds it until every rank reported
    await _until_freed(exporter)


async def test_each_rank_writes_its_kv_heads_into_the_export_hold(
    exporter: KvExporter, fake: FakeRuntime
) -> None:
    """A ranked prefill engine exporting into a device hold: each rank opens rank 0's pool (by the hold's
    ``cuda_ref``) and writes only its KV heads of every layer into it (``copy_from`` a strided part of its cache
    into a strided part of the hold); the published hold then holds every head."""
    from types import SimpleNamespace

    from dynamo_lite.engines.reference.rank_comm import KvRead
    from dynamo_lite.engines.reference.rank_runner import RankState

    layout = KvLayout(4, 3, 16, "float32", 40, window=8, windowed_layers=(0, 2))
    srcs = [torch.randn(shape) for shape, _ in layout.parts]  # what the ranks' caches hold, all heads
    hold = exporter.allocate(layout, "req-x")
    cuda_ipc.ALLOW_LOCAL_SHORTCUT = False  # the ranks are other processes
    cmd = KvRead(3, 40, -1, "", layout, *hold.cuda_ref())
    for h0, h1 in ((0, 1), (1, 3)):
        full = torch.zeros(2, 2, 5, h1 - h0, 64, 16)  # [layers, K|V, slots, this rank's heads, max_seq, D]
        ring = torch.zeros(2, 2, 5, h1 - h0, 8, 16)
        mine = [full[:, :, 3, :, :40], ring[:, :, 3]]
        mine[0].copy_(srcs[0][:, :, h0:h1])
        mine[1].copy_(srcs[1][:, :, h0:h1])
        rank = SimpleNamespace(device=CPU)
        moved = RankState._copy_into_gpu_hold(rank, cmd, mine, (h0, h1))  # type: ignore[arg-type]
        assert moved == layout.nbytes * (h1 - h0) // 3
    desc = exporter.publish(hold)
    async with await pull_kv(desc, exporter.config, device=CPU) as pulled:
        got = [torch.zeros(shape) for shape, _ in layout.parts]
        pulled.write_into(got)
    assert all(torch.equal(g, src) for g, src in zip(got, srcs, strict=True))
    await _until_freed(exporter)
    exporter.use_cuda_pool(None)  # host memory from here on: no reference to hand out
    host = exporter.allocate(layout, "req-host")
    with pytest.raises(KvTransferError, match="not a CUDA hold"):
        host.cuda_ref()
    exporter.release(host.transfer_id)


def test_copy_into_checks_the_destination(fake: FakeRuntime) -> None:
    pool = CudaKvPool(0, 1 << 20, fake)
    source = CudaSource(pool.ptr, LAYOUT.nbytes, 0, fake)
    with pytest.raises(ValueError):
        source.copy_into(torch.empty(1, 2, 3), LAYOUT.shape, 4)
    with pytest.raises(ValueError, match="outside"):  # a part reaching past the hold
        source.copy_into(torch.empty(LAYOUT.shape), LAYOUT.shape, 4, src_offset=64)
    strides = contiguous_strides(LAYOUT.shape)
    heads = (LAYOUT.num_layers, 2, 2, LAYOUT.num_tokens, LAYOUT.head_dim)  # 2 of the 3 heads
    with pytest.raises(ValueError, match="outside"):  # heads 1..2 start one head in: 2..3 would reach past it
        source.copy_into(torch.empty(heads), heads, 4, src_offset=2 * 40 * 16 * 4, src_strides=strides)
    with pytest.raises(ValueError, match="hold strides"):
        source.copy_into(torch.empty(heads), heads, 4, src_strides=strides[1:])
    pool.close()


async def _tick() -> None:
    import asyncio

    await asyncio.sleep(0.01)


async def _until_freed(exporter: KvExporter) -> None:
    deadline = time.monotonic() + 2
    while exporter.held_count and time.monotonic() < deadline:
        await _tick()
    assert exporter.held_count == 0


# ---- on a real GPU ----

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
async def test_real_cuda_handoff_within_one_process() -> None:
    cuda_ipc.set_runtime(None)
    exp = KvExporter(KvTransferConfig())
    await exp.start()
    try:
        exp.use_cuda_pool(CudaKvPool(0, 64 << 20))
        hold = exp.allocate(LAYOUT, "r")
        src = torch.randn(LAYOUT.shape, device="cuda:0")
        hold.tensor().copy_(src)
        desc = exp.publish(hold)
        _, slot = _cache_and_slot(LAYOUT.num_tokens)
        slot_cuda = torch.zeros_like(slot.contiguous(), device="cuda:0")
        cache = torch.zeros(
            LAYOUT.num_layers, 2, 5, LAYOUT.num_kv_heads, 64, LAYOUT.head_dim, device="cuda:0"
        )
        async with await pull_kv(desc, exp.config, device=torch.device("cuda:0")) as pulled:
            assert pulled.transport == "cuda_ipc"
            pulled.write_into(cache[:, :, 1, :, : LAYOUT.num_tokens])
            pulled.write_into(slot_cuda)
        torch.cuda.synchronize()
        assert torch.equal(cache[:, :, 1, :, : LAYOUT.num_tokens], src) and torch.equal(slot_cuda, src)
    finally:
        await exp.stop()
