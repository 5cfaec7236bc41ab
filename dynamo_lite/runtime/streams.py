"""What the request planes share: the ``ErrorInfo`` a stream carries for a handler's failure."""

from __future__ import annotations

import logging

from dynamo_lite.protocol import ErrorInfo, IncompatibleWire, StreamError, WireError

log = logging.getLogger(__name__)


def error_info_for(exc: BaseException) -> ErrorInfo:
    """The ``ErrorInfo`` a stream carries for a handler's exception (engines raise ``EngineError``)."""
    if isinstance(exc, StreamError):
        return exc.info
    if isinstance(exc, WireError):  # our own processes disagree on the wire: never the client's fault
        return IncompatibleWire(f"unreadable request: {exc}").info
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return ErrorInfo(status, str(exc), getattr(exc, "code", "engine_error"))
    log.exception("handler failed", exc_info=exc)
    return ErrorInfo(500, f"{type(exc).__name__}: {exc}", "internal_error")
