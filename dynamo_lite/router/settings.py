"""Every knob of the router, with its default, in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from dynamo_lite.kv.blocks import KV_BLOCK_SIZE
from dynamo_lite.runtime.config import Timeouts


@dataclass(slots=True)
class RouterSettings:
    """How the router places requests (the frontend's ``--router-mode``, ``--disagg-threshold``, ... flags)."""

    policy: str = "round-robin"  # --router-mode: round-robin | random | least-loaded | kv
    # Prompts shorter than this skip the prefill worker (0: always disaggregate; negative: never — decode
    # workers prefill every prompt, and no prefill worker is needed).
    disagg_threshold: int = 0
    prefill_retries: int = 1  # another prefill worker after a failure, before falling back to local prefill
    migration_limit: int = 0  # times a request may move to another worker when its worker dies mid-stream
    kv_block_size: int = KV_BLOCK_SIZE  # tokens per hashed block in kv mode (the engines' block size)
    kv_load_weight: float = 4.0  # kv mode: one unit of load costs as much as this many uncached blocks
    kv_approx_ttl_s: float = 120.0  # kv mode without engine events: how long a routed prefix counts as cached
    load_report_ttl_s: float = 2.0  # load reports older than this are ignored
    # The queue of requests waiting for an instance with room, per model. Sized for the seed's benchmark (4096
    # concurrent streams against one prefill and one decode worker of max_inflight 1024: 3072 wait).
    queue_depth: int = 4096  # more waiting requests: 429 + Retry-After
    # first_token_s bounds each request-plane hop's first answer; queue_s the wait for room; retry_after_s
    timeouts: Timeouts = field(default_factory=Timeouts)
