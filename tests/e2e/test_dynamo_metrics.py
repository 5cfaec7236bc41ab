"""Issue 17: every metric name and label that NVIDIA Dynamo's Grafana dashboards query (recorded, with their
source, in ``dynamo_lite/frontend/dynamo_metric_facts.yaml``) is on our ``/metrics`` after one request:
the frontend's, and the prefill and decode workers' (etcd, nats-server and three processes)."""

from __future__ import annotations

import re
import urllib.request
import uuid
from pathlib import Path

import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Services, start_frontend, start_worker, wait_until

FACTS = Path(__file__).parents[2] / "dynamo_lite" / "frontend" / "dynamo_metric_facts.yaml"
MODEL = "smol-mock"
WORKER_ARGS = ("--served-model-name", MODEL, "--speedup-ratio", "0")
_METRIC = re.compile(r"\b(dynamo_(?:frontend|component)_[a-z_]+)\b")


def queried(queries: list[dict], scrape_labels: set[str]) -> dict[str, set[str]]:
    """Metric (sample) name → the labels the queries select, group or show it by (scrape labels left out)."""
    out: dict[str, set[str]] = {}
    for q in queries:
        expr = q["expr"]
        names = _METRIC.findall(expr)
        assert names, q
        shown = set(q.get("legend", []))
        for name in names:
            out.setdefault(name, set()).update(shown)
        for m in re.finditer(r"\b(dynamo_(?:frontend|component)_[a-z_]+)\{([^}]*)\}", expr):
            out[m.group(1)].update(re.findall(r"([A-Za-z_]+)\s*(?:=~|!~|!=|=)", m.group(2)))
        for by in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for name in names:
                out[name].update(s.strip() for s in by.split(","))
        for metric, label in re.findall(r"label_values\((\w+),\s*(\w+)\)", expr):
            out[metric].add(label)
    return {name: labels - scrape_labels for name, labels in out.items()}


def exposed(port: int) -> dict[str, set[str]]:
    """Sample name → label names on the ``/metrics`` at ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, set()).update(s.labels)
    return samples


def test_queries_parse_to_names_and_labels():
    """The parser this test relies on, on one query of each shape."""
    got = queried(
        [
            {"expr": 'rate(x_total{namespace=~"$n"}[1m]) + rate(dynamo_frontend_requests_total{a="1"}[1m])'},
            {"expr": "sum by (le, b) (rate(dynamo_component_d_bucket[5m]))", "legend": ["c"]},
            {"expr": "label_values(dynamo_frontend_requests_total, namespace)"},
        ],
        {"namespace"},
    )
    assert got == {"dynamo_frontend_requests_total": {"a"}, "dynamo_component_d_bucket": {"le", "b", "c"}}


@pytest.fixture
def stack(services: Services):
    ns = f"t{uuid.uuid4().hex[:8]}"
    procs = []
    try:
        procs.append(start_worker(services, ns, "prefill", *WORKER_ARGS))
        procs.append(start_worker(services, ns, "decode", *WORKER_ARGS))
        procs.append(start_frontend(services, ns))
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.popen.wait(10)


def test_live_metrics_have_every_name_and_label_dynamos_dashboards_query(stack):
    prefill, decode, frontend = stack
    facts = yaml.safe_load(FACTS.read_text())
    scrape = set(facts["scrape_labels"])
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{frontend.port}/v1", api_key="x", max_retries=0)
    wait_until(lambda: MODEL in [m.id for m in client.models.list().data], 20, what="model listed")
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert r.usage.completion_tokens == 4

    frontend_wants = queried(facts["frontend_dashboard"] + facts["disagg_dashboard"]["frontend"], scrape)
    worker_wants = queried(facts["disagg_dashboard"]["worker"], scrape)
    assert len(frontend_wants) >= 12 and len(worker_wants) >= 7  # the recorded lists were read whole
    have = exposed(frontend.port)
    for name, labels in frontend_wants.items():
        assert name in have, f"frontend /metrics has no {name}"
        assert labels <= have[name], f"{name}: missing labels {labels - have[name]}"
    assert have["dynamo_frontend_requests_total"] >= set(facts["requests_total_labels"])
    for worker, component in ((prefill, "prefill"), (decode, "backend")):
        have = exposed(worker.port)
        for name, labels in worker_wants.items():
            assert name in have, f"{component} worker /metrics has no {name}"
            assert labels <= have[name], f"{name}: missing labels {labels - have[name]}"
        text = urllib.request.urlopen(f"http://127.0.0.1:{worker.port}/metrics", timeout=5).read().decode()
        assert f'dynamo_component="{component}"' in text
        assert re.search(
            rf'dynamo_component_requests_total\{{[^}}]*dynamo_component="{component}"[^}}]*\}} 1\.0', text
        )
