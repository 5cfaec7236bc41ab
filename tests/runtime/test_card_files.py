"""Model files travel with the card: published content-addressed in chunks, fetched by a frontend into a
local folder it reads the tokenizer from (no copy of the model folder on its host)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from dynamo_lite.protocol import ModelCard
from dynamo_lite.runtime import keys
from dynamo_lite.runtime.card_files import CHUNK_BYTES, CardFileCache, CardFileError, publish_card_files
from dynamo_lite.runtime.discovery_memory import MemoryDiscovery, MemoryStore
from tests.conftest import Proc


def _folder(tmp: Path, tokenizer: bytes) -> Path:
    folder = tmp / "model"
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_bytes(tokenizer)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "weights.safetensors").write_bytes(b"never published")
    return folder


async def test_files_are_chunked_shared_and_fetched_intact(tmp_path: Path) -> None:
    store = MemoryStore()
    worker_a, worker_b, frontend = MemoryDiscovery(store), MemoryDiscovery(store), MemoryDiscovery(store)
    big = os.urandom(3 * CHUNK_BYTES + 123)  # several chunks, each under etcd's request limit
    folder = _folder(tmp_path, big)
    files = await publish_card_files(worker_a, "dl", "ns", folder)
    assert [f.name for f in files] == ["tokenizer.json", "config.json"]
    assert files[0].sha256 == hashlib.sha256(big).hexdigest() and files[0].size == len(big)
    chunks = store.get_prefix(keys.files_prefix("dl", "ns") + files[0].sha256 + "/")
    assert len(chunks) == 4 and max(len(c.value) for c in chunks) <= CHUNK_BYTES
    assert await publish_card_files(worker_b, "dl", "ns", folder) == files  # same content, same keys
    await worker_a.close()  # the files outlive the worker that wrote them (no lease)
    card = ModelCard("m", "/elsewhere", "/elsewhere/tokenizer.json", files=files)
    fetched = await CardFileCache(frontend, "dl", "ns", tmp_path / "cache").folder(card)
    assert (fetched / "tokenizer.json").read_bytes() == big
    assert not (fetched / "weights.safetensors").exists()


async def test_a_changed_model_gets_new_files_and_a_corrupt_chunk_is_refused(tmp_path: Path) -> None:
    store = MemoryStore()
    worker, frontend = MemoryDiscovery(store), MemoryDiscovery(store)
    old = await publish_card_files(worker, "dl", "ns", _folder(tmp_path, b'{"v": 1}'))
    new = await publish_card_files(worker, "dl", "ns", _folder(tmp_path, b'{"v": 2}'))
    assert old[0].sha256 != new[0].sha256
    cache = CardFileCache(frontend, "dl", "ns", tmp_path / "cache")
    folder = await cache.folder(ModelCard("m", "", "", files=new))
    assert (folder / "tokenizer.json").read_bytes() == b'{"v": 2}'
    store.put(keys.file_chunk_key("dl", "ns", old[0].sha256, 0), b"tampered")
    with pytest.raises(CardFileError, match="does not match"):
        await cache.folder(ModelCard("m", "", "", files=old))


async def test_a_30_mb_tokenizer_goes_through_etcd(etcd_server: Proc, tmp_path: Path) -> None:
    from dynamo_lite.runtime.discovery_etcd import EtcdDiscovery

    big = os.urandom(30 * 1024 * 1024)  # gpt-oss's tokenizer.json is ~30 MB; etcd refuses >1.5 MiB requests
    worker = await EtcdDiscovery.connect(f"127.0.0.1:{etcd_server.port}")
    frontend = await EtcdDiscovery.connect(f"127.0.0.1:{etcd_server.port}")
    try:
        files = await publish_card_files(worker, "dl", "big", _folder(tmp_path, big))
        folder = await CardFileCache(frontend, "dl", "big", tmp_path / "cache").folder(
            ModelCard("m", "", "", files=files)
        )
        assert (folder / "tokenizer.json").read_bytes() == big
    finally:
        await frontend.delete_prefix(keys.files_prefix("dl", "big"))
        await worker.close()
        await frontend.close()
