"""How requests are placed on instances — policy, admission queue, load view, prefill retries — with every
default in one place. The frontend's router and a decode_first worker read the same flags into it."""

from __future__ import annotations

from dataclasses import dataclass, field

from dynamo_lite.kv.blocks import KV_BLOCK_SIZE
from dynamo_lite.runtime.config import Timeouts


@dataclass(slots=True)
class PlacementSettings:
    """The placement flags (``--router-mode``, ``--queue-depth``, ...) that the frontend and decode_first
    workers share."""

    policy: str = "round-robin"  # --router-mode: round-robin | random | least-loaded | kv
    prefill_retries: int = 1  # another prefill worker after a failure, before falling back to local prefill
    kv_block_size: int = KV_BLOCK_SIZE  # tokens per hashed block in kv mode (the engines' block size)
    kv_load_weight: float = 4.0  # kv mode: one unit of load costs as much as this many uncached blocks
    kv_approx_ttl_s: float = 120.0  # kv mode without engine events: how long a routed prefix counts as cached
    load_report_ttl_s: float = 2.0  # load reports older than this are ignored
    # The queue of requests waiting for an instance with room, per model. Sized for the seed's benchmark (4096
    # concurrent streams against one prefill and one decode worker of max_inflight 1024: 3072 wait).
    queue_depth: int = 4096  # more waiting requests: 429 + Retry-After
    # first_token_s bounds each request-plane hop's first answer; queue_s the wait for room; retry_after_s what
    # a refused request is told to wait
    timeouts: Timeouts = field(default_factory=Timeouts)
