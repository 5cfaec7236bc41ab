"""One INFO line per request on the ``dynamo_lite.access`` logger: who asked what, how it ended, how long it took.

The text line is ``key=value`` pairs; every pair is also a field of the record (``extra``), so a JSON log line
(``--log-format json``) carries them as its own keys.
"""

from __future__ import annotations

import logging

access_logger = logging.getLogger("dynamo_lite.access")


def log_access(
    *,
    request_id: str,
    endpoint: str,
    model: str,
    status: int,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    cached_tokens: int = 0,
    ttft_s: float | None = None,
    duration_s: float | None = None,
    finish_reason: str | None = None,
    instances: dict[str, str] | None = None,
) -> None:
    if not access_logger.isEnabledFor(logging.INFO):
        return
    fields: dict[str, object] = {
        "request_id": request_id,
        "endpoint": endpoint,
        "model": model,
        "status": status,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cached_tokens": cached_tokens,
        "ttft_ms": None if ttft_s is None else round(ttft_s * 1000, 1),
        "duration_ms": None if duration_s is None else round(duration_s * 1000, 1),
        "finish_reason": finish_reason,
    }
    for role, instance_id in (instances or {}).items():
        fields[f"{role}_instance"] = instance_id
    given = {k: v for k, v in fields.items() if v is not None and v != ""}
    access_logger.info(" ".join(f"{k}={v}" for k, v in given.items()), extra=given)
