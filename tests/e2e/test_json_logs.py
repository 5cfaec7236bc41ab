"""``python -m dynamo_lite serve`` with the HTTP API flags: ``--log-format json`` (every line the process writes is
one JSON object; a disaggregated request leaves one access line naming its prefill and decode instances),
``--api-key`` and ``--allow-unknown-fields`` (200 and a warning line naming the field)."""

from __future__ import annotations

import json
import sys

import openai
import pytest

from tests.conftest import free_port, spawn, wait_until


def test_serve_writes_json_lines_with_an_access_line(tmp_path) -> None:
    port = free_port()
    server = spawn(
        "serve",
        [sys.executable, "-m", "dynamo_lite", "serve", "--engine", "mocker", "--speedup-ratio", "0",
         "--http-port", str(port), "--log-format", "json", "--api-key", "sesame", "--allow-unknown-fields"],
        tmp_path,
    )  # fmt: skip
    try:
        wait_until(lambda: "READY serving" in server.log() or not server.alive(), 60, what="embedded server")
        assert server.alive(), server.log()[-2000:]
        base = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=base, api_key="sesame", max_retries=0)
        model = client.models.list().data[0].id
        r = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=5,
            extra_body={"ignore_eos": True, "my_own_field": 1},
        )
        rid = r.headers["x-request-id"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hello"}]
            )
        wait_until(lambda: server.log().count("dynamo_lite.access") == 2, 10, what="the access lines")
    finally:
        server.stop()
    lines = [line for line in server.log().splitlines() if line and not line.startswith("READY")]
    records = [json.loads(line) for line in lines]  # every line parses
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    answered, refused = [r for r in records if r["logger"] == "dynamo_lite.access"]
    assert (answered["request_id"], answered["status"], answered["completion_tokens"]) == (rid, 200, 5)
    assert answered["finish_reason"] == "length" and answered["prompt_tokens"] > 0
    assert answered["decode_instance"] and answered["prefill_instance"]
    assert answered["decode_instance"] != answered["prefill_instance"]
    assert refused["status"] == 401
    [warning] = [r for r in records if "unknown fields" in r["msg"]]
    assert warning["level"] == "WARNING" and "my_own_field" in warning["msg"] and rid in warning["msg"]
