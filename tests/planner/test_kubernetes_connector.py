"""The Kubernetes connector, through the real ``kubernetes`` client, against a fake API server that holds the
Deployments of deploy/k8s as they render (``kubectl kustomize``; the base's own files where kubectl is missing)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from dynamo_lite.planner.connectors.kubernetes import DEPLOYMENTS, NAMESPACE, KubernetesConnector

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def rendered(variant: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run(
            [kubectl, "kustomize", str(K8S / variant)], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        return [d for d in yaml.safe_load_all(out) if d]
    if variant != "base":
        pytest.skip("kubectl missing: only the base can be assembled")
    kust = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    docs = [d for res in kust["resources"] for d in yaml.safe_load_all((K8S / "base" / res).read_text()) if d]
    for d in docs:
        d["metadata"].setdefault("namespace", kust["namespace"])
    return docs


def _as_served(deployment: dict) -> dict:
    """The object as the API server returns it: resource quantities are strings ("4", not 4)."""
    for c in deployment["spec"]["template"]["spec"].get("containers", []):
        for kind in ("requests", "limits"):
            amounts = c.get("resources", {}).get(kind) or {}
            for k, v in amounts.items():
                amounts[k] = str(v)
    return deployment


class FakeApiServer:
    """Deployments (their ``scale`` subresource and reads) and pods, as the API server answers them."""

    def __init__(self, objects: list[dict]) -> None:
        self.deployments = {
            (o["metadata"]["namespace"], o["metadata"]["name"]): _as_served(o)
            for o in objects
            if o["kind"] == "Deployment"
        }
        self.calls: list[tuple[str, str, str, dict | None]] = []  # method, path, content type, body
        self.pods: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                fake.calls.append(("GET", self.path, "", None))
                self._answer(*fake.get(self.path))

            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.calls.append(("PATCH", self.path, self.headers["Content-Type"], body))
                self._answer(*fake.patch(self.path, self.headers["Content-Type"], body))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def _not_found(what: str) -> tuple[int, dict]:
        return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                     "message": f"{what} not found"}  # fmt: skip

    def _scale(self, dep: dict) -> dict:
        meta = dep["metadata"]
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "spec": {"replicas": dep["spec"].get("replicas", 1)},
            "status": {"replicas": dep["spec"].get("replicas", 1)},
        }

    def get(self, raw: str) -> tuple[int, dict]:
        url = urllib.parse.urlsplit(raw)
        parts = url.path.strip("/").split("/")
        if parts[:3] == ["apis", "apps", "v1"] and parts[3] == "namespaces" and parts[5] == "deployments":
            dep = self.deployments.get((parts[4], parts[6]))
            if dep is None:
                return self._not_found(f"deployments.apps {parts[6]!r}")
            return 200, (self._scale(dep) if parts[7:] == ["scale"] else dep)
        if parts[:2] == ["api", "v1"] and parts[4:] == ["pods"]:
            q = urllib.parse.parse_qs(url.query)
            labels = dict(kv.split("=") for kv in q.get("labelSelector", [""])[0].split(",") if kv)
            phase = q.get("fieldSelector", ["status.phase=Running"])[0].split("=")[1]
            items = [
                p
                for p in self.pods
                if p["metadata"]["namespace"] == parts[3]
                and labels.items() <= p["metadata"]["labels"].items()
                and p["status"]["phase"] == phase
            ]
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
        return self._not_found(url.path)

    def patch(self, raw: str, content_type: str, body: dict) -> tuple[int, dict]:
        parts = urllib.parse.urlsplit(raw).path.strip("/").split("/")
        dep = self.deployments.get((parts[4], parts[6])) if len(parts) == 8 and parts[7] == "scale" else None
        if dep is None:
            return self._not_found(raw)
        if "merge-patch" not in content_type and "json-patch" not in content_type:
            return 415, {"kind": "Status", "code": 415, "message": content_type}
        dep["spec"]["replicas"] = body["spec"]["replicas"]
        return 200, self._scale(dep)

    def add_pod(self, deployment: str, ip: str, phase: str = "Running", deleting: bool = False) -> None:
        dep = self.deployments[(NAMESPACE, deployment)]
        self.pods.append(
            {
                "metadata": {
                    "name": f"{deployment}-{len(self.pods)}",
                    "namespace": NAMESPACE,
                    "labels": dict(dep["spec"]["template"]["metadata"]["labels"]),
                    **({"deletionTimestamp": "2026-12-07T00:00:00Z"} if deleting else {}),
                },
                "status": {"phase": phase, "podIP": ip},
            }
        )


@pytest.fixture(params=["base", "overlays/cpu"])
def api(request):
    server = FakeApiServer(rendered(request.param))
    yield server
    server.close()


@pytest.fixture
def connector(api: FakeApiServer) -> KubernetesConnector:
    from kubernetes import client

    cfg = client.Configuration(host=api.url)
    return KubernetesConnector(api_client=client.ApiClient(cfg))


def test_defaults_name_the_manifests_deployments() -> None:
    objs = rendered("base")
    deployments = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Deployment"}
    for role, name in DEPLOYMENTS.items():
        dep = deployments[name]
        assert dep["metadata"]["namespace"] == NAMESPACE
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--mode") + 1] == role


def test_reads_and_scales_the_deployments(api: FakeApiServer, connector: KubernetesConnector) -> None:
    assert connector.replicas() == {"prefill": 1, "decode": 1}
    connector.scale("decode", 3)
    assert api.deployments[(NAMESPACE, "decode")]["spec"]["replicas"] == 3
    method, path, ctype, body = api.calls[-1]
    assert (method, path, body) == ("PATCH", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/decode/scale",
                                    {"spec": {"replicas": 3}})  # fmt: skip
    assert connector.replicas() == {"prefill": 1, "decode": 3}


def test_scrapes_running_pods_at_the_annotated_port(
    api: FakeApiServer, connector: KubernetesConnector
) -> None:
    api.add_pod("prefill", "10.0.0.1")
    api.add_pod("decode", "10.0.0.2")
    api.add_pod("decode", "10.0.0.3", phase="Pending")
    api.add_pod("decode", "10.0.0.4", deleting=True)
    assert connector.metrics_urls() == ["http://10.0.0.1:9090/metrics", "http://10.0.0.2:9090/metrics"]


def test_a_missing_deployment_is_an_error(api: FakeApiServer) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    c = KubernetesConnector(
        deployments={"prefill": "prefill-typo", "decode": "decode"},
        api_client=client.ApiClient(client.Configuration(host=api.url)),
    )
    with pytest.raises(ApiException) as e:
        c.scale("prefill", 2)
    assert e.value.status == 404
