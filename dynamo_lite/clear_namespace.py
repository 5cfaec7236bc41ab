"""``python -m dynamo_lite.clear_namespace --namespace NS``: remove every key of a namespace from etcd."""

from __future__ import annotations

import argparse
import asyncio
import sys

from dynamo_lite.runtime import keys
from dynamo_lite.runtime.cli import add_runtime_args, runtime_settings_from
from dynamo_lite.runtime.config import Timeouts
from dynamo_lite.runtime.reachable import check_services


async def clear(args: argparse.Namespace) -> int:
    settings = runtime_settings_from(args, Timeouts())
    if not settings.etcd_endpoints:
        print("error: clear_namespace works on etcd; --in-memory has nothing to clear", file=sys.stderr)
        return 1
    await check_services(settings)
    from dynamo_lite.runtime.discovery_etcd import EtcdDiscovery, etcd_tls

    discovery = await EtcdDiscovery.connect(
        settings.etcd_endpoints,
        settings.lease_ttl_s,
        settings.etcd_username,
        settings.etcd_password,
        settings.timeouts.connect_s,
        etcd_tls(settings),
    )
    try:
        removed = await discovery.delete_prefix(keys.namespace_prefix(settings.root, settings.namespace))
        removed += await discovery.delete_prefix(keys.files_prefix(settings.root, settings.namespace))
    finally:
        await discovery.close()
    print(f"removed {removed} keys from namespace {settings.namespace!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynamo_lite.clear_namespace", description=__doc__)
    add_runtime_args(p)
    args = p.parse_args(argv)
    args.nats_url = ""  # only discovery is touched
    try:
        return asyncio.run(clear(args))
    except ConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
