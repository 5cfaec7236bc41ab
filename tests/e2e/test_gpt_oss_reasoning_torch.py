"""JSON with reasoning, for real: the tiny gpt-oss (random weights) on the torch engine, prefill and decode workers
in two processes over etcd + NATS, ``response_format: json_schema`` (nested) and a reasoning budget. The engine
opens the analysis channel, forces the final channel open at the budget, and xgrammar constrains only the
answer: every sampled answer validates, its reasoning is free text within the budget."""

from __future__ import annotations

import json
import uuid

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import Services, start_frontend, start_worker, wait_until
from tests.engines.reference.gpt_oss_testing import tiny_folder

from .test_distributed_mocker import worker_requests

pytest.importorskip("torch")
pytest.importorskip("xgrammar")

WORKER_ARGS = ("--engine", "torch", "--threads", "1", "--dtype", "float32", "--max-batch-size", "8")
WORKER_ARGS += ("--max-seq-len", "256", "--lease-ttl", "3")
BUDGET = 12
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Tokyo", "Lima"]},
        "forecast": {
            "type": "object",
            "properties": {"rain": {"type": "boolean"}, "days": {"enum": [1, 2, 3]}},
            "required": ["rain", "days"],
            "additionalProperties": False,
        },
    },
    "required": ["city", "forecast"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True},
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):  # noqa: ANN001
    return tiny_folder(tmp_path_factory)


def test_json_schema_with_a_reasoning_budget_disaggregated(services: Services, folder) -> None:  # noqa: ANN001
    ns = f"t{uuid.uuid4().hex[:8]}"
    model = ("--model-path", str(folder))
    procs = [
        start_worker(services, ns, "prefill", *WORKER_ARGS, *model, engine="torch", ready_timeout=120),
        start_worker(services, ns, "decode", *WORKER_ARGS, *model, engine="torch", ready_timeout=120),
    ]
    try:
        procs.append(start_frontend(services, ns))
        url = f"http://127.0.0.1:{procs[-1].port}"
        wait_until(
            lambda: folder.name in httpx.get(url + "/v1/models", timeout=2).text, 20, what="model listed"
        )
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        body = {
            "model": folder.name,
            "messages": [{"role": "user", "content": "Weather for a trip, as JSON."}],
            "response_format": RESPONSE_FORMAT,
            "max_tokens": 80,
            "temperature": 1.0,
            "extra_body": {"thinking_token_budget": BUDGET},
        }
        for seed in range(20):
            if seed % 2 == 0:
                r = client.chat.completions.create(seed=seed, **body)
                choice = r.choices[0]
                content, reasoning = choice.message.content, choice.message.model_extra["reasoning_content"]
                finish, usage = choice.finish_reason, r.usage
            else:
                content = reasoning = ""
                finish = usage = None
                stream = client.chat.completions.create(
                    seed=seed, stream=True, stream_options={"include_usage": True}, **body
                )
                for chunk in stream:
                    for c in chunk.choices:
                        content += c.delta.content or ""
                        reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
                        finish = c.finish_reason or finish
                    usage = chunk.usage or usage
            jsonschema.validate(json.loads(content), SCHEMA)
            assert finish == "stop", (seed, content)
            assert reasoning and "<|" not in reasoning, seed  # free text, from the analysis channel
            assert 0 < usage.completion_tokens_details.reasoning_tokens <= BUDGET, seed
        # Every request ran its prefill and its decode on the two processes.
        assert (
            worker_requests(procs[0].port, "prefill") >= 20 and worker_requests(procs[1].port, "decode") >= 20
        )
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.popen.wait(10)
