"""Fail fast at start: is etcd / NATS listening where the settings say? One line saying what to do if not.

A process that would otherwise wait out its connect timeouts (or load a model for minutes first) checks the
addresses with a plain TCP connect, all at once, before anything else.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from dynamo_lite.runtime.config import RuntimeSettings

REMEDY = (
    "start etcd and NATS on this machine with `launch/services.sh start`, point --etcd-endpoints/"
    "ETCD_ENDPOINTS and --nats-url/NATS_SERVER at yours, or run frontend and workers in one process with "
    "`python -m dynamo_lite serve`"
)


class ServiceUnreachable(ConnectionError):
    """etcd or NATS does not answer at the configured address; ``str()`` is the one line to print."""


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    return (parts.hostname or "127.0.0.1"), (parts.port or default_port)


async def _can_connect(host: str, port: int, timeout_s: float) -> str | None:
    """None when something accepts a TCP connection at ``host:port``; else why not."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except TimeoutError:
        return f"no answer within {timeout_s:g}s"
    except OSError as e:
        return e.strerror or type(e).__name__
    writer.close()
    return None


async def _any_reachable(urls: str, default_port: int, timeout_s: float) -> str | None:
    reasons = await asyncio.gather(
        *(_can_connect(*_host_port(u.strip(), default_port), timeout_s) for u in urls.split(",") if u.strip())
    )
    return None if any(r is None for r in reasons) else (reasons[0] if reasons else "no address given")


async def check_services(settings: RuntimeSettings) -> None:
    """Raise ``ServiceUnreachable`` unless every configured service (etcd, NATS) accepts connections."""
    checks = []
    if settings.etcd_endpoints:
        checks.append(("etcd", settings.etcd_endpoints, 2379))
    if settings.nats_url:
        checks.append(("NATS", settings.nats_url, 4222))
    reasons = await asyncio.gather(
        *(_any_reachable(url, port, settings.timeouts.probe_s) for _, url, port in checks)
    )
    for (name, url, _), reason in zip(checks, reasons, strict=True):
        if reason is not None:
            raise ServiceUnreachable(f"{name} is not reachable at {url} ({reason}): {REMEDY}")
