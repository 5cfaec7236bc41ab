"""The Prometheus config and the Grafana dashboard (deploy/prometheus, deploy/grafana) checked against the
metrics the code exports and the pods the manifests declare.

The exported names and labels are read off prometheus_client's exposition of real ``FrontendMetrics`` and
``WorkerMetrics``; PromQL and the config go through ``promtool`` where it is installed (Debian package
``prometheus``).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess

import pytest
import yaml
from deploy_testing import DEPLOY, KUBECTL, assemble_base, pod_spec, render, workloads

DASHBOARD = DEPLOY / "grafana" / "dynamo_lite.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
PROMTOOL = shutil.which("promtool")
RANGE_FUNCTIONS = ("rate", "irate", "increase")
# Labels that Prometheus, not dynamo_lite, puts on the series (prometheus.yml's targets and relabeling).
SCRAPE_LABELS = {"job", "target", "component", "namespace", "pod"}
# What the dashboard must show (the operator's view of the request path).
REQUIRED = {
    "dynamo_frontend_requests_total",
    "dynamo_frontend_inflight_requests",
    "dynamo_frontend_time_to_first_token_seconds_bucket",
    "dynamo_frontend_inter_token_latency_seconds_bucket",
    "dynamo_frontend_output_tokens_total",
    "dynamo_lite_frontend_errors_total",
    "dynamo_frontend_queued_requests",
    "dynamo_lite_worker_active_seqs",
    "dynamo_lite_worker_batch_size",
    "dynamo_lite_worker_kv_bytes_held",
    "dynamo_lite_worker_kv_transfer_bytes_total",
    "dynamo_lite_worker_kv_transfer_seconds_total",
}


# ------------------------------------------------------------------------------------------------ metrics


@functools.cache
def exported() -> dict[str, tuple[str, frozenset[str]]]:
    """Sample name → (metric type, label names) of everything dynamo_lite exports, every series touched."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from dynamo_lite.engines.base import EngineStats
    from dynamo_lite.frontend.metrics import FrontendMetrics
    from dynamo_lite.worker.metrics import WorkerMetrics

    frontend = FrontendMetrics()
    m = frontend.model("m")
    m.ttft.observe(0.1)
    m.itl.observe(0.01)
    m.duration.observe(1.0)
    m.inflight.inc()
    m.output_tokens.inc()
    m.input_sequence.observe(3)
    m.output_sequence.observe(1)
    frontend.disconnects.inc()
    frontend.request_done("m", "chat", 200)
    frontend.watch_queue(lambda: {"m": 1})
    frontend.error("internal_error")
    worker = WorkerMetrics(lambda: EngineStats(), {"model": "m", "role": "decode", "instance": "i"})
    worker.observe("decode", "ok", 0.1)
    text = (generate_latest(frontend.registry) + generate_latest(worker.registry)).decode()
    samples: dict[str, tuple[str, frozenset[str]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name] = (family.type, frozenset(s.labels))
    return samples


def metric_names(expr: str) -> list[str]:
    return re.findall(r"\b(dynamo_(?:lite_)?[a-z_]+)\b", expr)


def panel_targets() -> list[tuple[dict, dict]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p, t) for p in panels for t in p.get("targets", [])]


def promql(expr: str) -> str:
    """The expression as Prometheus gets it from Grafana (variables filled in)."""
    return expr.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$role", ".*")


def test_exported_names_are_what_the_dashboard_is_built_on():
    names = exported()
    # The metric families the brief and the docs name; a rename in the code must show up here.
    assert REQUIRED <= names.keys(), sorted(REQUIRED - names.keys())
    assert names["dynamo_lite_worker_requests_total"][1] == {"model", "role", "instance", "phase", "status"}
    assert names["dynamo_frontend_requests_total"][1] == {
        "model",
        "endpoint",
        "request_type",
        "status",
        "error_type",
    }


# ------------------------------------------------------------------------------------------------ dashboard


