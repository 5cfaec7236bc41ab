"""Connectors apply the planner's decisions: ``local`` (worker processes on this host), ``kubernetes``
(the prefill/decode Deployments' scale), ``dry_run`` (counts kept in memory, nothing started)."""

from dynamo_lite.planner.connectors.base import Connector

__all__ = ["Connector"]
