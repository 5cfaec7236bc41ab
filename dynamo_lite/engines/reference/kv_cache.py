"""The KV cache: preallocated up front, one slot per running sequence.

Layout per kind of layer ``[layers, 2 (K, V), slots, kv_heads, length, head_dim]``: a slot's K (or V) of one
layer and head is a contiguous run of positions, so attention reads a slot range as a strided view and a
sequence's KV is exported or imported with one copy per kind of layer (never per step). Full-attention layers
have ``length = max_seq_len``. Sliding-window layers (gpt-oss: every other layer attends to the last 128
positions) have ``length = window``, a ring: position ``p`` lives at ``p % window``, so a window layer costs the
same whatever the sequence's length, and its export is that ring as it is (``KvLayout``'s windowed part).

On CPU the tensor lives in an anonymous memory map: the kernel hands out zero pages lazily, so a large cache
costs resident memory only for the positions actually written, and unwritten positions read as 0.0 (never
NaN, which a masked-out position would otherwise smuggle into attention as 0 * NaN).
"""

from __future__ import annotations

import math
import mmap
from collections import Counter
from collections.abc import Callable

import torch

from dynamo_lite.kv.blocks import block_hashes
from dynamo_lite.protocol import KvEventKind


class NoFreeSlot(RuntimeError):
    pass


def layer_groups(layer_windows: tuple[int, ...]) -> tuple[list[int], list[int], int]:
    """``(full layers, windowed layers, window)`` of a model whose layer ``i`` attends to the last
    ``layer_windows[i]`` positions (0: all of them). One window size per model."""
    windows = {w for w in layer_windows if w}
    if len(windows) > 1:
        raise ValueError(f"one sliding window per model, got {sorted(windows)}")
    full = [i for i, w in enumerate(layer_windows) if not w]
    windowed = [i for i, w in enumerate(layer_windows) if w]
    return full, windowed, (windows.pop() if windows else 0)


def slot_nbytes(
    layer_windows: tuple[int, ...], num_kv_heads: int, head_dim: int, max_seq_len: int, itemsize: int
) -> int:
    """Bytes one slot of ``max_seq_len`` positions takes."""
    full, windowed, window = layer_groups(layer_windows)
    return 2 * num_kv_heads * head_dim * itemsize * (len(full) * max_seq_len + len(windowed) * window)


