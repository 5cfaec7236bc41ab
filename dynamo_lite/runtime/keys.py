"""The discovery key layout and the request plane's subjects, in one place.

``{root}/{namespace}/instances/{role}/{endpoint}/{instance_id}``      → ``InstanceInfo``
``{root}/{namespace}/models/{served_name}/{instance_id}``            → ``ModelCard``
``{root}.files/{namespace}/{sha256}/{chunk:05d}``                     → model file bytes (no lease)
All of a process's instance and card keys live under its lease: a dead process's keys vanish by themselves.
A served name is percent-quoted in keys (``openai/gpt-oss-120b`` → ``openai%2Fgpt-oss-120b``). Model files are
content-addressed and shared by every worker of the model, outside the prefix frontends watch; only
``clear_namespace`` removes them.
"""

from __future__ import annotations

from urllib.parse import quote, unquote


def quote_name(name: str) -> str:
    """A served name as one key segment."""
    return quote(name, safe="")


def unquote_name(segment: str) -> str:
    return unquote(segment)


def namespace_prefix(root: str, namespace: str) -> str:
    return f"{root}/{namespace}/"


def instance_key(root: str, namespace: str, role: str, endpoint: str, instance_id: str) -> str:
    return f"{root}/{namespace}/instances/{role}/{endpoint}/{instance_id}"


def model_key(root: str, namespace: str, served_name: str, instance_id: str) -> str:
    return f"{root}/{namespace}/models/{quote_name(served_name)}/{instance_id}"


def files_prefix(root: str, namespace: str) -> str:
    return f"{root}.files/{namespace}/"


def file_chunk_key(root: str, namespace: str, sha256: str, index: int) -> str:
    return f"{root}.files/{namespace}/{sha256}/{index:05d}"


def request_address(namespace: str, role: str, endpoint: str, instance_id: str) -> str:
    """Request-plane address (a NATS subject) of one instance's endpoint."""
    return f"dynamo_lite.{namespace}.{role}.{endpoint}.{instance_id}"


def load_subject(namespace: str, instance_id: str = "") -> str:
    """Event subject of an instance's ``LoadReport``s (without ``instance_id``: the prefix of all of them)."""
    return f"dlload.{namespace}.{instance_id}"


def kv_events_subject(namespace: str, instance_id: str = "") -> str:
    """Event subject of an instance's ``KvEvent``s (without ``instance_id``: the prefix of all of them)."""
    return f"dlkv.{namespace}.{instance_id}"


def kv_release_prefix(namespace: str, instance_id: str) -> str:
    """Event subject prefix an instance listens on for ``KvRelease`` messages."""
    return f"dlkvrel.{namespace}.{instance_id}."


def kv_release_subject(namespace: str, instance_id: str) -> str:
    return kv_release_prefix(namespace, instance_id) + "release"
