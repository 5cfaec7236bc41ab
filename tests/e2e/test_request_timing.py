"""Issue 17: ``nvext: {"extra_fields": ["timing", "worker_id"]}`` on a disaggregated request (etcd, nats-server,
frontend, prefill and decode worker processes) returns where the request spent its time; the parts add up to
the end-to-end time the client measured, within 5 %."""

from __future__ import annotations

import importlib.util
import json
import time
import uuid

import httpx
import pytest

from tests.conftest import Proc, Services, start_frontend, start_worker, wait_until

MODEL = "smol-mock"
# Engine time as the mocker models it (not sped up): prefill and decode take real milliseconds.
MOCKER_ARGS = ("--engine", "mocker", "--served-model-name", MODEL, "--speedup-ratio", "1")
TORCH_ARGS = ("--engine", "torch", "--served-model-name", MODEL, "--threads", "1", "--dtype", "float32")
PARTS = ("preprocess_ms", "queue_ms", "prefill_ms", "decode_ms")


@pytest.fixture(scope="module")
def launch(module_services: Services):
    """The stack of the workers' args (prefill, decode, frontend): started by the first test that asks for it,
    shared by the module's other tests."""
    procs: list[Proc] = []  # each one owned as soon as it runs
    stacks: dict[tuple[str, ...], list[Proc]] = {}

    def start(*worker_args: str) -> list[Proc]:
        if worker_args not in stacks:
            ns = f"t{uuid.uuid4().hex[:8]}"
            procs.append(start_worker(module_services, ns, "prefill", *worker_args, ready_timeout=120))
            procs.append(start_worker(module_services, ns, "decode", *worker_args, ready_timeout=120))
            procs.append(start_frontend(module_services, ns))
            stacks[worker_args] = procs[-3:]
        return stacks[worker_args]

    yield start
    for p in procs:
        p.kill()
    for p in procs:
        p.popen.wait(10)


def _post(http: httpx.Client, body: dict) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    r = http.post("/v1/chat/completions", json=body)
    return r, (time.perf_counter() - started) * 1000.0


def _check_breakdown(timing: dict, worker_id: dict, client_ms: float, prefill, decode, transports) -> None:
    assert worker_id == {
        "prefill_worker_id": prefill.extra["instance_id"],
        "decode_worker_id": decode.extra["instance_id"],
    }
    assert timing["prefill_worker_id"] == prefill.extra["instance_id"]
    assert timing["decode_worker_id"] == decode.extra["instance_id"]
    assert all(timing[k] >= 0 for k in PARTS)
    assert timing["prefill_ms"] > 0 and timing["decode_ms"] > 0
    # The workers' own view sits inside the router's round trips.
    assert 0 < timing["prefill_worker_ms"] <= timing["prefill_ms"]
    assert 0 <= timing["prefill_queue_ms"] < timing["prefill_worker_ms"]
    assert timing["kv_transfer_bytes"] > 0 and timing["kv_transport"] in transports
    assert 0 <= timing["kv_transfer_ms"] <= timing["decode_ms"]
    assert timing["ttft_ms"] <= timing["total_ms"] <= client_ms
    assert timing["decode_ms"] > 0.5 * timing["total_ms"]  # the parts below are not one part's rounding error
    parts = sum(timing[k] for k in PARTS)
    assert abs(parts - timing["total_ms"]) <= 0.05 * timing["total_ms"], (parts, timing)
    # The total is the request's time in the frontend: what the client saw, less the HTTP round trip.
    assert timing["total_ms"] >= 0.8 * client_ms, (timing["total_ms"], client_ms)


@pytest.mark.parametrize(
    ("engine", "stream"),
    [("mocker", False), ("mocker", True), pytest.param("torch", False, marks=pytest.mark.slow)],
)
def test_timing_parts_add_up_to_the_end_to_end_time(launch, engine: str, stream: bool):
    if engine == "torch":
        if importlib.util.find_spec("torch") is None:  # (not imported here: the workers load it)
            pytest.skip("torch is not installed")
        prefill, decode, frontend = launch(*TORCH_ARGS)
        transports = {"shm", "tcp"}  # one host: shared memory unless it is off
    else:
        prefill, decode, frontend = launch(*MOCKER_ARGS)
        transports = {"mocker"}
    with httpx.Client(base_url=f"http://127.0.0.1:{frontend.port}", timeout=30) as http:
        wait_until(
            lambda: MODEL in [m["id"] for m in http.get("/v1/models").json()["data"]], 20, what="model listed"
        )
        body = {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": "Tell me a long story about a lighthouse keeper. " * 20}
            ],
            "max_tokens": 48,
            "ignore_eos": True,
            "stream": stream,
            "nvext": {"extra_fields": ["timing", "worker_id"]},
        }
        # Without extra_fields nothing is added (and the frontend's tokenizer is loaded: preprocessing is not
        # what dominates the timed request).
        plain = {k: v for k, v in body.items() if k != "nvext"}
        r, _ = _post(http, dict(plain, stream=False))
        assert r.status_code == 200 and "nvext" not in r.json()

        r, client_ms = _post(http, body)
        assert r.status_code == 200, r.text
        if stream:
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            nvext = [c["nvext"] for c in chunks if "nvext" in c]
            assert len(nvext) == 1 and chunks[-1].get("nvext") == nvext[0] and chunks[-1]["choices"] == []
            nvext = nvext[0]
        else:
            nvext = r.json()["nvext"]
            assert r.json()["usage"]["completion_tokens"] == 48
        _check_breakdown(nvext["timing"], nvext["worker_id"], client_ms, prefill, decode, transports)
