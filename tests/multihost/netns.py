"""Test hosts made of Linux network namespaces: each host is a namespace with one veth to a shared bridge.

The bridge lives in a namespace of its own, the veths are created inside the namespaces they belong to, and
every address is on a private /24 that exists only inside those namespaces: nothing in the root namespace
(interfaces, routes, addresses) is touched, and no packet can leave.

>>> net = Network.create()            # raises NetnsUnavailable when namespaces can't be made here
>>> fe = net.add_host("fe")            # namespace dl-<tag>-fe, address 10.77.<n>.11
>>> net.exec(fe, "ip", "addr")        # the command line prefix is fe.cmd(...)
>>> net.close()                        # kills what is left in them, deletes every namespace
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field

DEV = "eth0"  # each host's interface to the bridge
BRIDGE = "br0"


class NetnsUnavailable(RuntimeError):
    """Network namespaces (or a bridge, or veths) can't be created here: not root, or no CAP_NET_ADMIN."""


@dataclass(frozen=True)
class Host:
    """One namespace: its name, its address on the test network, its interface to the bridge."""

    name: str  # short role name: "fe", "pf", ...
    netns: str  # the namespace, dl-<tag>-<name>
    ip: str
    peer: str  # the veth end in the bridge namespace

    def cmd(self, *argv: str) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=10, check=check)


@dataclass
class Network:
    """A bridge namespace plus host namespaces on one /24. ``close()`` deletes all of them."""

    tag: str
    subnet: str  # "10.77.<n>"
    bridge_ns: str
    hosts: dict[str, Host] = field(default_factory=dict)
    _namespaces: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, subnet: str | None = None) -> Network:
        if shutil.which("ip") is None:
            raise NetnsUnavailable("the `ip` command (iproute2) is not installed")
        tag = uuid.uuid4().hex[:6]
        net = cls(tag, subnet or f"10.77.{random.randint(1, 254)}", f"dl-{tag}-br")
        try:
            net._add_namespace(net.bridge_ns)
            _ip("-n", net.bridge_ns, "link", "add", BRIDGE, "type", "bridge")
            _ip("-n", net.bridge_ns, "link", "set", BRIDGE, "up")
        except (subprocess.CalledProcessError, OSError) as e:
            net.close()
            detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
            raise NetnsUnavailable(f"cannot create a network namespace with a bridge: {detail}") from e
        return net

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def add_host(self, name: str) -> Host:
        """A new namespace joined to the bridge, with the next address of the subnet (from .11)."""
        netns = f"dl-{self.tag}-{name}"
        peer = f"v{self.tag}{len(self.hosts)}"  # interface names are at most 15 characters
        host = Host(name, netns, f"{self.subnet}.{11 + len(self.hosts)}", peer)
        self._add_namespace(netns)
        # Made in the bridge namespace, one end moved straight into the host's: never seen by the root one.
        _ip("-n", self.bridge_ns, "link", "add", peer, "type", "veth", "peer", "name", DEV, "netns", netns)
        _ip("-n", self.bridge_ns, "link", "set", peer, "master", BRIDGE, "up")
        _ip("-n", netns, "addr", "add", f"{host.ip}/24", "dev", DEV)
        _ip("-n", netns, "link", "set", DEV, "up")
        self.hosts[name] = host
        return host

    def set_link(self, host: Host, up: bool) -> None:
        """Pull (or plug back) the host's cable: its interface goes down inside its own namespace."""
        subprocess.run(
            host.cmd("ip", "link", "set", DEV, "up" if up else "down"),
            check=True,
            timeout=10,
            capture_output=True,
        )

    def counters(self, host: Host) -> dict[str, int]:
        """The host interface's byte counters: ``{"rx": ..., "tx": ...}``."""
        out = _ip("-n", host.netns, "-j", "-s", "link", "show", "dev", DEV).stdout
        stats = json.loads(out)[0]["stats64"]
        return {"rx": int(stats["rx"]["bytes"]), "tx": int(stats["tx"]["bytes"])}

    def pids_in(self, netns: str) -> list[int]:
        out = _ip("netns", "pids", netns, check=False).stdout
        return [int(p) for p in out.split() if p.strip().isdigit()]

    def close(self) -> None:
        """SIGKILL whatever still runs in our namespaces (we started all of it), then delete them."""
        for netns in reversed(self._namespaces):
            for pid in self.pids_in(netns):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", netns, check=False)
        self._namespaces.clear()


def namespaces_usable() -> str | None:
    """None if a namespace with a bridge and a veth can be made here; else why not (a skip reason)."""
    try:
        net = Network.create()
    except NetnsUnavailable as e:
        return str(e)
    try:
        net.add_host("probe")
    except (subprocess.CalledProcessError, OSError) as e:
        detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
        return f"cannot join a namespace to a bridge with a veth pair: {detail}"
    finally:
        net.close()
    return None
