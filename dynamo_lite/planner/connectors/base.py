"""The seam between the planner and what runs workers."""

from __future__ import annotations

from typing import Protocol


class Connector(Protocol):
    """What the run loop needs from a place that runs workers. Roles are "prefill" and "decode"."""

    def replicas(self) -> dict[str, int]:
        """Workers per role that count as running: started or starting, not draining."""
        ...

    def metrics_urls(self) -> list[str]:
        """The workers' /metrics URLs to scrape (empty: scrape none)."""
        ...

    def scale(self, role: str, replicas: int) -> None:
        """Run ``replicas`` workers of ``role``; scaling down lets the removed workers drain (SIGTERM)."""
        ...

    def close(self) -> None:
        """Stop what this connector started (nothing, for ones that only scale something else)."""
        ...
