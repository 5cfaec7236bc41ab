"""KV handoff between an exporter and an importer on one event loop: both transports, every refusal path."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import numpy as np
import pytest

from dynamo_lite.kv import checksum as ck
from dynamo_lite.kv import shm
from dynamo_lite.kv.config import KvTransferConfig
from dynamo_lite.kv.errors import KvCapacityError, KvPullError, KvTransferError
from dynamo_lite.kv.exporter import KvExporter
from dynamo_lite.kv.importer import pull_kv, release_kv
from dynamo_lite.kv.layout import KvLayout
from dynamo_lite.kv.selftest import pattern
from dynamo_lite.protocol import KvDescriptor

SMALL = KvLayout(num_layers=4, num_kv_heads=2, head_dim=16, dtype="float32", num_tokens=64)  # 32 KiB
MEDIUM = KvLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype="float32", num_tokens=96)  # 4.4 MB

MakeExporter = Callable[..., Awaitable[KvExporter]]


@pytest.fixture
async def make_exporter() -> AsyncIterator[MakeExporter]:
    started: list[KvExporter] = []

    async def make(**overrides: object) -> KvExporter:
        exporter = KvExporter(KvTransferConfig(**overrides))
        await exporter.start()
        started.append(exporter)
        return exporter

    yield make
    for exporter in started:
        await exporter.stop()
        assert exporter.held_bytes == 0 and exporter.held_count == 0


def publish(exporter: KvExporter, layout: KvLayout = SMALL, seed: int = 7) -> KvDescriptor:
    hold = exporter.allocate(layout, "req-1")
    np.frombuffer(hold.buffer, np.uint8)[:] = pattern(layout.nbytes, seed)
    return exporter.publish(hold)


async def until(predicate: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def tcp_only() -> KvTransferConfig:
    return KvTransferConfig(use_shm=False)


@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
@pytest.mark.parametrize("layout", [SMALL, MEDIUM], ids=["32KiB", "4MB"])
async def test_round_trip_moves_every_byte_and_frees(
    make_exporter: MakeExporter, use_shm: bool, layout: KvLayout
):
    exporter = await make_exporter(use_shm=use_shm)
    desc = publish(exporter, layout)
    assert bool(desc.shm_name) == use_shm and desc.nbytes == layout.nbytes and desc.secret
    assert exporter.held_bytes == layout.nbytes and exporter.held_count == 1

    async with await pull_kv(desc, KvTransferConfig(use_shm=use_shm)) as pulled:
        assert pulled.transport == ("shm" if use_shm else "tcp")
        assert pulled.layout == layout and pulled.nbytes == layout.nbytes and pulled.seconds > 0
        assert pulled.buffer.readonly
        assert np.array_equal(np.frombuffer(pulled.buffer, np.uint8), pattern(layout.nbytes, 7))
        dest = np.zeros(layout.nbytes, np.uint8)
        pulled.copy_into(dest)
        assert np.array_equal(dest, pattern(layout.nbytes, 7))

    await until(lambda: exporter.held_bytes == 0)
    assert exporter.held_count == 0
    if use_shm:
        assert not shm.exists(desc.shm_name)
    stats = exporter.stats
    assert (stats.transfers, stats.bytes) == (1, layout.nbytes)
    assert (stats.shm_transfers, stats.tcp_transfers) == ((1, 0) if use_shm else (0, 1))


async def test_shm_hold_served_over_tcp_to_an_importer_without_shm(make_exporter: MakeExporter) -> None:
    exporter = await make_exporter(use_shm=True)
    desc = publish(exporter)
    async with await pull_kv(desc, tcp_only()) as pulled:
        assert pulled.transport == "tcp"
        assert bytes(pulled.buffer) == pattern(SMALL.nbytes, 7).tobytes()
    await until(lambda: exporter.held_count == 0)
    assert not shm.exists(desc.shm_name)


async def test_a_shared_tcp_pull_lands_in_a_segment_others_can_map(make_exporter: MakeExporter) -> None:
    """``shared=True`` (a ranked engine): bytes fetched over TCP land in a shared-memory segment of the
    importer's own, which another process may map by name while the pull is open; close unlinks it."""
    exporter = await make_exporter(use_shm=False)  # e.g. a prefill worker on another host: TCP only
    desc = publish(exporter)
    assert not desc.shm_name
    with await pull_kv(desc, KvTransferConfig(), shared=True) as pulled:
        name = pulled.shm_name
        assert pulled.transport == "tcp" and name and shm.exists(name)
        other = shm.ShmSegment.attach(name, SMALL.nbytes)  # what a follower rank does
        assert bytes(other.buffer) == pattern(SMALL.nbytes, 7).tobytes()
        other.close()
    assert pulled.shm_name == "" and not shm.exists(name)
    with await pull_kv(publish(exporter), KvTransferConfig()) as private:  # not shared: private memory
        assert private.transport == "tcp" and private.shm_name == ""


