"""``python -m dynamo_lite serve --log-format json``: every line the process writes is one JSON object, and a
disaggregated request leaves one access line naming its prefill and decode instances."""

from __future__ import annotations

import json
import sys

import openai

from tests.conftest import free_port, spawn, wait_until


def test_serve_writes_json_lines_with_an_access_line(tmp_path) -> None:
    port = free_port()
    server = spawn(
        "serve",
        [sys.executable, "-m", "dynamo_lite", "serve", "--engine", "mocker", "--speedup-ratio", "0",
         "--http-port", str(port), "--log-format", "json"],
        tmp_path,
    )  # fmt: skip
    try:
        wait_until(lambda: "READY serving" in server.log() or not server.alive(), 60, what="embedded server")
        assert server.alive(), server.log()[-2000:]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.with_raw_response.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=5,
            extra_body={"ignore_eos": True},
        )
        rid = r.headers["x-request-id"]
        wait_until(lambda: rid in server.log(), 10, what="the access line")
    finally:
        server.stop()
    lines = [line for line in server.log().splitlines() if line and not line.startswith("READY")]
    records = [json.loads(line) for line in lines]  # every line parses
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    [access] = [r for r in records if r["logger"] == "dynamo_lite.access"]
    assert (access["request_id"], access["status"], access["completion_tokens"]) == (rid, 200, 5)
    assert access["finish_reason"] == "length" and access["prompt_tokens"] > 0
    assert access["decode_instance"] and access["prefill_instance"]
    assert access["decode_instance"] != access["prefill_instance"]
