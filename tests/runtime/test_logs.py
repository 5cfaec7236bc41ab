"""JSON log lines (``--log-format json``): one object per line with ts, level, logger, msg and the extras."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from dynamo_lite.runtime.logs import JsonFormatter


def _record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("dynamo_lite.x", logging.WARNING, __file__, 1, msg, args, exc_info)
    record.__dict__.update(extra)
    return record


def test_a_json_line_holds_the_message_and_the_extras() -> None:
    line = JsonFormatter().format(_record("served %d tokens\nin two lines", 5, request_id="r1", ttft_ms=12.5))
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "WARNING" and out["logger"] == "dynamo_lite.x"
    assert out["msg"] == "served 5 tokens\nin two lines"
    assert (out["request_id"], out["ttft_ms"]) == ("r1", 12.5)
    assert out["ts"].endswith("+00:00") and "T" in out["ts"]
    assert not {"args", "levelno", "pathname", "exc_info"} & set(out)


def test_a_json_line_carries_the_traceback() -> None:
    out = json.loads(JsonFormatter().format(_record("failed", exc=True, when=object())))
    assert "ValueError: boom" in out["exc"]
    assert out["when"].startswith("<object")  # anything not JSON is written as its str


@pytest.mark.parametrize("cli", ["worker", "frontend", "serve"])
def test_every_process_takes_log_format(cli: str) -> None:
    from dynamo_lite import serve
    from dynamo_lite.frontend import __main__ as frontend_cli
    from dynamo_lite.worker import __main__ as worker_cli

    if cli == "serve":
        import argparse

        parser = argparse.ArgumentParser()
        serve.add_serve_args(parser)
    else:
        parser = (worker_cli if cli == "worker" else frontend_cli).build_parser()
    assert parser.parse_args([]).log_format == "text"
    assert parser.parse_args(["--log-format", "json"]).log_format == "json"
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-format", "xml"])
