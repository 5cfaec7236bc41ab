"""The ``--workers`` supervisor's restart policy, with a small script as the child (the real frontend children
are in tests/e2e/test_frontend_workers.py)."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from pathlib import Path

import pytest

from dynamo_lite.frontend import __main__ as frontend_cli
from dynamo_lite.frontend.settings import FrontendSettings
from dynamo_lite.frontend.supervisor import READY, Restarts, Supervisor, reserve_port

FAST = Restarts(backoff_s=0.01, backoff_max_s=0.05, max_start_failures=3, stop_grace_s=5.0)

# Starts: the first child of each slot gets ready, then dies; every later one dies before getting ready.
FLAKY = f"""
import os, sys, time
mark = os.path.join(sys.argv[1], "started-" + sys.argv[2])
first = not os.path.exists(mark)
open(mark, "a").write(str(os.getpid()) + "\\n")
if first:
    print("{READY} http://x", flush=True)
    time.sleep(0.2)
sys.exit(3)
"""


def run_supervisor(tmp_path: Path, script: str, argv: list[str], workers: int) -> int:
    settings = FrontendSettings(http_port=0, workers=workers)
    sup = Supervisor(argv, settings, 0, tmp_path, FAST, (sys.executable, "-c", script, str(tmp_path)))
    return asyncio.run(asyncio.wait_for(sup.run(), 60))


def test_a_child_that_keeps_dying_before_ready_makes_the_supervisor_exit_1(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, "dynamo_lite.frontend.supervisor")
    assert run_supervisor(tmp_path, FLAKY, ["0"], workers=1) == 1
    starts = (tmp_path / "started-0").read_text().split()
    assert len(starts) == 1 + FAST.max_start_failures  # the ready one, then the restarts that never got ready
    assert capsys.readouterr().out.count(READY) == 1  # announced once, when all (one) were ready
    assert caplog.text.count("restarting in") == FAST.max_start_failures
    assert "died 3 times before getting ready" in caplog.text


def test_a_child_failing_before_the_frontend_was_ever_ready_stops_all_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert run_supervisor(tmp_path, "import sys; sys.exit(2)", [], workers=2) == 1
    assert "exited with 2 while starting" in caplog.text
    assert "restarting" not in caplog.text


def test_the_reserved_port_takes_children_with_so_reuseport_and_nobody_else() -> None:
    held = reserve_port("127.0.0.1", 0)
    try:
        port = held.getsockname()[1]
        child = socket.socket()
        child.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        child.bind(("127.0.0.1", port))
        child.listen()
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            conn, _ = child.accept()  # the held socket never listens: connections reach the child
            conn.close()
        child.close()
        stranger = socket.socket()
        with pytest.raises(OSError):
            stranger.bind(("127.0.0.1", port))
        stranger.close()
        with pytest.raises(OSError):  # nor a second supervisor, though it would bind with SO_REUSEPORT too
            reserve_port("127.0.0.1", port).close()
    finally:
        held.close()


def test_the_workers_flag() -> None:
    assert frontend_cli.parse_args([]).frontend.workers == FrontendSettings().workers == 1
    assert frontend_cli.parse_args(["--workers", "3"]).frontend.workers == 3
    for bad in (["--workers", "0"], ["--workers", "2", "--in-memory"]):
        with pytest.raises(SystemExit):
            frontend_cli.parse_args(bad)
