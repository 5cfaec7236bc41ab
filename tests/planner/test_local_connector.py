"""The local connector with real processes: mocker workers in etcd/NATS behind a frontend; scaling decode down
while requests stream through it loses none of them (the removed worker drains on SIGTERM)."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx

from dynamo_lite.planner.connectors.local import LocalConnector
from dynamo_lite.planner.decide import DECODE, PREFILL
from dynamo_lite.planner.scrape import fetch
from tests.conftest import Services, start_frontend, wait_until

MODEL = "smol-mock"
TOKENS = 150  # ~1.5 s of decode at the mocker's real simulated time


def _chat(port: int, i: int) -> tuple[int, int]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"request {i}: tell me about planners"}],
        "max_tokens": TOKENS,
        "ignore_eos": True,
    }
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
    return r.status_code, (r.json().get("usage") or {}).get("completion_tokens", 0)


def _instances(port: int) -> dict[str, int]:
    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()["instances"]
    return {role: len(health.get(role, [])) for role in (PREFILL, DECODE)}


def test_scale_up_then_down_drains_without_losing_a_request(services: Services, tmp_path) -> None:
    ns = f"p{uuid.uuid4().hex[:8]}"
    common = ["--engine", "mocker", "--served-model-name", MODEL, "--lease-ttl", "2", "--drain-timeout", "20"]
    common += services.runtime_args(ns)
    conn = LocalConnector({PREFILL: common, DECODE: common}, tmp_path / "workers", kill_after_s=30)
    frontend = None
    try:
        conn.scale(PREFILL, 1)
        conn.scale(DECODE, 2)
        assert conn.replicas() == {PREFILL: 1, DECODE: 2}
        frontend = start_frontend(services, ns)
        wait_until(
            lambda: _instances(frontend.port) == {PREFILL: 1, DECODE: 2}, 60, 0.2, "3 workers registered"
        )
        assert all(fetch(u) is not None for u in conn.metrics_urls())

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(_chat, frontend.port, i) for i in range(8)]

            def both_decoding() -> bool:  # requests in flight on each decode worker
                active = [fetch(u).total("dynamo_lite_worker_active_seqs") for u in conn.metrics_urls()[1:]]
                return all(a > 0 for a in active)

            wait_until(both_decoding, 20, 0.05, "requests decoding on both decode workers")
            newest = conn.workers[-1]
            conn.scale(DECODE, 1)
            assert conn.replicas() == {PREFILL: 1, DECODE: 1}
            assert newest.draining_since is not None and newest.popen.poll() is None  # still draining
            results = [f.result() for f in futures]
        assert results == [(200, TOKENS)] * 8
        wait_until(lambda: newest.popen.poll() is not None, 25, 0.1, "the drained worker exited")
        assert newest.popen.returncode == 0
        wait_until(lambda: _instances(frontend.port) == {PREFILL: 1, DECODE: 1}, 10, 0.2, "deregistered")
        assert len(conn.metrics_urls()) == 2
        assert conn.worker_seconds() > 0
    finally:
        if frontend is not None:
            frontend.stop()
        conn.close(timeout_s=20)
    assert all(w.popen.poll() is not None for w in conn.workers)
