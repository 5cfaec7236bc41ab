"""Decisions printed, nothing started: replica counts kept in memory, static metric URLs."""

from __future__ import annotations


class DryRunConnector:
    def __init__(self, start: dict[str, int], metrics_urls: list[str] | None = None) -> None:
        self._replicas = dict(start)
        self._urls = list(metrics_urls or [])

    def replicas(self) -> dict[str, int]:
        return dict(self._replicas)

    def metrics_urls(self) -> list[str]:
        return list(self._urls)

    def scale(self, role: str, replicas: int) -> None:
        print(f"dry-run: would scale {role} {self._replicas[role]} → {replicas}", flush=True)
        self._replicas[role] = replicas

    def close(self) -> None:
        pass
