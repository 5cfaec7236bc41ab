"""What the engine thread runs a step and moves a sequence's KV through: its one rank, or rank 0 driving N.

``LocalRunner`` (one rank) builds the step and runs the model. ``RankDriver`` (rank 0 of N) broadcasts each
step's work to the other ranks as a ``rank_comm.Step`` (batch composition, token ids, positions, slots: a few
hundred bytes of msgpack), runs its own share and returns the logits to sample from; the followers run
``follow``: receive a command, run it, until ``Stop`` or a dead peer.

Head-split ranks all run the same tokens over their head shard of the KV cache; rank 0's logits are the answer.
Attention-DP ranks each run their own sequences: the scheduler's slots are numbered over all ranks
(``SlotSpace``: slot ``g`` is local slot ``g % S`` of rank ``g // S``), rank 0 splits the step by owner and
gathers the sampled rows' logits back.

A sequence's KV is handed off in the one-rank layout (all KV heads), which is what the KV descriptor and the
transports carry, so any layout hands off to any other (TP2 → TP2, TP2 → TP1, TP1 → TP2, head-split prefill →
attention-DP decode). Where the handoff's memory is a shared-memory segment of this host — an export hold, a
pull mapped from the prefill worker's hold, or TCP bytes the importer landed in a segment of its own — rank 0
only names the segment (``KvRead``/``KvWrite`` with ``shm_name``) and every rank copies its own part between
its cache and the segment: its KV heads (a replicated head is written by the first rank holding it), or, under
attention DP, the owning rank every head of its sequence. No KV byte crosses the process group then. Device
memory is handed off the same way by CUDA IPC: an export hold in rank 0's GPU pool is opened by each rank,
whose GPU writes its heads into it; a CUDA IPC pull (the prefill's hold in its pool) is opened by each decode
rank, whose GPU copies its heads out of it. A part a rank can't copy itself (private memory, no peer access
between two GPUs) is gathered or relayed by rank 0 over the data group instead.
Every rank reports its part's outcome and bytes to rank 0 (``_report``) before the hold is published or the
pull released, so the KV leases are freed exactly as for one rank.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Protocol

import torch

from dynamo_lite.engines.reference.collectives import SequenceParallel
from dynamo_lite.engines.reference.kv_cache import KvCache, NoFreeSlot
from dynamo_lite.engines.reference.model import build_step
from dynamo_lite.engines.reference.rank_comm import Command, KvRead, KvWrite, RankComm, RankStep, Step, Stop
from dynamo_lite.engines.reference.ranks import ParallelPlan, RankShard
from dynamo_lite.kv.layout import as_tensors
from dynamo_lite.kv.shm import ShmSegment

log = logging.getLogger(__name__)


class RankFailure(RuntimeError):
    """A rank died or a collective failed: the ranks can no longer step together."""


class KvHandoffError(Exception):
    """A rank could not copy its part of a sequence's KV (the ranks are still in step: that request recomputes
    or fails, the engine goes on)."""


Decode = list[tuple[int, int, int]]
Prefill = list[tuple[int, int, list[int]]]


class Runner(Protocol):
    """The engine thread's view of the model, whatever the number of ranks."""

    slots: Any  # what the scheduler allocates slots from: a ``KvCache`` or a ``SlotSpace``

    def forward(self, decode: Decode, prefill: Prefill, sample_rows: list[int]) -> torch.Tensor: ...

    def read_kv(self, slot: int, hold: Any) -> None: ...

    def write_kv(self, slot: int, pulled: Any) -> None: ...

    def close(self) -> None: ...