class KvCache:
    """Preallocated per-slot KV storage plus the free-slot list.

    ``layer_windows`` (per layer, 0 for full attention; default all full) makes the windowed layers rings of
    ``window`` positions.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_slots: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device,
        layer_windows: tuple[int, ...] | None = None,
    ) -> None:
        windows = tuple(layer_windows) if layer_windows is not None else (0,) * num_layers
        if len(windows) != num_layers:
            raise ValueError(f"{len(windows)} layer windows for {num_layers} layers")
        self.layer_windows = windows
        full, windowed, self.window = layer_groups(windows)
        self.full_layers, self.windowed_layers = full, windowed
        self.dtype = dtype
        self.device = device
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        shapes = [
            (len(layers), 2, max_slots, num_kv_heads, length, head_dim)
            for layers, length in ((full, max_seq_len), (windowed, self.window))
            if layers
        ]
        numels = [math.prod(shape) for shape in shapes]
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.nbytes = sum(numels) * itemsize
        if device.type == "cpu":
            self._mmap: mmap.mmap | None = mmap.mmap(-1, self.nbytes)
            flat = torch.frombuffer(self._mmap, dtype=dtype, count=sum(numels))
        else:
            self._mmap = None
            flat = torch.zeros(sum(numels), dtype=dtype, device=device)
        self.groups: list[torch.Tensor] = []
        """One tensor per kind of layer (full first, then windowed; only the kinds the model has), each
        ``[layers, 2, slots, kv_heads, length, head_dim]``: the parts of a ``KvLayout``, in its order."""
        offset = 0
        for shape, numel in zip(shapes, numels, strict=True):
            self.groups.append(flat[offset : offset + numel].view(shape))
            offset += numel
        self.data = self.groups[0]
        """The first group (all layers, for a model without windowed layers)."""
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [None] * num_layers  # type: ignore[list-item]
        """K and V of each layer, each ``[slots, kv_heads, length, head_dim]`` (views)."""
        self.layer_rows: list[torch.Tensor] = [None] * num_layers  # type: ignore[list-item]
        """Each layer's K then V as rows of ``head_dim``: the target of ``store_index``."""
        for group, layers in zip(self.groups, [g for g in (full, windowed) if g], strict=True):
            for j, i in enumerate(layers):
                self.layers[i] = (group[j, 0], group[j, 1])
                self.layer_rows[i] = group[j].view(-1, head_dim)
        self._shape = (num_layers, max_slots, num_kv_heads, head_dim)
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
    def shape(self) -> tuple[int, int, int, int, int, int]:
        """``(layers, 2, slots, kv_heads, max_seq_len, head_dim)``: the cache as if every layer were full."""
        num_layers, slots, kv_heads, head_dim = self._shape
        return (num_layers, 2, slots, kv_heads, self.max_seq_len, head_dim)

    @property
    def bytes_per_token(self) -> int:
        """Bytes a position takes in the full layers (windowed layers take a fixed amount per slot)."""
        _, _, _, kv_heads, _, head_dim = self.shape
        return len(self.full_layers) * 2 * kv_heads * head_dim * self.data.element_size()

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

    def store_index(self, slots: torch.Tensor, positions: torch.Tensor, window: int = 0) -> torch.Tensor:
        """Rows of ``layer_rows[i]`` for each (token, K|V, kv head), in the order of a token's k|v heads in
        the fused qkv output, so one ``index_copy_`` per layer stores the K and V of every token of a step.
        ``window``: the rows of a windowed layer's ring (position ``p`` at ``p % window``)."""
        _, _, max_slots, kv_heads, max_seq, _ = self.shape
        length = window or max_seq
        kv = torch.arange(2, device=slots.device)[:, None] * (max_slots * kv_heads) + torch.arange(
            kv_heads, device=slots.device
        )  # [2, kv_heads]: (K|V, head) -> row block
        blocks = slots[:, None, None] * kv_heads + kv[None]  # [T, 2, kv_heads]
        pos = positions % window if window else positions
        return (blocks * length + pos[:, None, None]).reshape(-1)

    def slot_parts(self, slot: int, num_tokens: int) -> list[torch.Tensor]:
        """Views of ``slot``'s first ``num_tokens`` positions, one per group, in ``KvLayout.parts`` order:
        ``[full layers, 2, kv_heads, num_tokens, head_dim]`` then the windowed layers' ring up to
        ``min(num_tokens, window)`` (the whole ring once the sequence is longer than the window)."""
        out = [self.groups[0][:, :, slot, :, :num_tokens]] if self.full_layers else []
        if self.windowed_layers:
            out.append(self.groups[-1][:, :, slot, :, : min(num_tokens, self.window)])
        return out

    def read(self, slot: int, num_tokens: int, out: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list:
        """Copy the first ``num_tokens`` positions of ``slot`` into ``out``: a tensor [layers, 2, kv_heads, n,
        D] for a cache without windowed layers, else one tensor per ``slot_parts`` part."""
        outs = out if isinstance(out, list) else [out]
        for dst, src in zip(outs, self.slot_parts(slot, num_tokens), strict=True):
            dst.copy_(src)
        return out

    def write(self, slot: int, src: torch.Tensor | list[torch.Tensor]) -> None:
        """Fill the first positions of ``slot`` from ``src`` (as ``read``'s ``out``), any dtype/device."""
        srcs = src if isinstance(src, list) else [src]
        num_tokens = srcs[0].shape[3]
        for dst, part in zip(self.slot_parts(slot, num_tokens), srcs, strict=True):
            dst.copy_(part)
