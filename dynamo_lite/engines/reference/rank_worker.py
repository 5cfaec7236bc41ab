"""A follower rank of the torch engine (started by ``rank_processes``, never by hand): load this rank's shard,
join the groups, run rank 0's commands until told to stop or rank 0 is gone."""

from __future__ import annotations

import ctypes
import datetime
import logging
import os
import signal
import sys

import msgspec

import dynamo_lite.engines.reference  # noqa: F401 - sets OpenMP up before torch loads


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux), so no rank outlives its worker."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(1)


def main(argv: list[str]) -> int:
    import torch
    import torch.distributed as dist

    from dynamo_lite.engines.reference.loader import model_config
    from dynamo_lite.engines.reference.rank_comm import connect
    from dynamo_lite.engines.reference.rank_processes import RankArgs, rank_device
    from dynamo_lite.engines.reference.rank_runner import follow
    from dynamo_lite.engines.reference.startup import EngineSetup, resolve_quantization
    from dynamo_lite.model_files import resolve_model

    args = msgspec.json.decode(argv[0], type=RankArgs)
    _die_with_parent(args.parent_pid)
    logging.basicConfig(level=logging.WARNING, format=f"rank {args.rank} %(levelname)s %(name)s: %(message)s")
    config = args.config
    if config.threads:
        torch.set_num_threads(config.threads)
    files = resolve_model(config.model_path)
    cfg = model_config(files.config)
    resolve_quantization(config, files, cfg)
    device = rank_device(torch.device(config.device), args.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore(
        "127.0.0.1",
        args.port,
        args.size,
        is_master=False,
        timeout=datetime.timedelta(seconds=config.rank_timeout_s),
    )
    control, data = connect(store, args.rank, args.size, device, config.rank_timeout_s)
    plan = config.parallel_plan().for_rank(args.rank)
    max_seq_len = min(config.max_seq_len, cfg.max_position_embeddings)
    setup = EngineSetup(
        config, files, cfg, device, getattr(torch, config.dtype), max_seq_len, config.kv_config(), None,
        lambda _event: None, plan=plan, comms=(control, data),
    )  # fmt: skip
    try:
        with torch.inference_mode():
            setup.load()
            assert setup.state is not None
            follow(setup.state, control)
    except Exception as e:  # a peer gone (rank 0 stopped or died): nothing here outlives it
        logging.getLogger(__name__).warning("rank %d: exiting (%s)", args.rank, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
