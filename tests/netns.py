"""Test hosts in network namespaces: a bridge namespace and hosts wired to it by veth pairs.

Addresses live only inside namespaces this module creates (10.213.0.0/24 by default); nothing is
routed to or from the machine's own network. `Network.close()` deletes every namespace it made
(which deletes their veths too), and is safe to call twice.
"""
from __future__ import annotations

import os
import subprocess


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def namespaces_available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    probe = f"flbprobe{os.getpid()}"
    try:
        ip("netns", "add", probe)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        return f"cannot create network namespaces here: {detail.strip()}"
    ip("netns", "del", probe)
    return None


class Network:
    """A /24 on a bridge; hosts are namespaces named PREFIX-NAME."""

    def __init__(self, prefix: str, subnet: str = "10.213.0") -> None:
        self.prefix = prefix
        self.subnet = subnet
        self.bridge = f"{prefix}-br"
        self.made: list[str] = []
        self.interfaces: dict[str, str] = {}
        self._add_namespace(self.bridge)
        ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge, "link", "set", "br0", "up")

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self.made.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def host(self, name: str, last_octet: int) -> str:
        """Adds host NAME at SUBNET.LAST_OCTET; returns its namespace."""
        namespace = f"{self.prefix}-{name}"
        self._add_namespace(namespace)
        outside, inside = f"{self.prefix}{name}o"[:15], f"eth-{name}"[:15]
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", outside, "netns", self.bridge)
        ip("link", "set", inside, "netns", namespace)
        ip("-n", self.bridge, "link", "set", outside, "master", "br0", "up")
        ip("-n", namespace, "addr", "add", f"{self.subnet}.{last_octet}/24", "dev", inside)
        ip("-n", namespace, "link", "set", inside, "up")
        self.interfaces[namespace] = inside
        return namespace

    def addresses(self, namespace: str) -> str:
        return ip("-n", namespace, "-4", "addr", "show")

    def close(self) -> None:
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.made.clear()
