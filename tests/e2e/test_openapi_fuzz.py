"""schemathesis against /openapi.json of a live embedded server: generated requests never cause a 5xx."""

from __future__ import annotations

import shutil
import subprocess
import sys

import httpx
import pytest

from tests.conftest import free_port, spawn, wait_until


@pytest.mark.skipif(shutil.which("schemathesis") is None, reason="schemathesis is not installed")
def test_no_server_errors_on_generated_requests(tmp_path) -> None:
    port = free_port()
    server = spawn(
        "serve",
        [
            sys.executable,
            "-m",
            "dynamo_lite",
            "serve",
            "--engine",
            "mocker",
            "--speedup-ratio",
            "0",
            "--http-port",
            str(port),
            "--max-seq-len",
            "8192",
        ],
        tmp_path,
    )
    try:
        wait_until(lambda: "READY serving" in server.log() or not server.alive(), 60, what="embedded server")
        assert server.alive(), server.log()[-2000:]
        spec = httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=5).json()
        assert "ChatCompletionRequest" in spec["components"]["schemas"]
        run = subprocess.run(
            [
                "schemathesis",
                "run",
                f"http://127.0.0.1:{port}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--phases",
                "examples,coverage,fuzzing",
                "--max-examples",
                "25",
                "--workers",
                "1",
                "--max-time",
                "40",
                "--request-timeout",
                "30",
                "--suppress-health-check",
                "all",
            ],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=tmp_path,  # schemathesis keeps its cache (.schemathesis/) in the working directory
        )
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        assert "test cases" in run.stdout.lower() or "passed" in run.stdout.lower(), run.stdout[-2000:]
        print(run.stdout[-1500:])
        assert server.alive()
    finally:
        server.stop()
