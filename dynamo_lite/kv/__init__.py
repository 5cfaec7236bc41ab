"""KV transfer for the torch engine: a prompt's KV moves from a prefill worker to a decode worker.

The prefill side holds the bytes under a lease (``KvExporter``) and hands out a ``KvDescriptor``; the decode
side pulls them straight from it (``pull_kv``) — shared memory when both run on one host, TCP otherwise.
The bytes never pass the frontend or NATS. See ``exporter`` and ``importer`` for the protocol.
"""

from dynamo_lite.kv.config import KvTransferConfig
from dynamo_lite.kv.errors import KvCapacityError, KvPullError, KvTransferError
from dynamo_lite.kv.exporter import ExporterStats, KvExporter, KvHold
from dynamo_lite.kv.importer import KvPulled, pull_kv, release_kv
from dynamo_lite.kv.layout import KvLayout, host_id

__all__ = [
    "ExporterStats",
    "KvCapacityError",
    "KvExporter",
    "KvHold",
    "KvLayout",
    "KvPullError",
    "KvPulled",
    "KvTransferConfig",
    "KvTransferError",
    "host_id",
    "pull_kv",
    "release_kv",
]