class SlotSpace:
    """Slots numbered over every attention-DP rank, each rank's ``per_rank`` slots in a row; a new sequence goes
    to the rank with the most free slots (lowest rank on a tie), so work spreads evenly."""

    def __init__(self, size: int, per_rank: int, max_seq_len: int) -> None:
        self.size = size
        self.per_rank = per_rank
        self.max_slots = size * per_rank
        self.max_seq_len = max_seq_len
        self._free = [list(range(per_rank - 1, -1, -1)) for _ in range(size)]

    @property
    def free_slots(self) -> int:
        return sum(len(f) for f in self._free)

    def owner(self, slot: int) -> tuple[int, int]:
        """``(rank, local slot)``."""
        return divmod(slot, self.per_rank)

    def allocate(self) -> int:
        rank = max(range(self.size), key=lambda r: (len(self._free[r]), -r))
        if not self._free[rank]:
            raise NoFreeSlot("all KV slots are in use")
        return rank * self.per_rank + self._free[rank].pop()

    def allocate_for(self, tokens: list[int] | None) -> tuple[int, int]:
        return self.allocate(), 0  # no prefix caching across ranks

    def free(self, slot: int, tokens: list[int] | None = None) -> None:
        rank, local = self.owner(slot)
        if not 0 <= slot < self.max_slots or local in self._free[rank]:
            raise ValueError(f"slot {slot} is not allocated")
        self._free[rank].append(local)
        self._free[rank].sort(reverse=True)


