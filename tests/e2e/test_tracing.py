"""Issue 17: OpenTelemetry tracing. A disaggregated request (etcd, nats-server, frontend, prefill and decode
worker processes with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set) is one trace, collected here by an OTLP/HTTP receiver:
spans from the three processes, parented along the request's path, the context carried in NATS headers."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.conftest import Services, start_frontend, start_worker, wait_until

pytest.importorskip("opentelemetry.sdk", reason="pip install 'dynamo_lite[tracing]'")
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402

MODEL = "smol-mock"
WORKER_ARGS = ("--served-model-name", MODEL, "--speedup-ratio", "1")
FRONTEND, PREFILL, DECODE = "dynamo_lite-frontend", "dynamo_lite-prefill", "dynamo_lite-decode"
EXPECTED = {
    *((FRONTEND, name) for name in ("request", "preprocess", "route", "prefill", "decode", "detokenize")),
    (PREFILL, "prefill"),
    (PREFILL, "queue"),
    (PREFILL, "compute"),
    (DECODE, "decode"),
    (DECODE, "kv_transfer"),
}


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    attributes: dict


class OtlpReceiver:
    """A tiny OTLP/HTTP trace receiver: POST /v1/traces with a protobuf ``ExportTraceServiceRequest``."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 — http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = self.path == "/v1/traces" and "protobuf" in self.headers.get("Content-Type", "")
                if ok:
                    receiver.add(ExportTraceServiceRequest.FromString(body))
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def add(self, request: ExportTraceServiceRequest) -> None:
        with self._lock:
            for rs in request.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        attrs = {a.key: _value(a.value) for a in s.attributes}
                        self.spans.append(
                            ReceivedSpan(
                                resource["service.name"],
                                s.name,
                                s.trace_id,
                                s.span_id,
                                s.parent_span_id,
                                attrs,
                            )
                        )

    def snapshot(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _value(v) -> object:  # noqa: ANN001 — an AnyValue
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def traced_stack(services: Services, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)  # the processes inherit it
    ns = f"t{uuid.uuid4().hex[:8]}"
    procs = []
    try:
        procs.append(start_worker(services, ns, "prefill", *WORKER_ARGS))
        procs.append(start_worker(services, ns, "decode", *WORKER_ARGS))
        procs.append(start_frontend(services, ns))
        yield procs
    finally:
        for p in procs:
            p.stop()  # SIGTERM: each process flushes its batched spans on the way out


def test_a_disaggregated_request_is_one_trace_across_three_processes(traced_stack, receiver):
    prefill, decode, frontend = traced_stack
    with httpx.Client(base_url=f"http://127.0.0.1:{frontend.port}", timeout=30) as http:
        wait_until(
            lambda: MODEL in [m["id"] for m in http.get("/v1/models").json()["data"]], 20, what="model listed"
        )
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi there " * 30}], "max_tokens": 8}
        r = http.post("/v1/chat/completions", json=body, headers={"x-request-id": "traced-1"})
        assert r.status_code == 200, r.text

    def roots() -> list[ReceivedSpan]:
        return [
            s for s in receiver.snapshot() if s.name == "request" and s.attributes["request.id"] == "traced-1"
        ]

    def complete() -> bool:
        found = roots()
        if not found:
            return False
        trace = [s for s in receiver.snapshot() if s.trace_id == found[0].trace_id]
        return {(s.service, s.name) for s in trace} >= EXPECTED

    wait_until(complete, 15, what="the request's spans from the three processes")
    [root] = roots()
    trace = [s for s in receiver.snapshot() if s.trace_id == root.trace_id]
    assert {s.service for s in trace} == {FRONTEND, PREFILL, DECODE}
    by_id = {s.span_id: s for s in trace}
    assert len(by_id) == len(trace)
    assert root.parent_id == b"" and root.service == FRONTEND

    def one(service: str, name: str) -> ReceivedSpan:
        [s] = [s for s in trace if s.service == service and s.name == name]
        return s

    def parent(s: ReceivedSpan) -> ReceivedSpan:
        return by_id[s.parent_id]

    # The frontend: preprocessing, routing (the decode and the prefill instance), the router's round trips,
    # detokenization, all children of the request.
    for name in ("preprocess", "prefill", "decode", "detokenize"):
        assert parent(one(FRONTEND, name)) == root, name
    routes = [s for s in trace if s.service == FRONTEND and s.name == "route"]
    assert sorted(s.attributes["role"] for s in routes) == ["decode", "prefill"]
    assert all(parent(s) == root for s in routes)
    # The workers continue the router's spans (the context came in the NATS message headers).
    worker_prefill, worker_decode = one(PREFILL, "prefill"), one(DECODE, "decode")
    assert parent(worker_prefill) == one(FRONTEND, "prefill")
    assert parent(worker_decode) == one(FRONTEND, "decode")
    assert worker_prefill.attributes["instance.id"] == prefill.extra["instance_id"]
    assert worker_decode.attributes["instance.id"] == decode.extra["instance_id"]
    # The prefill worker's time: waiting in the engine's queue, then computing (one after the other).
    assert (
        parent(one(PREFILL, "queue")) == worker_prefill and parent(one(PREFILL, "compute")) == worker_prefill
    )
    kv = one(DECODE, "kv_transfer")
    assert parent(kv) == worker_decode
    assert kv.attributes["kv.bytes"] > 0 and kv.attributes["kv.transport"] == "mocker"


def test_tracing_is_off_and_not_imported_without_configuration():
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    code = (
        "import sys\n"
        "from dynamo_lite import tracing\n"
        "import dynamo_lite.frontend.serving, dynamo_lite.worker.worker, dynamo_lite.router.orchestrator\n"
        "assert not tracing.setup('x') and not tracing.enabled()\n"
        "assert tracing.headers() is None\n"
        "with tracing.span('s'):\n"
        "    tracing.past_span('p', 0.1)\n"
        # (FastAPI imports the OpenTelemetry API itself; the SDK and the exporter are ours to load.)
        "loaded = [m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))]\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
