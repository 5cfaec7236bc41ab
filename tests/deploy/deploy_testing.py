"""Shared by the tests of deploy/: load and render the Kubernetes manifests, and read them."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
KUBECTL = shutil.which("kubectl")
NAMESPACE = "dynamo-lite"
CLUSTER_SCOPED = {"Namespace"}
WORKLOADS = {"Deployment", "StatefulSet", "Job"}

# name -> (kustomize dirs relative to deploy/k8s, components)
VARIANTS = {
    "gpu": ("base", ()),
    "cpu": ("overlays/cpu", ()),
    "gpu-etcd3": ("base", ("components/etcd-3",)),
    "cpu-etcd3": ("overlays/cpu", ("components/etcd-3",)),
}


# ------------------------------------------------------------------------------------------------ loading


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_docs(path: Path) -> list:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


@functools.cache
def render(variant: str, tmp_root: str) -> tuple[dict, ...]:
    """The variant's objects as ``kubectl kustomize`` renders them."""
    target, components = VARIANTS[variant]
    if not components:
        out = _kustomize(K8S / target)
    else:
        # kustomize wants relative paths to other kustomizations: a throwaway kustomization next to tmp_root.
        d = Path(tmp_root) / variant
        d.mkdir(parents=True, exist_ok=True)
        rel = Path(_relpath(K8S, d))
        (d / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {"resources": [str(rel / target)], "components": [str(rel / c) for c in components]}
            )
        )
        out = _kustomize(d)
    return tuple(d for d in yaml.safe_load_all(out) if d)


def _relpath(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


def _kustomize(path: Path) -> str:
    assert KUBECTL is not None
    proc = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return proc.stdout


def assemble_base() -> tuple[dict, ...]:
    """The base kustomization without kubectl: its resources, its generated ConfigMap (no hash suffix), its
    namespace. Enough for the consistency checks below."""
    kust = load_docs(BASE / "kustomization.yaml")[0]
    objs: list[dict] = []
    for res in kust["resources"]:
        objs += load_docs(BASE / res)
    for gen in kust.get("configMapGenerator", []):
        data = {Path(f).name: (BASE / f).read_text() for f in gen["files"]}
        objs.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data}
        )
    for o in objs:
        if o["kind"] not in CLUSTER_SCOPED:
            o["metadata"]["namespace"] = kust["namespace"]
    return tuple(objs)


# ------------------------------------------------------------------------------------------------ helpers


def workloads(objs) -> Iterator[dict]:
    return (o for o in objs if o["kind"] in WORKLOADS)


def pod_spec(w: dict) -> dict:
    return w["spec"]["template"]["spec"]


def containers(w: dict) -> list[dict]:
    return pod_spec(w).get("initContainers", []) + pod_spec(w)["containers"]


def find(objs, kind: str, name: str) -> dict | None:
    return next((o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name), None)


def dynamo_lite_module(c: dict) -> str | None:
    """``dynamo_lite.worker`` / ``dynamo_lite.frontend`` when the container runs one, else None."""
    cmd = c.get("command", [])
    if len(cmd) >= 3 and cmd[1] == "-m" and cmd[2].startswith("dynamo_lite."):
        return cmd[2]
    return None


def arg_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def container_port(c: dict, ref: int | str) -> dict | None:
    for p in c.get("ports", []):
        if ref in (p.get("name"), p["containerPort"]):
            return p
    return None


def env_value(c: dict, name: str) -> str | None:
    return next((e.get("value") for e in c.get("env", []) if e["name"] == name), None)


def expand(value: str, c: dict) -> str:
    """Kubernetes' $(VAR) expansion; downward-API variables get plausible values."""
    fake = {"status.podIP": "10.1.2.3", "metadata.name": "pod-0", "metadata.namespace": NAMESPACE}

    def one(m: re.Match) -> str:
        for e in c.get("env", []):
            if e["name"] == m.group(1):
                if "value" in e:
                    return expand(e["value"], c)
                return fake[e["valueFrom"]["fieldRef"]["fieldPath"]]
        return m.group(0)

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, value)


@functools.cache
def help_flags(module: str) -> frozenset[str]:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    return frozenset(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", proc.stdout))


def flags_of(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def mounted_file(objs, w: dict, c: dict, path: str) -> str | None:
    """The content of ``path`` inside the container when a ConfigMap volume provides it."""
    volumes = {v["name"]: v for v in pod_spec(w).get("volumes", [])}
    for m in c.get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/") + "/"
        vol = volumes.get(m["name"], {})
        if path.startswith(mount) and "configMap" in vol:
            cm = find(objs, "ConfigMap", vol["configMap"]["name"])
            return None if cm is None else cm.get("data", {}).get(path[len(mount) :])
    return None


def dynamo_lite_containers(objs) -> Iterator[tuple[dict, dict, str]]:
    for w in workloads(objs):
        for c in containers(w):
            module = dynamo_lite_module(c)
            if module is not None:
                yield w, c, module