class RankState:
    """One rank's model shard, KV cache and data group: runs the commands every rank runs alike."""

    def __init__(
        self,
        plan: ParallelPlan,
        model: Any,
        cache: KvCache,
        data: RankComm | None,
        shards: list[RankShard],
        device: torch.device,
        control: RankComm | None = None,
    ) -> None:
        self.plan = plan
        self.model = model
        self.cache = cache
        self.data = data
        self.shards = shards  # every rank's, for rank 0 to cut and place KV heads
        self.device = device
        self.control = control  # the command group: where each handoff's outcome is reported
        # KV handoffs (imports and exports): bytes this rank copied between its cache and the handoff memory
        # itself, and bytes it sent or received over the data group for another rank (``_report``); rank 0
        # also sums every rank's (index = rank).
        self.kv_bytes = 0
        self.kv_relayed_bytes = 0
        self.kv_bytes_by_rank = [0] * plan.size
        self.kv_relayed_by_rank = [0] * plan.size
        self.weight_bytes: list[int] = []  # rank 0: every rank's bytes of sharded weights (``ranks``)

    def gather_weight_bytes(self, control: RankComm, mine: int) -> None:
        """Collect each rank's sharded-weight bytes on rank 0 (what a test or a log line checks: ~1/N each)."""
        t = torch.tensor([mine], dtype=torch.int64)
        out = [torch.empty_like(t) for _ in range(self.plan.size)] if self.plan.rank == 0 else None
        control.gather(out, t)
        if out is not None:
            self.weight_bytes = [int(x) for x in out]

    def run(self, command: Command, kv: list[torch.Tensor] | None = None) -> torch.Tensor | None:
        if isinstance(command, Step):
            return self.step(command)
        if isinstance(command, KvWrite):
            self.write_kv(command, kv)
        elif isinstance(command, KvRead):
            self.read_kv(command, kv)
        return None

    def step(self, step: Step) -> torch.Tensor | None:
        """Run this rank's part; rank 0 gets the logits of every part's sampled rows, in part order."""
        plan = self.plan
        part = step.parts[plan.rank] if plan.attention_dp else step.parts[0]
        comm = self.model.comm
        if isinstance(comm, SequenceParallel):
            comm.rows = [len(p.decode) + sum(len(t) for _, _, t in p.prefill) for p in step.parts]
        batch = build_step(part.decode, part.prefill, part.sample_rows, self.device)
        logits = self.model.forward(batch, self.cache)
        if not plan.attention_dp or plan.size == 1:
            return logits if plan.rank == 0 else None
        assert self.data is not None
        counts = [len(p.sample_rows) for p in step.parts]
        most = max(counts)
        if most == 0:
            return logits if plan.rank == 0 else None
        padded = logits.new_zeros(most, logits.shape[1])
        padded[: logits.shape[0]] = logits
        out = [torch.empty_like(padded) for _ in counts] if plan.rank == 0 else None
        self.data.gather(out, padded)
        if out is None:
            return None
        return torch.cat([o[:n] for o, n in zip(out, counts, strict=True)])

    def write_kv(self, cmd: KvWrite, full: list[torch.Tensor] | None) -> None:
        """Take a sequence's KV into local slot ``cmd.slot``: each rank copies its part out of the shared
        segment (``cmd.shm_name``) or the prefill's GPU pool (``cmd.cuda_ipc``), or rank 0 holds it whole
        (``full``, the one-rank layout) and relays parts."""
        if cmd.shm_name or cmd.cuda_ipc:
            self._handoff(cmd, full, importing=True)
            return
        data, rank = self.data, self.plan.rank
        mine = self.cache.slot_parts(cmd.slot, cmd.num_tokens)
        own = relayed = 0
        if cmd.owner >= 0:  # attention-DP: the owner gets every head
            if cmd.owner == rank == 0:
                assert full is not None
                for dst, src in zip(mine, full, strict=True):
                    dst.copy_(src)
                    own += src.nbytes
            elif rank == 0:
                assert data is not None and full is not None
                for src in full:
                    data.send(src.contiguous(), cmd.owner)
                    relayed += src.nbytes
            elif rank == cmd.owner:
                assert data is not None
                for dst in mine:
                    buf = torch.empty(dst.shape, dtype=dst.dtype, device=dst.device)
                    data.recv(buf, 0)
                    dst.copy_(buf)
                    relayed += buf.nbytes
            self._report(True, own, relayed)
            return
        assert data is not None
        for i, dst in enumerate(mine):
            buf = torch.empty(dst.shape, dtype=dst.dtype, device=dst.device)
            parts = None
            if rank == 0:
                assert full is not None
                parts = [full[i][:, :, slice(*s.kv_heads)].contiguous() for s in self.shards]
                relayed += sum(p.nbytes for p in parts[1:])
                own += parts[0].nbytes
            else:
                relayed += buf.nbytes
            data.scatter(buf, parts)
            dst.copy_(buf)
        self._report(True, own, relayed)

    def read_kv(self, cmd: KvRead, out: list[torch.Tensor] | None) -> None:
        """Hand local slot ``cmd.slot``'s KV out: each rank writes its part straight into the shared segment
        (``cmd.shm_name``), or rank 0 assembles it whole into ``out`` from the parts the others send it."""
        if cmd.shm_name or cmd.cuda_ipc:
            self._handoff(cmd, out, importing=False)
            return
        data, rank = self.data, self.plan.rank
        mine = self.cache.slot_parts(cmd.slot, cmd.num_tokens)
        own = relayed = 0
        if cmd.owner >= 0:
            if cmd.owner == rank == 0:
                assert out is not None
                for dst, src in zip(out, mine, strict=True):
                    dst.copy_(src)
                    own += src.nbytes
            elif rank == 0:
                assert data is not None and out is not None
                for dst in out:
                    buf = torch.empty(dst.shape, dtype=dst.dtype, device=dst.device)
                    data.recv(buf, cmd.owner)
                    dst.copy_(buf)
                    relayed += buf.nbytes
            elif rank == cmd.owner:
                assert data is not None
                for src in mine:
                    data.send(src.contiguous(), 0)
                    relayed += src.nbytes
            self._report(True, own, relayed)
            return
        assert data is not None
        for i, src in enumerate(mine):
            local = src.contiguous()
            gathered = [torch.empty_like(local) for _ in self.shards] if rank == 0 else None
            data.gather(gathered, local)
            # What crossed between ranks: a follower's shard, or on rank 0 every other rank's.
            relayed += local.nbytes * (len(self.shards) - 1 if rank == 0 else 1)
            own += local.nbytes if rank == 0 else 0
            if gathered is not None:
                assert out is not None
                for shard, part in zip(self.shards, gathered, strict=True):
                    # a replicated head: the same bytes again
                    out[i][:, :, slice(*shard.kv_heads)].copy_(part)
        self._report(True, own, relayed)

    def _handoff(self, cmd: KvWrite | KvRead, theirs: list[torch.Tensor] | None, importing: bool) -> None:
        """This rank's part of a rank-by-rank handoff: copy its KV heads (attention DP: the owner, all of them)
        between its cache slot and the handoff's memory — a shared segment, mapped by name; an export's device
        hold or the prefill's GPU pool, opened by CUDA IPC — then report to rank 0. Rank 0 passes its own views
        of an export hold (``theirs``). A rank that can't (segment gone, no peer access between the GPUs, bytes
        that don't fit) reports so instead of raising: every rank reaches the report, so the ranks stay in
        step."""
        rank, layout = self.plan.rank, cmd.layout
        heads: tuple[int, int] | None = self.shards[rank].kv_heads
        if cmd.owner >= 0:
            heads = (0, layout.num_kv_heads) if rank == cmd.owner and layout is not None else None
        elif not importing and not self._first_of_kv_heads():
            heads = None  # a KV head replicated on an earlier rank: that rank writes it
        ok, moved = True, 0
        if heads is not None:
            try:
                mine = self.cache.slot_parts(cmd.slot, cmd.num_tokens)
                if cmd.cuda_ipc and importing:
                    assert isinstance(cmd, KvWrite)
                    moved = self._copy_from_gpu_pool(cmd, mine, heads)
                elif cmd.cuda_ipc and theirs is None:  # a follower writing into rank 0's device hold
                    moved = self._copy_into_gpu_hold(cmd, mine, heads)
                else:
                    moved = self._copy_shared(cmd, mine, theirs, heads, importing)
            except Exception as e:  # noqa: BLE001 - reported to rank 0, which relays, recomputes or fails it
                log.warning("rank %d: KV part of slot %d not copied: %s", rank, cmd.slot, e)
                ok = False
        self._report(ok, moved, 0)

    def _copy_shared(
        self,
        cmd: KvWrite | KvRead,
        mine: list[torch.Tensor],
        theirs: list[torch.Tensor] | None,
        heads: tuple[int, int],
        importing: bool,
    ) -> int:
        segment = None
        try:
            if theirs is None:
                assert cmd.layout is not None
                segment = ShmSegment.attach(cmd.shm_name, cmd.layout.nbytes)
                theirs = as_tensors(segment.mapping, cmd.layout)
            moved = 0
            for cached, shared in zip(mine, theirs, strict=True):
                part = shared[:, :, heads[0] : heads[1]]
                if importing:
                    cached.copy_(part)
                else:
                    part.copy_(cached)
                moved += part.numel() * part.element_size()
            return moved
        finally:
            theirs = None
            if segment is not None:
                segment.close()

    def _copy_from_gpu_pool(self, cmd: KvWrite, mine: list[torch.Tensor], heads: tuple[int, int]) -> int:
        """Copy KV heads ``heads`` of every layer out of the prefill worker's pool (CUDA IPC, this rank's GPU
        pulling from the prefill's) into this rank's slot, and wait for the copy before the report lets rank 0
        say done."""
        from dynamo_lite.kv.copy_plan import contiguous_strides
        from dynamo_lite.kv.cuda_ipc import open_source

        layout = cmd.layout
        assert layout is not None
        source = open_source(cmd.cuda_ipc, cmd.gpu_uuid, layout.nbytes, self.device)
        try:
            moved, event = 0, None
            h0, h1 = heads
            for cached, (shape, offset) in zip(mine, layout.parts, strict=True):
                layers, kv, _, tokens, dim = shape
                sub = (layers, kv, h1 - h0, tokens, dim)
                first = offset + h0 * tokens * dim * layout.itemsize
                event = source.copy_into(
                    cached, sub, layout.itemsize, src_offset=first, src_strides=contiguous_strides(shape)
                )
                moved += math.prod(sub) * layout.itemsize
            if event is not None:
                event.synchronize()
            return moved
        finally:
            source.release()

    def _copy_into_gpu_hold(
        self, cmd: KvWrite | KvRead, mine: list[torch.Tensor], heads: tuple[int, int]
    ) -> int:
        """Write KV heads ``heads`` of this rank's slot into rank 0's device hold (CUDA IPC: this rank's GPU
        writing to rank 0's), and wait for the copy before the report lets rank 0 publish."""
        from dynamo_lite.kv.copy_plan import contiguous_strides
        from dynamo_lite.kv.cuda_ipc import open_source

        layout = cmd.layout
        assert layout is not None
        hold = open_source(cmd.cuda_ipc, cmd.gpu_uuid, layout.nbytes, self.device)
        try:
            moved, event = 0, None
            h0 = heads[0]
            for cached, (shape, offset) in zip(mine, layout.parts, strict=True):
                tokens, dim = shape[3], shape[4]
                first = offset + h0 * tokens * dim * layout.itemsize
                event = hold.copy_from(
                    cached, layout.itemsize, dst_offset=first, dst_strides=contiguous_strides(shape)
                )
                moved += cached.numel() * layout.itemsize
            if event is not None:
                event.synchronize()
            return moved
        finally:
            hold.release()

    def _first_of_kv_heads(self) -> bool:
        """Whether no lower rank holds this rank's KV heads (they are replicated when KV heads < ranks)."""
        mine = self.shards[self.plan.rank].kv_heads
        return all(s.kv_heads != mine for s in self.shards[: self.plan.rank])

    def _report(self, ok: bool, own: int, relayed: int) -> None:
        """End of a handoff on every rank: rank 0 learns each rank's outcome and bytes (``kv_bytes``: copied
        between the rank's cache and the handoff memory itself; ``kv_relayed_bytes``: sent or received over the
        data group for another rank) and raises ``KvHandoffError`` if a rank could not do its part."""
        self.kv_bytes += own
        self.kv_relayed_bytes += relayed
        assert self.control is not None
        t = torch.tensor([int(ok), own, relayed], dtype=torch.int64)
        out = [torch.empty_like(t) for _ in range(self.plan.size)] if self.plan.rank == 0 else None
        self.control.gather(out, t)
        if out is None:
            return
        for r, got in enumerate(out):
            self.kv_bytes_by_rank[r] += int(got[1])
            self.kv_relayed_by_rank[r] += int(got[2])
        failed = [r for r, got in enumerate(out) if not int(got[0])]
        if failed:
            raise KvHandoffError(f"ranks {failed} could not copy their part of the KV")


