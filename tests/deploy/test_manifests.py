"""The Kubernetes manifests (deploy/k8s) checked against the code they deploy.

Every YAML parses; the kustomizations render (``kubectl kustomize``; where kubectl is missing only the base,
assembled here); the objects are well formed and consistent with each other (selectors, Services,
probes, volumes, etcd members); and the dynamo_lite commands use only flags that the CLIs accept, with the
ports, hosts and timeouts that the pods declare.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import yaml
from deploy_testing import (
    BASE,
    CLUSTER_SCOPED,
    K8S,
    KUBECTL,
    NAMESPACE,
    ROOT,
    VARIANTS,
    arg_value,
    assemble_base,
    container_port,
    containers,
    dynamo_lite_containers,
    dynamo_lite_module,
    env_value,
    expand,
    find,
    flags_of,
    help_flags,
    load_docs,
    mounted_file,
    pod_spec,
    render,
    workloads,
    yaml_files,
)


@pytest.fixture(params=list(VARIANTS))
def objects(request, tmp_path_factory) -> tuple[dict, ...]:
    if KUBECTL is None:
        if request.param != "gpu":
            pytest.skip("kubectl is not installed: overlays and components need `kubectl kustomize`")
        return assemble_base()
    return render(request.param, str(tmp_path_factory.getbasetemp() / "kustomize"))


@pytest.fixture
def variant(objects, request) -> str:
    return request.node.callspec.params["objects"]


# ------------------------------------------------------------------------------------------------ files


def test_every_yaml_file_parses_into_named_objects():
    files = yaml_files()
    assert len(files) >= 15, files
    for path in files:
        for doc in load_docs(path):
            if isinstance(doc, list):  # a JSON 6902 patch
                assert all(op["op"] in {"add", "remove", "replace", "move", "copy", "test"} for op in doc), (
                    path
                )
                continue
            assert isinstance(doc, dict), path
            if path.is_relative_to(K8S) and not path.is_relative_to(BASE / "engine_configs"):
                assert doc.get("apiVersion") and doc.get("kind"), path
                if doc["kind"] not in ("Kustomization", "Component"):
                    assert doc.get("metadata", {}).get("name"), path


def test_kustomizations_reference_existing_files():
    for kust_file in K8S.rglob("kustomization.yaml"):
        kust = load_docs(kust_file)[0]
        here = kust_file.parent
        refs = list(kust.get("resources", [])) + list(kust.get("components", []))
        refs += [p["path"] for p in kust.get("patches", []) if "path" in p]
        refs += [f for g in kust.get("configMapGenerator", []) for f in g.get("files", [])]
        assert refs, kust_file
        for ref in refs:
            assert (here / ref).exists(), f"{kust_file}: {ref} does not exist"


@pytest.mark.parametrize("name", ["prefill.yaml", "decode.yaml"])
def test_engine_config_copies_match_engine_configs(name):
    # kustomize reads no file outside the kustomization's folder: the base carries copies.
    assert (BASE / "engine_configs" / name).read_bytes() == (
        ROOT / "engine_configs" / "gpt_oss" / name
    ).read_bytes()


# ------------------------------------------------------------------------------------------------ objects


def test_objects_are_named_and_namespaced(objects):
    names = set()
    for o in objects:
        assert o["apiVersion"] and o["kind"] and o["metadata"]["name"]
        key = (o["kind"], o["metadata"]["name"])
        assert key not in names, f"duplicate {key}"
        names.add(key)
        if o["kind"] not in CLUSTER_SCOPED:
            assert o["metadata"].get("namespace") == NAMESPACE, key
    assert ("Namespace", NAMESPACE) in names
    for kind, name in [
        ("StatefulSet", "etcd"),
        ("Deployment", "nats"),
        ("Deployment", "frontend"),
        ("Deployment", "prefill"),
        ("Deployment", "decode"),
        ("Service", "frontend"),
        ("Service", "etcd"),
        ("Service", "nats"),
    ]:
        assert (kind, name) in names


def test_workloads_select_their_own_pods(objects):
    for w in workloads(objects):
        if w["kind"] == "Job":
            continue
        selector = w["spec"]["selector"]["matchLabels"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert selector and selector.items() <= labels.items(), w["metadata"]["name"]
    # No two workloads claim the same pods.
    selectors = [tuple(sorted(w["spec"]["selector"]["matchLabels"].items())) for w in workloads(objects)]
    assert len(selectors) == len(set(selectors))


def test_containers_have_image_resources_and_declared_probe_ports(objects):
    for w in workloads(objects):
        for c in containers(w):
            where = f"{w['metadata']['name']}/{c['name']}"
            assert c.get("image"), where
            res = c.get("resources", {})
            assert {"cpu", "memory"} <= res.get("requests", {}).keys(), where
            assert "memory" in res.get("limits", {}), where
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if probe is None:
                    continue
                action = probe.get("httpGet") or probe.get("tcpSocket")
                assert action is not None, f"{where} {kind}: only httpGet/tcpSocket probes here"
                assert container_port(c, action["port"]) is not None, f"{where} {kind}: port {action['port']}"
                if "httpGet" in probe:
                    assert probe["httpGet"]["path"].startswith("/"), where
            if dynamo_lite_module(c) is not None:
                assert c.get("livenessProbe"), f"{where}: no liveness probe"


def test_services_select_pods_that_expose_the_target_port(objects):
    for svc in (o for o in objects if o["kind"] == "Service"):
        sel = svc["spec"]["selector"]
        pods = [
            w
            for w in workloads(objects)
            if sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert pods, f"Service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for w in pods:
                assert any(container_port(c, target) for c in containers(w)), (
                    svc["metadata"]["name"],
                    target,
                )


def test_volumes_resolve(objects):
    for w in workloads(objects):
        spec = pod_spec(w)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for c in containers(w):
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in claims, (w["metadata"]["name"], m["name"])
        for v in volumes.values():
            if "configMap" in v:
                assert find(objects, "ConfigMap", v["configMap"]["name"]), v
            if "persistentVolumeClaim" in v:
                assert find(objects, "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]), v
            if "secret" in v:
                raise AssertionError(f"{w['metadata']['name']}: secret volumes are not expected here")


def test_etcd_members_match_replicas_and_clients_reach_them(objects):
    etcd = find(objects, "StatefulSet", "etcd")
    (c,) = etcd["spec"]["template"]["spec"]["containers"]
    members = expand(env_value(c, "ETCD_INITIAL_CLUSTER"), c).split(",")
    replicas = etcd["spec"]["replicas"]
    assert len(members) == replicas
    headless = etcd["spec"]["serviceName"]
    assert find(objects, "Service", headless)["spec"]["clusterIP"] == "None"
    for i, member in enumerate(members):
        name, url = member.split("=", 1)
        assert name == f"etcd-{i}"
        # The URL a member advertises must be the one the others were told.
        assert url == expand(arg_value(c["args"], "--initial-advertise-peer-urls"), c).replace("pod-0", name)
    for w in workloads(objects):
        for ct in w["spec"]["template"]["spec"]["containers"]:
            if dynamo_lite_module(ct) is None:
                continue
            endpoints = env_value(ct, "ETCD_ENDPOINTS").split(",")
            assert len(endpoints) in (1, replicas)
            for ep in endpoints:
                host, port = ep.removeprefix("http://").rsplit(":", 1)
                first, _, rest = host.partition(".")
                if rest:  # <pod>.<headless service>
                    assert rest == headless and int(first.removeprefix("etcd-")) < replicas, ep
                    assert int(port) == 2379
                else:
                    assert _service_port(objects, first, int(port)), ep


def _service_port(objs, name: str, port: int) -> bool:
    svc = find(objs, "Service", name)
    return svc is not None and any(p["port"] == port for p in svc["spec"]["ports"])


def test_every_flag_is_one_the_cli_accepts(objects):
    seen = set()
    for w, c, module in dynamo_lite_containers(objects):
        seen.add(module)
        unknown = set(flags_of(c["args"])) - help_flags(module)
        assert not unknown, f"{w['metadata']['name']}: {module} has no {sorted(unknown)}"
    assert seen == {"dynamo_lite.frontend", "dynamo_lite.worker"}


def test_the_clis_parse_the_args(objects, tmp_path):
    """The real argument parsers take each command line, the engine YAML included (the worker checks it)."""
    from dynamo_lite.frontend.__main__ import parse_args as parse_frontend
    from dynamo_lite.worker.__main__ import parse_args as parse_worker

    for w, c, module in dynamo_lite_containers(objects):
        args = [expand(a, c) for a in c["args"]]
        assert all("$(" not in a for a in args), f"unresolved variable in {args}"
        engine_args = arg_value(args, "--extra-engine-args")
        if engine_args:
            text = mounted_file(objects, w, c, engine_args)
            assert text is not None, f"{w['metadata']['name']}: {engine_args} is not in a mounted ConfigMap"
            local = tmp_path / Path(engine_args).name
            local.write_text(text)
            args[args.index(engine_args)] = str(local)
        if module == "dynamo_lite.worker":
            settings = parse_worker(args)
            assert settings.role == w["metadata"]["name"]
            assert settings.metrics_port == container_port(c, "metrics")["containerPort"]
            assert settings.engine_settings.extra or not engine_args
        else:
            process = parse_frontend(args)
            assert process.frontend.http_port == container_port(c, "http")["containerPort"]


def test_ports_hosts_and_scrape_annotations_agree(objects):
    for w, c, module in dynamo_lite_containers(objects):
        name = w["metadata"]["name"]
        args = c["args"]
        annotations = w["spec"]["template"]["metadata"].get("annotations", {})
        if module == "dynamo_lite.worker":
            port = int(arg_value(args, "--metrics-port"))
            # Probes and Prometheus come from outside the pod: not the default loopback.
            assert arg_value(args, "--metrics-host") == "0.0.0.0", name
            assert container_port(c, "metrics")["containerPort"] == port, name
            kv_port = arg_value(args, "--kv-port")
            if kv_port is not None:
                assert container_port(c, int(kv_port)), f"{name}: --kv-port {kv_port} is not a container port"
                assert arg_value(args, "--kv-bind-host") == "0.0.0.0", name
                assert arg_value(args, "--kv-advertise-host") == "$(POD_IP)", name
        else:
            port = int(arg_value(args, "--http-port"))
            assert arg_value(args, "--http-host") == "0.0.0.0", name
            assert container_port(c, "http")["containerPort"] == port, name
        assert annotations.get("prometheus.io/scrape") == "true", name
        assert int(annotations["prometheus.io/port"]) == port, name
        assert annotations["prometheus.io/path"] == "/metrics", name


def test_services_env_points_at_services(objects):
    for w, c, _ in dynamo_lite_containers(objects):
        nats = env_value(c, "NATS_SERVER")
        m = re.fullmatch(r"nats://([a-z0-9-]+):(\d+)", nats)
        assert m and _service_port(objects, m.group(1), int(m.group(2))), nats
        assert env_value(c, "ETCD_ENDPOINTS"), w["metadata"]["name"]


def test_workers_drain_within_the_grace_period(objects):
    for w, c, module in dynamo_lite_containers(objects):
        if module != "dynamo_lite.worker":
            continue
        drain = float(arg_value(c["args"], "--drain-timeout") or 30.0)
        grace = pod_spec(w).get("terminationGracePeriodSeconds", 30)
        assert grace > drain + 5, f"{w['metadata']['name']}: drain {drain}s, grace {grace}s"


def test_gpu_workers_match_their_engine_config(objects, variant):
    workers = [(w, c) for w, c, m in dynamo_lite_containers(objects) if m == "dynamo_lite.worker"]
    assert {w["metadata"]["name"] for w, _ in workers} == {"prefill", "decode"}
    for w, c in workers:
        engine = arg_value(c["args"], "--engine")
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        if variant.startswith("cpu"):
            assert engine == "torch" and gpus is None
            assert "nvidia.com/gpu" not in c["resources"].get("requests", {})
            continue
        assert engine == "trtllm"
        engine_args = arg_value(c["args"], "--extra-engine-args")
        text = mounted_file(objects, w, c, engine_args)
        source = ROOT / "engine_configs" / "gpt_oss" / f"{w['metadata']['name']}.yaml"
        assert text == source.read_text(), "the ConfigMap must carry engine_configs/gpt_oss unchanged"
        config = yaml.safe_load(text)
        assert gpus == c["resources"]["requests"]["nvidia.com/gpu"] == config["tensor_parallel_size"] == 4
        assert arg_value(c["args"], "--model-path").startswith("/models/")
    if variant.startswith("cpu"):
        assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]


def test_frontend_reads_the_tokenizer_where_the_workers_do(objects, variant):
    """The frontend opens the tokenizer at the path in the workers' model card: same mounts, same image."""
    frontend = next(c for _, c, m in dynamo_lite_containers(objects) if m == "dynamo_lite.frontend")
    mounts = {m["mountPath"] for m in frontend.get("volumeMounts", [])}
    for _, c, m in dynamo_lite_containers(objects):
        if m == "dynamo_lite.worker":
            model = arg_value(c["args"], "--model-path")
            if model:
                assert any(model.startswith(p.rstrip("/") + "/") for p in mounts), model
            else:  # the built-in model, converted into the image's cache
                assert c["image"] == frontend["image"]


