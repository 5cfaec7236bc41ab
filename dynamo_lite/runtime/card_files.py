"""Model files travel with the model card, so a frontend host needs no copy of the model folder.

A worker publishes the files a frontend reads (tokenizer, tokenizer config, chat template, generation config,
config) into etcd, content-addressed: ``{root}.files/{namespace}/{sha256}/{chunk}`` in chunks well under etcd's
request limit (1.5 MiB by default). The card lists them as ``CardFile(name, sha256, size)``. Every worker of a
model writes the same keys, so they are stored once; a changed file gets new keys and the card points there.
The chunks carry no lease (another worker may still need them); ``clear_namespace`` removes them.

A frontend fetches a card's files once per content into a local cache folder and reads them from there.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from dynamo_lite.protocol import CardFile, Discovery, ModelCard
from dynamo_lite.runtime import keys

CARD_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
    "special_tokens_map.json",
)
CHUNK_BYTES = 512 * 1024


class CardFileError(RuntimeError):
    """A card's file could not be fetched (missing chunks, or content that does not match its hash)."""


async def publish_card_files(discovery: Discovery, root: str, namespace: str, folder: Path) -> list[CardFile]:
    """Store ``folder``'s card files (those present) under their hashes; returns their ``CardFile`` list."""
    out = []
    for name in CARD_FILE_NAMES:
        path = folder / name
        if not path.is_file():
            continue
        data = await asyncio.to_thread(path.read_bytes)
        digest = hashlib.sha256(data).hexdigest()
        chunks = max(1, -(-len(data) // CHUNK_BYTES))
        last = keys.file_chunk_key(root, namespace, digest, chunks - 1)
        if not await discovery.get_prefix(last):  # written by another worker of this model already
            for i in range(chunks):
                key = keys.file_chunk_key(root, namespace, digest, i)
                await discovery.put_shared(key, data[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES])
        out.append(CardFile(name, digest, len(data)))
    return out


class CardFileCache:
    """Fetches cards' files into ``cache_dir`` (once per content) and gives each card a local folder."""

    def __init__(self, discovery: Discovery, root: str, namespace: str, cache_dir: Path) -> None:
        self._discovery = discovery
        self._root = root
        self._namespace = namespace
        self._dir = cache_dir

    async def folder(self, card: ModelCard) -> Path:
        """A folder holding ``card.files`` under their names (fetched now if not cached)."""
        manifest = hashlib.sha256("".join(f"{f.name}:{f.sha256};" for f in card.files).encode()).hexdigest()
        folder = self._dir / "cards" / manifest[:32]
        if all((folder / f.name).is_file() for f in card.files):
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        for f in card.files:
            blob = await self._blob(f)
            target = folder / f.name
            if not target.exists():
                tmp = target.with_name(f".{f.name}.{os.getpid()}")
                os.link(blob, tmp)
                os.replace(tmp, target)
        return folder

    async def _blob(self, f: CardFile) -> Path:
        path = self._dir / "blobs" / f.sha256
        if path.is_file() and path.stat().st_size == f.size:
            return path
        parts = []
        for i in range(max(1, -(-f.size // CHUNK_BYTES))):
            found = await self._discovery.get_prefix(
                keys.file_chunk_key(self._root, self._namespace, f.sha256, i)
            )
            if not found or found[0].value is None:
                raise CardFileError(f"{f.name} ({f.sha256[:12]}): chunk {i} is missing from discovery")
            parts.append(found[0].value)
        data = b"".join(parts)
        if len(data) != f.size or hashlib.sha256(data).hexdigest() != f.sha256:
            raise CardFileError(f"{f.name} ({f.sha256[:12]}): fetched content does not match its hash")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{f.sha256}.{os.getpid()}")
        await asyncio.to_thread(tmp.write_bytes, data)
        os.replace(tmp, path)
        return path
