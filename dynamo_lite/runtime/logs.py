"""Process logging: text lines, or one JSON object per line (``--log-format json``) for log collectors.

A JSON line holds ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg`` and every ``extra=`` field of the call
(the access log's request id, tokens, timings), plus ``exc`` with the traceback when there is one.

>>> configure_logging("INFO", "json")  # doctest: +SKIP
>>> logging.getLogger("x").info("ready", extra={"port": 8000})  # doctest: +SKIP
{"ts":"2026-12-01T23:59:59.123+00:00","level":"INFO","logger":"x","msg":"ready","port":8000}
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TEXT_FORMAT_PID = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


@dataclass(frozen=True, slots=True)
class LogSettings:
    """How a process logs (``--log-level``/``DYN_LOG``, ``--log-format``/``DYN_LOGGING_JSONL``)."""

    level: str = "INFO"
    format: str = "text"  # one of LOG_FORMATS


_DEFAULTS = LogSettings()


# Attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line; ``process_id``: with the process's ``pid``."""

    def __init__(self, process_id: bool = False) -> None:
        super().__init__()
        self._process_id = process_id

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self._process_id:
            out["pid"] = record.process
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stack"] = record.stack_info
        return orjson.dumps(out, default=str).decode()


def configure_logging(level: str, log_format: str = _DEFAULTS.format, process_id: bool = False) -> None:
    """The root logger at ``level``, writing ``log_format`` lines to stderr (replacing earlier handlers);
    ``process_id``: each line names the process (several processes writing to one stderr)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, not {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(process_id))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT_PID if process_id else TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
