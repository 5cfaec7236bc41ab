"""The placement flags, bound once: the frontend (its router) and decode_first workers (their prefill
handoff) add the same group, so both place requests as the same flags say."""

from __future__ import annotations

import argparse
from typing import Any, TypeVar

from dynamo_lite.placement.policies import POLICIES
from dynamo_lite.placement.settings import PlacementSettings
from dynamo_lite.runtime.config import Timeouts

_P, _T = PlacementSettings(), Timeouts()  # the defaults every flag shows
S = TypeVar("S", bound=PlacementSettings)


def add_placement_args(parser: argparse.ArgumentParser, title: str = "placement") -> None:
    """``--router-mode``, ``--kv-load-weight``, ``--queue-depth``, ``--queue-timeout`` and
    ``--worker-return-timeout``."""
    g = parser.add_argument_group(title)
    g.add_argument("--router-mode", default=_P.policy, choices=POLICIES)
    g.add_argument(
        "--kv-load-weight",
        type=float,
        default=_P.kv_load_weight,
        help="kv router: cost of one unit of load, in uncached prompt blocks",
    )
    g.add_argument(
        "--queue-depth",
        type=int,
        default=_P.queue_depth,
        help="requests per model that may wait for a worker with room; more are refused (429 + Retry-After)",
    )
    g.add_argument(
        "--queue-timeout",
        type=float,
        default=_T.queue_s,
        help="seconds a request may wait for a worker with room, then 503 + Retry-After",
    )
    g.add_argument(
        "--worker-return-timeout",
        type=float,
        default=_T.worker_return_s,
        help="seconds a started stream whose role lost its last worker waits for one to come back (a restarting "
        "worker of a one-GPU 1P+1D deployment) before it fails; 0: it fails at once",
    )


def placement_settings(
    args: argparse.Namespace, timeouts: Timeouts, cls: type[S] = PlacementSettings, **fields: Any
) -> S:
    """``cls`` (``PlacementSettings`` or a subclass, given its own ``fields``) from ``add_placement_args``'s
    flags; ``--queue-timeout`` and ``--worker-return-timeout`` belong to ``timeouts``, the process's."""
    return cls(
        policy=args.router_mode,
        kv_load_weight=args.kv_load_weight,
        queue_depth=args.queue_depth,
        timeouts=timeouts,
        **fields,
    )
