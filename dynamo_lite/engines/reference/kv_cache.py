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

import torch


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

    @property
    def bytes_per_token(self) -> int:
        num_layers, _, _, kv_heads, _, head_dim = self.shape
        return num_layers * 2 * kv_heads * head_dim * self.data.element_size()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise NoFreeSlot("all KV slots are in use")
        self._free.sort(reverse=True)
        return self._free.pop()

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)

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