# ------------------------------------------------------------------------------------------------ probes


def test_frontend_probe_paths_answer_as_the_probes_expect():
    """/live is 200 at once, /ready 503 until a model has workers, and neither needs the API key."""
    import asyncio

    from dynamo_lite.frontend.app import create_app
    from dynamo_lite.frontend.settings import FrontendSettings

    class NoModels:
        def model_cards(self) -> list:
            return []

        def health(self) -> dict:
            return {"status": "healthy"}

    probes = {
        c2[kind]["httpGet"]["path"]: kind
        for _, c2, m in dynamo_lite_containers(assemble_base())
        if m == "dynamo_lite.frontend"
        for kind in ("readinessProbe", "livenessProbe")
    }
    assert probes == {"/ready": "readinessProbe", "/live": "livenessProbe"}

    async def get(path: str) -> int:
        app = create_app(NoModels(), FrontendSettings(api_key="secret"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return (await client.get(path)).status_code

    assert asyncio.run(get("/live")) == 200
    assert asyncio.run(get("/ready")) == 503
    assert asyncio.run(get("/metrics")) == 200
    assert asyncio.run(get("/v1/models")) == 401  # the key guards the API, not the probes


def test_worker_metrics_server_answers_the_probe_path():
    """The worker's metrics server (prometheus_client's, as in Worker.start) answers the probes' path."""
    from prometheus_client import start_http_server

    from dynamo_lite.engines.base import EngineStats
    from dynamo_lite.worker.metrics import WorkerMetrics

    paths = {
        c[kind]["httpGet"]["path"]
        for _, c, m in dynamo_lite_containers(assemble_base())
        if m == "dynamo_lite.worker"
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert paths == {"/metrics"}
    metrics = WorkerMetrics(
        lambda: EngineStats(active_seqs=3), {"model": "m", "role": "decode", "instance": "i"}
    )
    server, thread = start_http_server(0, "127.0.0.1", metrics.registry)
    try:
        r = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10)
        assert r.status_code == 200
        assert 'dynamo_lite_worker_active_seqs{instance="i",model="m",role="decode"} 3.0' in r.text
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# ------------------------------------------------------------------------------------------------ schema


SCALARS = {"str", "int", "bool", "float", "bytes", "datetime", "date", "object"}  # object: int-or-string


def schema_errors(value, type_name: str, path: str) -> list[str]:
    """Field names checked against the Kubernetes API models of the ``kubernetes`` client package."""
    from kubernetes import client

    if (m := re.fullmatch(r"[Ll]ist\[(.+)\]", type_name)) is not None:
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, v in enumerate(value) for e in schema_errors(v, m.group(1), f"{path}[{i}]")]
    if (m := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name)) is not None:
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        item = m.group(1) or m.group(2)
        return [e for k, v in value.items() for e in schema_errors(v, item, f"{path}.{k}")]
    if type_name in SCALARS:
        return []
    model = getattr(client, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} mapping"]
    fields = {json_name: attr for attr, json_name in model.attribute_map.items()}
    errors = []
    for key, v in value.items():
        if key not in fields:
            errors.append(f"{path}.{key}: {type_name} has no such field")
        else:
            errors += schema_errors(v, model.openapi_types[fields[key]], f"{path}.{key}")
    return errors


def test_objects_match_the_kubernetes_api_schema(objects):
    pytest.importorskip(
        "kubernetes", reason="the kubernetes client package (its API models) is not installed"
    )
    for o in objects:
        version = o["apiVersion"].split("/")[-1]
        type_name = f"{version.capitalize()}{o['kind']}"
        assert schema_errors(o, type_name, f"{o['kind']}/{o['metadata']['name']}") == []


def test_job_manifests_match_the_kubernetes_api_schema():
    pytest.importorskip(
        "kubernetes", reason="the kubernetes client package (its API models) is not installed"
    )
    for path in sorted((K8S / "jobs").glob("*.yaml")):
        for o in load_docs(path):
            assert schema_errors(o, f"V1{o['kind']}", path.name) == []
