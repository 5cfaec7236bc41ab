"""The ranks' communication layer on its own: the command channel's messages, and the NCCL path as far as a CPU
can take it (which backend a device gets, the ``ProcessGroupNCCL`` built as ``init_process_group`` builds one,
its abort on a death, a clear error on a torch without NCCL). The NCCL groups themselves run on GPUs:
``test_ranks_cuda.py`` and ``benchmarks/gpu/run_ranks.sh``."""

from __future__ import annotations

import datetime

import msgspec
import pytest
import torch
import torch.distributed as dist

from dynamo_lite.engines.reference import rank_comm
from dynamo_lite.engines.reference.rank_comm import (
    Command,
    KvRead,
    KvWrite,
    RankComm,
    RankStep,
    Step,
    Stop,
    connect,
    data_backend,
)
from dynamo_lite.kv.layout import KvLayout


def test_commands_round_trip() -> None:
    layout = KvLayout(4, 2, 16, "float32", 26, 16, (0, 2))
    decoder = msgspec.msgpack.Decoder(Command)
    for command in (
        Step([RankStep([(0, 5, 7)], [(1, 0, [1, 2, 3])], [0, 3]), RankStep()]),
        KvWrite(3, 26, 1, "dlkv_1_ab", layout),
        KvRead(0, 26),
        Stop(),
    ):
        assert decoder.decode(msgspec.msgpack.encode(command)) == command


def test_the_data_group_is_nccl_on_cuda_and_gloo_elsewhere() -> None:
    assert data_backend(torch.device("cuda", 1)) == "nccl"
    assert data_backend(torch.device("cpu")) == "gloo"


def test_one_rank_of_gloo_runs_commands_and_collectives() -> None:
    store = dist.HashStore()
    control, data = connect(store, 0, 1, torch.device("cpu"), 10.0)
    assert (control.backend, data.backend) == ("gloo", "gloo")
    t = torch.arange(4.0)
    data.all_reduce(t)
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
    control.send_command(KvWrite(1, 2))  # two broadcasts from rank 0 (to nobody)
    data.abort()  # gloo: nothing to do (a dead peer's connection already failed the wait)
    data.all_reduce(t)


class FakeNccl:
    """Stands in for ``dist.ProcessGroupNCCL`` (absent from CPU builds of torch): records how it was built."""

    built: list[FakeNccl] = []

    class Options:
        def __init__(self) -> None:
            self.is_high_priority_stream = True
            self._timeout = datetime.timedelta(0)

    def __init__(self, store: dist.Store, rank: int, size: int, opts: FakeNccl.Options) -> None:
        self.store, self.rank, self.size, self.opts = store, rank, size, opts
        self.aborted = False
        FakeNccl.built.append(self)

    def abort(self) -> None:
        self.aborted = True


def test_connect_on_cuda_builds_an_nccl_data_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(dist, "ProcessGroupNCCL", FakeNccl, raising=False)
    FakeNccl.built.clear()
    store = dist.HashStore()
    control, data = connect(store, 0, 1, torch.device("cuda", 0), 7.0)
    [group] = FakeNccl.built
    assert data.group is group and data.backend == "nccl" and control.backend == "gloo"
    assert (group.rank, group.size) == (0, 1)
    assert group.opts._timeout == datetime.timedelta(seconds=7) and not group.opts.is_high_priority_stream
    group.store.set("k", "v")  # the data group's keys live under their own prefix of the ranks' store
    assert group.store.get("k") == b"v" and not store.check(["k"])
    data.abort()
    assert group.aborted
    RankComm(group, 0, 1, "gloo").abort()  # only an NCCL group is aborted


def test_a_torch_without_nccl_is_told_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    with pytest.raises(RuntimeError, match="NCCL backend, which this torch build lacks"):
        rank_comm.nccl_group(dist.HashStore(), 0, 1, datetime.timedelta(seconds=1))