async def test_torch_views_write_in_place_and_outlive_close(make_exporter: MakeExporter) -> None:
    torch = pytest.importorskip("torch")
    exporter = await make_exporter()
    hold = exporter.allocate(SMALL, "req-t")
    kv = torch.randn(SMALL.shape)
    hold.tensor().copy_(kv)
    desc = exporter.publish(hold)
    with await pull_kv(desc) as pulled:
        view = pulled.tensor()
        assert view.shape == SMALL.shape and view.dtype == torch.float32
    assert torch.equal(view, kv)  # still readable: the tensor keeps the mapping alive after close/unlink
    await until(lambda: exporter.held_bytes == 0)


@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
async def test_windowed_layout_moves_its_two_parts(make_exporter: MakeExporter, use_shm: bool) -> None:
    """A gpt-oss-like KV: full layers hold every position, windowed layers only their ring of 16."""
    torch = pytest.importorskip("torch")
    layout = KvLayout(4, 2, 16, "float32", 40, window=16, windowed_layers=(0, 2))
    exporter = await make_exporter(use_shm=use_shm)
    hold = exporter.allocate(layout, "req-w")
    full, windowed = torch.randn(2, 2, 2, 40, 16), torch.randn(2, 2, 2, 16, 16)
    for part, src in zip(hold.tensors(), (full, windowed), strict=True):
        part.copy_(src)
    desc = exporter.publish(hold)
    assert (desc.nbytes, desc.window, desc.windowed_layers) == (layout.nbytes, 16, [0, 2])
    async with await pull_kv(desc, KvTransferConfig(use_shm=use_shm)) as pulled:
        assert pulled.layout == layout and pulled.nbytes == layout.nbytes < layout.all_full_nbytes
        got_full, got_windowed = torch.zeros(2, 2, 2, 40, 16), torch.zeros(2, 2, 2, 16, 16)
        pulled.write_into([got_full, got_windowed])
        assert torch.equal(got_full, full) and torch.equal(got_windowed, windowed)
        with pytest.raises(ValueError, match="parts"):
            pulled.write_into(got_full)
    await until(lambda: exporter.held_bytes == 0)
    assert exporter.stats.bytes == layout.nbytes


@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
async def test_wrong_secret_is_refused_without_consuming_the_hold(make_exporter: MakeExporter, use_shm: bool):
    exporter = await make_exporter(use_shm=use_shm)
    desc = publish(exporter)
    for secret in ("x" * len(desc.secret), "", desc.secret[:-1]):
        with pytest.raises(KvPullError, match="DENIED"):
            await pull_kv(msgspec.structs.replace(desc, secret=secret), KvTransferConfig(use_shm=use_shm))
    assert exporter.stats.rejected == 3 and exporter.held_count == 1
    with await pull_kv(desc, KvTransferConfig(use_shm=use_shm)) as pulled:
        assert np.array_equal(np.frombuffer(pulled.buffer, np.uint8), pattern(SMALL.nbytes, 7))


async def test_double_claim_is_refused(make_exporter: MakeExporter) -> None:
    exporter = await make_exporter()
    desc = publish(exporter)
    first = await pull_kv(desc)
    with pytest.raises(KvPullError, match="CLAIMED"):
        await pull_kv(desc)
    with pytest.raises(KvPullError, match="CLAIMED"):
        await pull_kv(desc, tcp_only())
    first.close()
    await until(lambda: exporter.held_count == 0)
    with pytest.raises(KvPullError, match="UNKNOWN"):  # served and freed: gone for good
        await pull_kv(desc)


async def test_tcp_pull_is_one_shot(make_exporter: MakeExporter) -> None:
    exporter = await make_exporter(use_shm=False)
    desc = publish(exporter)
    (await pull_kv(desc)).close()
    with pytest.raises(KvPullError, match="UNKNOWN"):
        await pull_kv(desc)


