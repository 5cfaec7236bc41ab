"""The prefill and decode Deployments of ``deploy/k8s``, scaled through the official ``kubernetes`` client.

Scale is the Deployment's ``scale`` subresource (what ``kubectl scale`` patches); a removed pod gets SIGTERM
and its ``terminationGracePeriodSeconds`` (longer than the worker's ``--drain-timeout``) to drain. The workers'
metrics are scraped from each running pod's IP, at the port and path of the pod template's
``prometheus.io/port`` and ``prometheus.io/path`` annotations.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

NAMESPACE = "dynamo-lite"  # deploy/k8s/base/kustomization.yaml
DEPLOYMENTS = {"prefill": "prefill", "decode": "decode"}  # role → Deployment name (deploy/k8s/base)


class KubernetesConnector:
    def __init__(
        self,
        namespace: str = NAMESPACE,
        deployments: dict[str, str] | None = None,
        api_client=None,  # a kubernetes.client.ApiClient; None: in-cluster config, else ~/.kube/config
    ) -> None:
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.namespace = namespace
        self.deployments = dict(deployments or DEPLOYMENTS)
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)

    def replicas(self) -> dict[str, int]:
        out = {}
        for role, name in self.deployments.items():
            scale = self.apps.read_namespaced_deployment_scale(name, self.namespace)
            out[role] = int(scale.spec.replicas or 0)
        return out

    def scale(self, role: str, replicas: int) -> None:
        name = self.deployments[role]
        self.apps.patch_namespaced_deployment_scale(name, self.namespace, {"spec": {"replicas": replicas}})
        log.info("scaled deployment %s/%s to %d", self.namespace, name, replicas)

    def metrics_urls(self) -> list[str]:
        urls = []
        for name in self.deployments.values():
            dep = self.apps.read_namespaced_deployment(name, self.namespace)
            selector = ",".join(f"{k}={v}" for k, v in sorted((dep.spec.selector.match_labels or {}).items()))
            notes = dep.spec.template.metadata.annotations or {}
            port, path = notes.get("prometheus.io/port"), notes.get("prometheus.io/path", "/metrics")
            if port is None:
                continue
            pods = self.core.list_namespaced_pod(
                self.namespace, label_selector=selector, field_selector="status.phase=Running"
            )
            for pod in pods.items:
                if pod.metadata.deletion_timestamp is None and pod.status.pod_ip:
                    urls.append(f"http://{pod.status.pod_ip}:{port}{path}")
        return urls

    def close(self) -> None:
        pass
