"""What can go wrong moving KV."""

from __future__ import annotations


class KvTransferError(Exception):
    """Base of the KV transfer's errors."""


class KvCapacityError(KvTransferError):
    """The exporter refuses a new hold: it would exceed ``max_held_bytes`` or ``max_transfer_bytes``."""


class KvPullError(KvTransferError):
    """A pull failed: prefill worker dead or unreachable, lease expired or unknown id, wrong secret, already
    claimed, size or layout mismatch, corrupt bytes, or a timeout. The decode side recomputes or fails."""