def test_dashboard_is_a_grafana_dashboard():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    ids, cells = set(), set()
    for p in dash["panels"]:
        assert p["id"] not in ids, p["id"]
        ids.add(p["id"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        overlap = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not overlap & cells, f"panel {p['title']!r} overlaps another"
        cells |= overlap
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], p["title"]


def test_dashboard_queries_only_metrics_the_code_exports():
    names = exported()
    used = set()
    for p, t in panel_targets():
        found = metric_names(t["expr"])
        assert found, f"{p['title']}: no dynamo_lite metric in {t['expr']}"
        for name in found:
            assert name in names, f"{p['title']}: {name} is not exported (exported: {sorted(names)})"
        used |= set(found)
    assert REQUIRED <= used, sorted(REQUIRED - used)


def test_dashboard_takes_rates_of_counters_only():
    names = exported()
    for p, t in panel_targets():
        expr = t["expr"]
        for m in re.finditer(r"\b(dynamo_(?:lite_)?[a-z_]+)\b", expr):
            kind, _ = names[m.group(1)]
            in_rate = re.search(rf"\b(?:{'|'.join(RANGE_FUNCTIONS)})\(\s*$", expr[: m.start()]) is not None
            cumulative = kind in ("counter", "histogram")
            assert in_rate == cumulative, (
                f"{p['title']}: {m.group(1)} ({kind}) {'in' if in_rate else 'outside'} rate()"
            )


def test_dashboard_labels_exist_on_their_metrics():
    names = exported()
    for p, t in panel_targets():
        expr = t["expr"]
        labels = set(SCRAPE_LABELS)
        for m in re.finditer(r"\b(dynamo_(?:lite_)?[a-z_]+)\{([^}]*)\}", expr):
            have = names[m.group(1)][1]
            for matcher in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", m.group(2)):
                assert matcher in have, f"{p['title']}: {m.group(1)} has no label {matcher!r}"
        for name in metric_names(expr):
            labels |= names[name][1]
        grouped: set[str] = set()
        for by in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for label in (s.strip() for s in by.split(",")):
                assert label in labels, f"{p['title']}: grouping by {label!r}, which no metric here has"
                grouped.add(label)
        # A legend can name only labels that survive the aggregation.
        for label in re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", t.get("legendFormat", "")):
            assert label in grouped, f"{p['title']}: legend uses {label!r}, not in any by (...)"


def test_dashboard_quantiles_come_from_histogram_buckets():
    for p, t in panel_targets():
        for m in re.finditer(r"histogram_quantile\(\s*(0?\.\d+|1(?:\.0)?)\s*,(.*)", t["expr"]):
            inner = m.group(2)
            assert re.search(r"_bucket\b", inner), p["title"]
            by = re.search(r"\bby\s*\(([^)]*)\)", inner)
            assert by and "le" in {s.strip() for s in by.group(1).split(",")}, (
                f"{p['title']}: sum by (le, ...)"
            )


def test_dashboard_variables_query_exported_labels():
    names = exported()
    for v in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", v["query"]["query"])
        assert m, v["name"]
        assert m.group(2) in names[m.group(1)][1], v["name"]


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")
def test_dashboard_queries_are_valid_promql(tmp_path):
    rules = [
        {"record": f"dashboard:panel{p['id']}:{t['refId']}", "expr": promql(t["expr"])}
        for p, t in panel_targets()
    ]
    bad = dict(rules[0], expr="sum(rate(dynamo_frontend_requests_total[1m])")  # promtool must say no
    for name, group in (("good", rules), ("bad", [bad])):
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": group}]}))
        proc = subprocess.run(
            [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
        )
        assert (proc.returncode == 0) == (name == "good"), proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------ prometheus


def prometheus_config() -> dict:
    return yaml.safe_load(PROMETHEUS.read_text())


def jobs() -> dict[str, dict]:
    return {j["job_name"]: j for j in prometheus_config()["scrape_configs"]}


def test_prometheus_scrapes_the_documented_local_ports():
    from dynamo_lite.frontend.__main__ import parse_args

    all_jobs = jobs()
    assert {"dynamo_lite_frontend", "dynamo_lite_workers", "etcd", "kubernetes-pods"} <= all_jobs.keys()
    frontend = [t for sc in all_jobs["dynamo_lite_frontend"]["static_configs"] for t in sc["targets"]]
    assert frontend == [f"127.0.0.1:{parse_args([]).frontend.http_port}"]
    workers = {
        sc["labels"]["component"]: sc["targets"] for sc in all_jobs["dynamo_lite_workers"]["static_configs"]
    }
    assert set(workers) == {"prefill", "decode"}
    ports = {t.rsplit(":", 1)[1] for targets in workers.values() for t in targets}
    # The comment tells how to start the workers on these ports; it must name the same ones.
    documented = set(re.findall(r"--metrics-port (\d+)", PROMETHEUS.read_text()))
    assert ports == documented, (ports, documented)
    assert all_jobs["dynamo_lite_workers"]["honor_labels"] is True  # keep the workers' instance ids


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")
def test_prometheus_config_passes_promtool(tmp_path):
    """Debian's Prometheus is built without Kubernetes service discovery: that one block is swapped for a
    static target, so the rest (the relabel rules included) still goes through promtool."""
    config = prometheus_config()
    for job in config["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": ["127.0.0.1:1"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [PROMTOOL, "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def relabel(labels: dict[str, str], rules: list[dict]) -> dict[str, str] | None:
    """Prometheus' ``replace`` and ``keep`` relabel actions (anchored regexes, ``$1`` replacements), then what
    a target keeps: its labels without the ``__``-prefixed discovery ones, plus address and path."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule.get("source_labels", []))
        m = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if m is None:
                return None
        elif action == "replace":
            if m is not None:
                groups = ("", *(g or "" for g in m.groups()))
                out = re.sub(
                    r"\$\{?(\d+)\}?",
                    lambda g, groups=groups: groups[int(g.group(1))],
                    rule.get("replacement", "$1"),
                )
                if out:
                    labels[rule["target_label"]] = out
                else:
                    labels.pop(rule["target_label"], None)
        else:
            raise AssertionError(f"relabel action {action} is not emulated here")
    return {
        k: v for k, v in labels.items() if not k.startswith("__") or k in ("__address__", "__metrics_path__")
    }


def sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_targets(w: dict, ip: str) -> list[dict[str, str]]:
    """What Kubernetes pod discovery yields for one pod of ``w``: a target per declared container port."""
    meta = w["spec"]["template"]["metadata"]
    common = {
        "__meta_kubernetes_namespace": w["metadata"]["namespace"],
        "__meta_kubernetes_pod_name": "pod-0",
    }
    common |= {f"__meta_kubernetes_pod_label_{sanitize(k)}": v for k, v in meta.get("labels", {}).items()}
    common |= {
        f"__meta_kubernetes_pod_annotation_{sanitize(k)}": v for k, v in meta.get("annotations", {}).items()
    }
    common |= {"__metrics_path__": "/metrics", "job": "kubernetes-pods"}
    ports = [p["containerPort"] for c in pod_spec(w)["containers"] for p in c.get("ports", [])]
    return [
        common | {"__address__": f"{ip}:{p}", "__meta_kubernetes_pod_container_port_number": str(p)}
        for p in ports
    ]


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_kubernetes_pods_job_scrapes_what_the_pods_announce(variant, tmp_path_factory):
    if KUBECTL is None and variant != "gpu":
        pytest.skip("kubectl is not installed: the CPU overlay needs `kubectl kustomize`")
    objects = (
        assemble_base() if KUBECTL is None else render(variant, str(tmp_path_factory.mktemp("kustomize")))
    )
    rules = jobs()["kubernetes-pods"]["relabel_configs"]
    scraped = {}
    for w in workloads(objects):
        results = {tuple(sorted(r.items())) for t in pod_targets(w, "10.0.0.7") if (r := relabel(t, rules))}
        if results:
            assert len(results) == 1, f"{w['metadata']['name']}: several targets for one pod: {results}"
            (result,) = results
            scraped[w["metadata"]["name"]] = dict(result)
    expected = {
        "frontend": ("8000", "frontend"),
        "prefill": ("9090", "prefill"),
        "decode": ("9090", "decode"),
        "etcd": ("2381", "etcd"),
    }
    assert scraped.keys() == expected.keys()  # nats exports no Prometheus metrics: not scraped
    for name, (port, component) in expected.items():
        assert scraped[name]["__address__"] == f"10.0.0.7:{port}"
        assert scraped[name]["__metrics_path__"] == "/metrics"
        assert scraped[name]["component"] == component
        assert scraped[name]["namespace"] == "dynamo-lite"