@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
async def test_expired_lease_frees_and_pull_fails(make_exporter: MakeExporter, use_shm: bool) -> None:
    exporter = await make_exporter(use_shm=use_shm, lease_s=0.2)
    desc = publish(exporter)
    assert desc.lease_s == 0.2
    await until(lambda: exporter.held_bytes == 0, within=1.0)
    assert exporter.held_count == 0 and exporter.stats.expired == 1
    if use_shm:
        assert not shm.exists(desc.shm_name)
    with pytest.raises(KvPullError, match="UNKNOWN"):
        await pull_kv(desc, KvTransferConfig(use_shm=use_shm))


async def test_unpublished_hold_expires_too(make_exporter: MakeExporter) -> None:
    exporter = await make_exporter(lease_s=0.2)
    hold = exporter.allocate(SMALL, "engine-crashed-mid-prefill")
    assert exporter.held_bytes == SMALL.nbytes
    await until(lambda: exporter.held_bytes == 0, within=1.0)
    with pytest.raises(KvTransferError, match="not held"):
        exporter.publish(hold)


async def test_claimed_hold_is_freed_when_the_importer_vanishes(make_exporter: MakeExporter) -> None:
    exporter = await make_exporter()
    pulled = await pull_kv(publish(exporter))
    pulled._sock.close()  # the importer process died: its connection drops without "done"
    await until(lambda: exporter.held_bytes == 0)
    assert exporter.stats.failed == 1 and exporter.stats.transfers == 0
    pulled.close()


@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
async def test_release_frees_now(make_exporter: MakeExporter, use_shm: bool) -> None:
    exporter = await make_exporter(use_shm=use_shm)
    desc = publish(exporter)
    assert exporter.release(desc.transfer_id) is True
    assert exporter.held_bytes == 0 and exporter.held_count == 0 and exporter.stats.released == 1
    if use_shm:
        assert not shm.exists(desc.shm_name)
    assert exporter.release(desc.transfer_id) is False
    with pytest.raises(KvPullError, match="UNKNOWN"):
        await pull_kv(desc, KvTransferConfig(use_shm=use_shm))


async def test_engine_threads_allocate_and_publish_concurrently(make_exporter: MakeExporter) -> None:
    exporter = await make_exporter(max_held_bytes=SMALL.nbytes * 6)

    def engine_thread(i: int) -> KvDescriptor | None:
        try:
            return publish(exporter, seed=i)
        except KvCapacityError:
            return None

    descs = await asyncio.gather(*(asyncio.to_thread(engine_thread, i) for i in range(10)))
    published = [d for d in descs if d is not None]
    assert len(published) == 6 and exporter.held_bytes == SMALL.nbytes * 6  # never over the limit
    for d in published:
        with await pull_kv(d) as pulled:
            seed = descs.index(d)
            assert np.array_equal(np.frombuffer(pulled.buffer, np.uint8), pattern(SMALL.nbytes, seed))
    await until(lambda: exporter.held_bytes == 0)


async def test_capacity_limits(make_exporter: MakeExporter) -> None:
    exporter = await make_exporter(max_held_bytes=SMALL.nbytes * 2, max_transfer_bytes=SMALL.nbytes * 2)
    exporter.allocate(SMALL, "a")
    exporter.allocate(SMALL, "b")
    with pytest.raises(KvCapacityError, match="max_held_bytes"):
        exporter.allocate(SMALL, "c")
    with pytest.raises(KvCapacityError, match="max_transfer_bytes"):
        exporter.allocate(MEDIUM, "d")
    assert exporter.held_bytes == SMALL.nbytes * 2 and exporter.held_count == 2


