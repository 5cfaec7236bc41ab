"""The discovery key layout, in one place.

``{root}/{namespace}/instances/{component}/{endpoint}/{instance_id}`` → ``InstanceInfo``
``{root}/{namespace}/models/{served_name}/{instance_id}``            → ``ModelCard``
All of a process's keys live under its lease: a dead process's keys vanish by themselves.
"""

from __future__ import annotations


def namespace_prefix(root: str, namespace: str) -> str:
    return f"{root}/{namespace}/"


def instances_prefix(root: str, namespace: str) -> str:
    return f"{root}/{namespace}/instances/"


def instance_key(root: str, namespace: str, component: str, endpoint: str, instance_id: str) -> str:
    return f"{root}/{namespace}/instances/{component}/{endpoint}/{instance_id}"


def models_prefix(root: str, namespace: str) -> str:
    return f"{root}/{namespace}/models/"


def model_key(root: str, namespace: str, served_name: str, instance_id: str) -> str:
    return f"{root}/{namespace}/models/{served_name}/{instance_id}"


def request_address(namespace: str, component: str, endpoint: str, instance_id: str) -> str:
    """Request-plane address (a NATS subject) of one instance's endpoint."""
    return f"dynamo_lite.{namespace}.{component}.{endpoint}.{instance_id}"
