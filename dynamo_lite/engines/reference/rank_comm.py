"""The engine's ranks talking: one process group per engine, and the command channel rank 0 drives it with.

Each ranked engine builds its own process groups from its own ``TCPStore`` (``ProcessGroupGloo`` /
``ProcessGroupNCCL`` objects used directly, never ``init_process_group``): torch.distributed's default group is one
per process, and an embedded server (or a test) runs a prefill and a decode engine in one process.

Two groups: ``data`` (NCCL on CUDA, gloo on CPU) carries activations and KV; ``control`` (always gloo, CPU
tensors) carries rank 0's commands, msgpack-encoded (``Command``), never pickle. A peer that dies makes the next
collective on either group raise: that is how a rank's death reaches the others (``rank_runner``).
"""

from __future__ import annotations

import datetime
import logging

import msgspec
import torch
import torch.distributed as dist

from dynamo_lite.kv.layout import KvLayout

log = logging.getLogger(__name__)


class RankStep(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One rank's tokens for a step, in ``model.build_step``'s terms (slots local to the rank)."""

    decode: list[tuple[int, int, int]] = []  # (slot, position, token)
    prefill: list[tuple[int, int, list[int]]] = []  # (slot, start, tokens)
    sample_rows: list[int] = []


class Step(msgspec.Struct, tag="step", array_like=True, gc=False):
    """Run a forward: head-split ranks all run ``parts[0]``; attention-DP rank ``r`` runs ``parts[r]``."""

    parts: list[RankStep]


class KvWrite(msgspec.Struct, tag="kv_write", array_like=True, gc=False):
    """Take a sequence's KV (``num_tokens`` positions) into local ``slot`` of rank ``owner`` (-1: every rank its
    head shard). ``shm_name``: the KV lies in that shared-memory segment in ``layout`` (the one-rank layout,
    every KV head), and each rank copies its part out of it itself; ``cuda_ipc`` (with ``gpu_uuid``): likewise
    in the prefill worker's GPU pool, which each rank opens by CUDA IPC; neither: rank 0 holds it and sends each
    rank its part over the data group."""

    slot: int
    num_tokens: int
    owner: int = -1
    shm_name: str = ""
    layout: KvLayout | None = None
    cuda_ipc: bytes = b""
    gpu_uuid: str = ""


class KvRead(msgspec.Struct, tag="kv_read", array_like=True, gc=False):
    """Hand a sequence's KV out of local ``slot`` of rank ``owner`` (-1: every rank's head shard). ``shm_name``:
    each rank writes its part straight into that segment (the export hold, ``layout``); ``cuda_ipc`` (with
    ``gpu_uuid``): into that device hold, which each rank opens by CUDA IPC; neither: rank 0 collects the parts
    over the data group."""

    slot: int
    num_tokens: int
    owner: int = -1
    shm_name: str = ""
    layout: KvLayout | None = None
    cuda_ipc: bytes = b""
    gpu_uuid: str = ""


class Stop(msgspec.Struct, tag="stop", array_like=True, gc=False):
    pass


Command = Step | KvWrite | KvRead | Stop

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Command)


class RankComm:
    """Collectives of one engine's ranks over a process group object (see the module docstring)."""

    def __init__(self, group: dist.ProcessGroup, rank: int, size: int, backend: str = "gloo") -> None:
        self.group = group
        self.rank = rank
        self.size = size
        self.backend = backend  # "gloo" | "nccl"

    def abort(self) -> None:
        """Fail what waits on a dead peer (from another thread). NCCL only: its kernels would wait on the GPU
        until the group's timeout; gloo's wait already failed, its connection to the dead process closed."""
        if self.backend != "nccl":
            return
        try:
            self.group.abort()
        except Exception as e:  # noqa: BLE001 - best effort: the engine fails either way
            log.warning("ranks: aborting the NCCL group failed: %s", e)

    def all_reduce(self, t: torch.Tensor) -> None:
        self.group.allreduce([t]).wait()

    def broadcast(self, t: torch.Tensor, root: int = 0) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        self.group.broadcast([t], opts).wait()

    def all_gather(self, out: list[torch.Tensor], t: torch.Tensor) -> None:
        self.group.allgather([out], [t]).wait()

    def gather(self, out: list[torch.Tensor] | None, t: torch.Tensor, root: int = 0) -> None:
        opts = dist.GatherOptions()
        opts.rootRank = root
        self.group.gather([out] if out is not None else [], [t], opts).wait()

    def scatter(self, out: torch.Tensor, parts: list[torch.Tensor] | None, root: int = 0) -> None:
        opts = dist.ScatterOptions()
        opts.rootRank = root
        self.group.scatter([out], [parts] if parts is not None else [], opts).wait()

    def send(self, t: torch.Tensor, dst: int) -> None:
        self.group.send([t], dst, 0).wait()

    def recv(self, t: torch.Tensor, src: int) -> None:
        self.group.recv([t], src, 0).wait()

    # ---- the command channel (control group only) ----------------------------------------------------------

    def send_command(self, command: Command) -> None:
        payload = _encoder.encode(command)
        self.broadcast(torch.tensor([len(payload)], dtype=torch.int64))
        self.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8))

    def receive_command(self) -> Command:
        size = torch.zeros(1, dtype=torch.int64)
        self.broadcast(size)
        data = torch.empty(int(size[0]), dtype=torch.uint8)
        self.broadcast(data)
        return _decoder.decode(data.numpy().tobytes())


def data_backend(device: torch.device) -> str:
    """The data group's backend for ranks on ``device``: NCCL on CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def nccl_group(store: dist.Store, rank: int, size: int, timeout: datetime.timedelta) -> dist.ProcessGroup:
    """A ``ProcessGroupNCCL`` as ``init_process_group`` builds one (options with the timeout, normal-priority
    streams); its communicator is created at the first collective, on the tensor's device (each rank has set
    its own with ``torch.cuda.set_device``)."""
    if not dist.is_nccl_available():
        raise RuntimeError(
            "ranks on CUDA need torch.distributed's NCCL backend, which this torch build lacks"
        )
    opts = dist.ProcessGroupNCCL.Options()
    opts.is_high_priority_stream = False
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, size, opts)


def connect(
    store: dist.Store, rank: int, size: int, device: torch.device, timeout_s: float
) -> tuple[RankComm, RankComm]:
    """``(control, data)`` groups of rank ``rank`` over ``store``."""
    timeout = datetime.timedelta(seconds=timeout_s)
    control = dist.ProcessGroupGloo(dist.PrefixStore("control/", store), rank, size, timeout)
    backend = data_backend(device)
    data_store = dist.PrefixStore("data/", store)
    if backend == "nccl":
        data: dist.ProcessGroup = nccl_group(data_store, rank, size, timeout)
    else:
        data = dist.ProcessGroupGloo(data_store, rank, size, timeout)
    return RankComm(control, rank, size), RankComm(data, rank, size, backend)
