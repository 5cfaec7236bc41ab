"""The KV cache: one tensor allocated up front, one slot per running sequence.

Layout ``[layers, 2 (K, V), slots, kv_heads, max_seq, head_dim]``: a slot's K (or V) of one layer and head
is a contiguous run of positions, so attention reads a slot range as a strided view and a sequence's KV is
exported or imported with one copy per transfer (never per step).

On CPU the tensor lives in an anonymous memory map: the kernel hands out zero pages lazily, so a large cache
costs resident memory only for the positions actually written, and unwritten positions read as 0.0 (never
NaN, which a masked-out position would otherwise smuggle into attention as 0 * NaN).
"""

from __future__ import annotations

import mmap
from collections import Counter
from collections.abc import Callable

import torch

from dynamo_lite.kv.blocks import block_hashes
from dynamo_lite.protocol import KvEventKind


class NoFreeSlot(RuntimeError):
    pass


class KvCache:
    """Preallocated per-slot KV storage plus the free-slot list."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_slots: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.shape = (num_layers, 2, max_slots, num_kv_heads, max_seq_len, head_dim)
        self.dtype = dtype
        self.device = device
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        numel = num_layers * 2 * max_slots * num_kv_heads * max_seq_len * head_dim
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.nbytes = numel * itemsize
        if device.type == "cpu":
            self._mmap: mmap.mmap | None = mmap.mmap(-1, self.nbytes)
            self.data = torch.frombuffer(self._mmap, dtype=dtype, count=numel).view(self.shape)
        else:
            self._mmap = None
            self.data = torch.zeros(self.shape, dtype=dtype, device=device)
        self.layers = [(self.data[i, 0], self.data[i, 1]) for i in range(num_layers)]
        """K and V of each layer, each ``[slots, kv_heads, max_seq, head_dim]`` (views)."""
        self.layer_rows = [self.data[i].view(-1, head_dim) for i in range(num_layers)]
        """Each layer's K then V as rows of ``head_dim``: the target of ``store_index``."""
        # Lowest slot first keeps running sequences packed, so decode attention spans few idle slots.
        self._free = list(range(max_slots - 1, -1, -1))
        # Prefix caching (opt-in): a freed slot keeps its tokens' KV; a new sequence whose prompt starts with the
        # same blocks takes that slot and skips computing them. Blocks are tracked as chained hashes so that the
        # router's KV index hears what this engine holds (``on_kv_event``).
        self.prefix_block = 0  # tokens per block; 0: prefix caching off
        self.on_kv_event: Callable[[tuple[int, list[int]]], None] | None = None
        self._slot_blocks: dict[int, list[int]] = {}  # slot -> block hashes of the KV it holds
        self._held: Counter[int] = Counter()  # block hash -> slots holding it

    @property
    def bytes_per_token(self) -> int:
        num_layers, _, _, kv_heads, _, head_dim = self.shape
        return num_layers * 2 * kv_heads * head_dim * self.data.element_size()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        return self.allocate_for(None)[0]

    def allocate_for(self, tokens: list[int] | None) -> tuple[int, int]:
        """A free slot for a sequence starting with ``tokens``, and how many of them it already holds
        (whole blocks, always leaving the last token to compute: its logits are needed)."""
        if not self._free:
            raise NoFreeSlot("all KV slots are in use")
        self._free.sort(reverse=True)
        slot, reused = -1, 0
        if self.prefix_block and tokens:
            wanted = block_hashes(tokens[: len(tokens) - 1], self.prefix_block)
            for candidate in self._free:
                held = self._slot_blocks.get(candidate, ())
                n = 0
                for a, b in zip(held, wanted, strict=False):
                    if a != b:
                        break
                    n += 1
                if n * self.prefix_block > reused:
                    slot, reused = candidate, n * self.prefix_block
        if slot < 0:
            # Prefer a slot that holds nothing worth keeping; else the lowest.
            empty = [s for s in self._free if not self._slot_blocks.get(s)]
            slot = empty[-1] if empty else self._free[-1]
        self._free.remove(slot)
        self._set_blocks(
            slot, self._slot_blocks.get(slot, [])[: reused // self.prefix_block] if reused else []
        )
        return slot, reused

    def free(self, slot: int, tokens: list[int] | None = None) -> None:
        """Return ``slot``; with prefix caching on, it keeps the KV of ``tokens`` (its computed positions)."""
        if slot in self._free or not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)
        if self.prefix_block:
            self._set_blocks(slot, block_hashes(tokens or [], self.prefix_block))

    def _set_blocks(self, slot: int, hashes: list[int]) -> None:
        old = self._slot_blocks.get(slot, [])
        if old == hashes:
            return
        # A slot's chained hashes are distinct, so set differences are exact: only blocks that change hands.
        kept = set(old) & set(hashes)
        stored, removed = [], []
        for h in hashes:
            if h not in kept:
                self._held[h] += 1
                if self._held[h] == 1:
                    stored.append(h)
        for h in old:
            if h not in kept:
                self._held[h] -= 1
                if self._held[h] == 0:
                    del self._held[h]
                    removed.append(h)
        self._slot_blocks[slot] = hashes
        sink = self.on_kv_event
        if sink is not None:
            if stored:
                sink((KvEventKind.STORED, stored))
            if removed:
                sink((KvEventKind.REMOVED, removed))

    def store_index(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows of ``layer_rows[i]`` for each (token, K|V, kv head), in the order of a token's k|v heads in
        the fused qkv output, so one ``index_copy_`` per layer stores the K and V of every token of a step."""
        _, _, max_slots, kv_heads, max_seq, _ = self.shape
        kv = torch.arange(2, device=slots.device)[:, None] * (max_slots * kv_heads) + torch.arange(
            kv_heads, device=slots.device
        )  # [2, kv_heads]: (K|V, head) -> row block
        blocks = slots[:, None, None] * kv_heads + kv[None]  # [T, 2, kv_heads]
        return (blocks * max_seq + positions[:, None, None]).reshape(-1)

    def read(self, slot: int, num_tokens: int, out: torch.Tensor) -> torch.Tensor:
        """Copy the first ``num_tokens`` positions of ``slot`` into ``out`` [layers, 2, kv_heads, n, D]."""
        return out.copy_(self.data[:, :, slot, :, :num_tokens])

    def write(self, slot: int, src: torch.Tensor) -> None:
        """Fill the first positions of ``slot`` from ``src`` [layers, 2, kv_heads, n, D], any dtype/device."""
        self.data[:, :, slot, :, : src.shape[3]].copy_(src)