class LocalRunner:
    """One rank: build the step, run the model, copy KV in and out of the cache."""

    def __init__(self, model: Any, cache: KvCache, device: torch.device) -> None:
        self.model = model
        self.cache = cache
        self.slots: Any = cache
        self.device = device

    def forward(self, decode: Decode, prefill: Prefill, sample_rows: list[int]) -> torch.Tensor:
        return self.model.forward(build_step(decode, prefill, sample_rows, self.device), self.cache)

    def read_kv(self, slot: int, hold: Any) -> None:
        self.cache.read(slot, hold.layout.num_tokens, hold.tensors())

    def write_kv(self, slot: int, pulled: Any) -> None:
        pulled.write_into(
            self.cache.slot_parts(slot, pulled.layout.num_tokens)
        )  # device to device (CUDA IPC)

    def close(self) -> None:
        pass


class RankDriver:
    """Rank 0 of N: sends every command to the followers first, then runs its own share of it."""

    def __init__(self, state: RankState, control: RankComm, full_kv_heads: int) -> None:
        self.state = state
        self.control = control
        self.plan = state.plan
        self.cache = state.cache
        self.full_kv_heads = full_kv_heads
        self.slots: Any = (
            SlotSpace(self.plan.size, state.cache.max_slots, state.cache.max_seq_len)
            if self.plan.attention_dp
            else state.cache
        )
        self._stopped = False

    def _send(self, command: Command, kv: list[torch.Tensor] | None = None) -> torch.Tensor | None:
        try:
            self.control.send_command(command)
            return self.state.run(command, kv)
        except RuntimeError as e:  # gloo/NCCL: a peer gone or timed out
            raise RankFailure(f"ranks failed during {type(command).__name__}: {e}") from e

    def forward(self, decode: Decode, prefill: Prefill, sample_rows: list[int]) -> torch.Tensor:
        if not self.plan.attention_dp:
            logits = self._send(Step([RankStep(decode, prefill, sample_rows)]))
            assert logits is not None
            return logits
        space = self.slots
        parts = [RankStep([], [], []) for _ in range(self.plan.size)]
        where: list[tuple[int, int]] = []  # flat row of the whole step -> (rank, row in the rank's part)
        for slot, position, token in sorted(decode):
            rank, local = space.owner(slot)
            where.append((rank, len(parts[rank].decode)))
            parts[rank].decode.append((local, position, token))
        fed = [len(p.decode) for p in parts]
        for slot, start, tokens in prefill:
            rank, local = space.owner(slot)
            parts[rank].prefill.append((local, start, tokens))
            where.extend((rank, fed[rank] + j) for j in range(len(tokens)))
            fed[rank] += len(tokens)
        order: list[tuple[int, int]] = []  # each sampled row -> (rank, index among that rank's sampled rows)
        for row in sample_rows:
            rank, local_row = where[row]
            order.append((rank, len(parts[rank].sample_rows)))
            parts[rank].sample_rows.append(local_row)
        logits = self._send(Step(parts))
        assert logits is not None
        first = [0] * self.plan.size
        for rank in range(1, self.plan.size):
            first[rank] = first[rank - 1] + len(parts[rank - 1].sample_rows)
        index = torch.tensor([first[r] + i for r, i in order], dtype=torch.int64, device=logits.device)
        return logits[index]

    def _kv_target(self, slot: int) -> tuple[int, int]:
        """``(local slot, owner)``: owner -1 when every rank holds a head shard of the slot."""
        if self.plan.attention_dp:
            rank, local = self.slots.owner(slot)
            return local, rank
        return slot, -1

    def read_kv(self, slot: int, hold: Any) -> None:
        """Export local KV into ``hold`` (a ``KvHold``): each rank writes its part into it itself — a host hold
        in shared memory, or a device hold opened by CUDA IPC; where a rank can't (private memory; no peer
        access between its GPU and rank 0's), rank 0 assembles it from parts sent over the data group."""
        local, owner = self._kv_target(slot)
        layout = hold.layout
        n = layout.num_tokens
        try:
            if hold.on_device:
                ref, uuid = hold.cuda_ref()
                self._send(KvRead(local, n, owner, "", layout, ref, uuid), hold.tensors())
                return
            if hold.shm_name:
                self._send(KvRead(local, n, owner, hold.shm_name, layout), hold.tensors())
                return
        except KvHandoffError as e:
            log.warning("ranks: %s; gathering the KV on rank 0", e)
        self._send(KvRead(local, n, owner), hold.tensors())

    def write_kv(self, slot: int, pulled: Any) -> None:
        """Import ``pulled`` (a ``KvPulled``): each rank copies its part itself (its KV heads, or the owning
        attention-DP rank all of them) out of shared memory, or out of the prefill's GPU pool by CUDA IPC; where
        a rank can't (no peer access between its GPU and the prefill's, say), rank 0 copies the KV and relays
        the parts over the data group."""
        local, owner = self._kv_target(slot)
        layout = pulled.layout
        n = layout.num_tokens
        try:
            if pulled.shm_name:
                self._send(KvWrite(local, n, owner, pulled.shm_name, layout), pulled.tensors())
                return
            if pulled.on_device and pulled.cuda_ipc:
                self._send(KvWrite(local, n, owner, "", layout, pulled.cuda_ipc, pulled.gpu_uuid))
                return
        except KvHandoffError as e:
            log.warning("ranks: %s; relaying the KV through rank 0", e)
        full = [
            torch.empty(shape, dtype=self.cache.dtype, device=self.cache.device) for shape, _ in layout.parts
        ]
        pulled.write_into(full)
        self._send(KvWrite(local, layout.num_tokens, owner), full)

    def close(self) -> None:
        """Tell the followers to exit (best effort: a dead peer makes this raise, and they exit anyway)."""
        if self._stopped:
            return
        self._stopped = True
        state = self.state
        log.info(
            "ranks: KV handoff bytes per rank %s copied directly, %s relayed through the data group",
            state.kv_bytes_by_rank,
            state.kv_relayed_by_rank,
        )
        try:
            self.control.send_command(Stop())
        except Exception as e:  # noqa: BLE001 - a peer already gone
            log.info("ranks: stop not delivered (%s)", e)


def follow(state: RankState, control: RankComm) -> None:
    """A follower's loop: run rank 0's commands until ``Stop``; a dead peer raises out of here."""
    while True:
        command = control.receive_command()
        if isinstance(command, Stop):
            return
        state.run(command)