@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
async def test_bytes_changed_after_publish_are_detected(make_exporter: MakeExporter, use_shm: bool) -> None:
    exporter = await make_exporter(use_shm=use_shm)
    hold = exporter.allocate(MEDIUM, "req-c")
    np.frombuffer(hold.buffer, np.uint8)[:] = pattern(MEDIUM.nbytes, 3)
    desc = exporter.publish(hold)
    hold.buffer[MEDIUM.nbytes // 2] ^= 0x01  # one flipped bit
    with pytest.raises(KvPullError, match="corrupt"):
        await pull_kv(desc, KvTransferConfig(use_shm=use_shm, verify_shm=True))
    await until(lambda: exporter.held_count == 0)


async def test_shm_checksum_can_be_skipped(make_exporter: MakeExporter) -> None:
    exporter = await make_exporter()
    desc = publish(exporter)
    with await pull_kv(desc, KvTransferConfig(verify_shm=False)) as pulled:
        assert pulled.transport == "shm"
        assert np.array_equal(np.frombuffer(pulled.buffer, np.uint8), pattern(SMALL.nbytes, 7))


async def test_corruption_on_the_wire_is_detected(make_exporter: MakeExporter) -> None:
    exporter = await make_exporter(use_shm=False)
    desc = publish(exporter, MEDIUM)

    async def flip_one_byte(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(desc.host, desc.port)
        writer_to_up = asyncio.create_task(_pump(reader, up_w, None))
        await _pump(up_r, writer, 100_000)
        writer_to_up.cancel()

    proxy = await asyncio.start_server(flip_one_byte, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    try:
        with pytest.raises(KvPullError, match="corrupt"):
            await pull_kv(msgspec.structs.replace(desc, port=port), tcp_only())
    finally:
        proxy.close()


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, flip_at: int | None) -> None:
    seen = 0
    while data := await src.read(1 << 16):
        if flip_at is not None and seen <= flip_at < seen + len(data):
            data = bytearray(data)
            data[flip_at - seen] ^= 0x80
        seen += len(data)
        dst.write(bytes(data))
        await dst.drain()
    dst.close()


async def test_checksum_falls_back_to_what_the_importer_has(make_exporter, monkeypatch) -> None:  # noqa: ANN001
    exporter = await make_exporter(use_shm=False)
    desc = publish(exporter)
    monkeypatch.setattr(ck, "SUPPORTED", ("crc32",))  # an importer without xxhash
    with await pull_kv(desc) as pulled:
        assert np.array_equal(np.frombuffer(pulled.buffer, np.uint8), pattern(SMALL.nbytes, 7))


async def test_bad_descriptors_fail_before_any_connection(make_exporter: MakeExporter) -> None:
    exporter = await make_exporter()
    desc = publish(exporter)
    for bad in (
        msgspec.structs.replace(desc, nbytes=desc.nbytes + 4),
        msgspec.structs.replace(desc, dtype="object"),
        msgspec.structs.replace(desc, port=0),
        msgspec.structs.replace(desc, shm_name="../../etc/passwd", host_id="x", port=1),
    ):
        with pytest.raises(KvPullError):
            await pull_kv(bad)
    with pytest.raises(KvPullError, match="max_transfer_bytes"):
        await pull_kv(desc, KvTransferConfig(max_transfer_bytes=SMALL.nbytes - 1))
    assert exporter.held_count == 1 and exporter.stats.rejected == 0


async def test_nobody_listening_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        desc = KvDescriptor(
            transfer_id="t", engine="torch", host="127.0.0.1", port=port, **SMALL.descriptor_fields()
        )
        t0 = time.monotonic()
        with pytest.raises(KvPullError, match="unreachable"):
            await pull_kv(desc, KvTransferConfig(connect_timeout_s=1.0))
        assert time.monotonic() - t0 < 1.0


async def test_malformed_requests_are_dropped_and_serving_goes_on(make_exporter: MakeExporter) -> None:
    exporter = await make_exporter(connect_timeout_s=0.3)
    desc = publish(exporter)
    host, port = exporter.address
    for junk in (struct.pack(">I", 1 << 30), struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1", b"\x00\x00"):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(junk)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 2.0) == b""  # closed on us, nothing disclosed
        writer.close()
    assert exporter.stats.rejected == 3
    with await pull_kv(desc) as pulled:
        assert pulled.nbytes == SMALL.nbytes


async def test_binds_to_the_configured_interface_only(make_exporter: MakeExporter) -> None:
    exporter = await make_exporter(bind_host="127.0.0.1", advertise_host="kv.example")
    assert exporter._listener.getsockname()[0] == "127.0.0.1"
    assert publish(exporter).host == "kv.example"


async def test_release_by_descriptor_frees_an_unpulled_hold() -> None:
    cfg = KvTransferConfig(lease_s=30.0)
    exporter = KvExporter(cfg)
    await exporter.start()
    try:
        hold = exporter.allocate(KvLayout(2, 2, 8, "float32", 16), "r1")
        desc = exporter.publish(hold)
        assert exporter.held_bytes == desc.nbytes
        wrong = msgspec.structs.replace(desc, secret="nope")
        assert not await release_kv(wrong, cfg)
        assert exporter.held_bytes == desc.nbytes
        assert await release_kv(desc, cfg)
        assert exporter.held_bytes == 0 and exporter.stats.released == 1
        with pytest.raises(KvPullError):
            await pull_kv(desc, cfg)
    finally:
        await exporter.stop()
