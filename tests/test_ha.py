"""An HA pair: two fastlb nodes sharing a virtual IP through keepalived (VRRP) and their sessions
through one Redis, each node in its own network namespace on a bridge, backends and Redis on a
fourth host, clients on a fifth. The master's fastlb is killed; keepalived's check (traffic port
and admin /healthz) notices, the VIP moves to the backup, the clients carry on through it, and
every client keeps the backend its session was pinned to.

The keepalived configs are examples/keepalived/*.conf themselves, with only the interface, the
addresses and the script path put in, so the documented setup is the tested one.
"""
from __future__ import annotations

import os
import re
import signal
import sys

import pytest

from netns import Network, namespaces_available
from procs import BACKEND_SERVER, REPO, ensure_debian_tool, wait_until

EXAMPLES = REPO / "examples" / "keepalived"
VIP = "10.213.0.100"
APP = "10.213.0.20"
PORT, ADMIN_PORT, REDIS_PORT = 8080, 9000, 6379
CLIENTS = ["10.213.0.2", "10.213.0.3", "10.213.0.4", "10.213.0.5", "10.213.0.6", "10.213.0.7"]
ANSWER = re.compile(r"^ok (\S+) (\S+) from (\S+) ([\d.]+)$")   # ok BACKEND LB_NODE from CLIENT T


def setup_module():
    reason = namespaces_available()
    if reason:
        pytest.skip(reason)
    ensure_debian_tool("keepalived", "keepalived")
    ensure_debian_tool("redis-server", "redis-server")


@pytest.fixture
def network():
    net = Network(f"flb{os.getpid() % 100000}")
    try:
        yield net
    finally:
        net.close()


def keepalived_config(example: str, interface: str, tmp_path) -> str:
    text = (EXAMPLES / example).read_text()
    text = text.replace("interface eth0", f"interface {interface}")
    text = text.replace("192.0.2.100/24", f"{VIP}/24")
    text = text.replace("/opt/fastlb/examples/keepalived/check_fastlb.sh", str(EXAMPLES / "check_fastlb.sh"))
    assert f"check_fastlb.sh {PORT} {ADMIN_PORT}" in text
    path = tmp_path / example
    path.write_text(text)
    return str(path)


def in_namespace(namespace: str, *command: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, *command]


def start_keepalived(procs, namespace: str, config: str, tmp_path):
    run = tmp_path / namespace
    run.mkdir()
    return procs.start(in_namespace(
        namespace, "keepalived", "--dont-fork", "--log-console", "--vrrp", "-f", config,
        "-p", str(run / "keepalived.pid"), "-r", str(run / "vrrp.pid")), f"keepalived {namespace}")


def holds_vip(network: Network, namespace: str) -> bool:
    return f"inet {VIP}/" in network.addresses(namespace)


def answers(client, start: int = 0) -> list[tuple[str, str, str, float]]:
    """(backend, balancer node, client address, time) of each successful attempt from line `start`."""
    return [(m[1], m[2], m[3], float(m[4])) for m in map(ANSWER.match, client.lines[start:]) if m]


def test_vip_and_sessions_move_to_backup_when_master_fastlb_dies(procs, network, tmp_path):
    lb1, lb2 = network.host("lb1", 11), network.host("lb2", 12)
    app = network.host("app", 20)
    clients = network.host("cl", 2)
    for address in CLIENTS[1:]:
        network.add_address(clients, int(address.rsplit(".", 1)[1]))

    redis = procs.start(in_namespace(app, "redis-server", "--bind", APP, "--port", str(REDIS_PORT), "--save", "",
                                     "--appendonly", "no", "--protected-mode", "no"), "redis")
    redis.wait_for_line(r"Ready to accept connections")
    backends = procs.start(in_namespace(app, sys.executable, BACKEND_SERVER, "--show-peer",
                                        *(f"{name}:{APP}:{9001 + i}" for i, name in enumerate("abc"))), "backends")
    backends.wait_for_line(r"^ready$")
    nodes = {}
    # The backup lists the backends in the other order: its own round robin would give the clients
    # other backends, so only the shared store keeps them where they were (and pins must name
    # backends by address, not by position).
    for name, namespace, order in (("lb1", lb1, (0, 1, 2)), ("lb2", lb2, (2, 1, 0))):
        nodes[name] = procs.start(in_namespace(
            namespace, sys.executable, "-m", "fastlb", "--mode", "tcp", "--bind", f"0.0.0.0:{PORT}",
            "--admin", f"127.0.0.1:{ADMIN_PORT}", "--sticky", "source",
            "--store", f"redis://{APP}:{REDIS_PORT}/0",
            *(arg for i in order for arg in ("--backend", f"{APP}:{9001 + i}"))), f"fastlb {name}")
        nodes[name].wait_for_line(r"listening on")

    start_keepalived(procs, lb1, keepalived_config("keepalived-master.conf", network.interfaces[lb1], tmp_path), tmp_path)
    start_keepalived(procs, lb2, keepalived_config("keepalived-backup.conf", network.interfaces[lb2], tmp_path), tmp_path)
    wait_until(lambda: holds_vip(network, lb1), timeout=15, what="the VIP on the master")
    assert not holds_vip(network, lb2)

    client = procs.start(in_namespace(clients, sys.executable, str(REPO / "tests" / "ha_client.py"),
                                      VIP, str(PORT), "30", *CLIENTS), "client")
    # Every client address has been served (twice) through the master: its session is pinned.
    wait_until(lambda: all(sum(1 for _, node, source, _ in answers(client) if source == address and node == "10.213.0.11") >= 2
                           for address in CLIENTS), timeout=15, what="every client served through the master")
    before = answers(client)
    pinned = {source: backend for backend, _, source, _ in before}
    assert all({b for b, _, s, _ in before if s == source} == {backend} for source, backend in pinned.items())
    assert len(set(pinned.values())) > 1, pinned  # the sessions were spread, not all on one backend

    killed_at_line = len(client.lines)
    killed_at = before[-1][3]
    nodes["lb1"].signal(signal.SIGKILL)

    # Served again through the backup, within 3 s of the kill...
    through_backup = wait_until(lambda: [a for a in answers(client, killed_at_line) if a[1] == "10.213.0.12"],
                                timeout=15, what="an answer through the backup")
    moved_after = through_backup[0][3] - killed_at
    assert moved_after <= 3.0, f"the VIP took {moved_after:.2f} s to serve again"
    assert holds_vip(network, lb2) and not holds_vip(network, lb1)
    # ... and every client twice more, each still on the backend of its session (shared through Redis).
    wait_until(lambda: all(sum(1 for _, node, source, _ in answers(client, killed_at_line)
                               if source == address and node == "10.213.0.12") >= 2 for address in CLIENTS),
               timeout=15, what="every client served through the backup")
    after = answers(client, killed_at_line)
    moved = {source: backend for backend, node, source, _ in after if node == "10.213.0.12" and backend != pinned[source]}
    assert not moved, f"sessions moved to other backends after the failover: {moved} (pinned {pinned})"
    settled = len(client.lines)
    wait_until(lambda: len(answers(client, settled)) >= 2 * len(CLIENTS), timeout=15, what="more answers")
    client.signal(signal.SIGTERM)
    client.wait_exit()
    assert not [line for line in client.lines[settled:] if line.startswith("fail")]
    failures = [line for line in client.lines[killed_at_line:settled] if line.startswith("fail")]
    print(f"VIP served again {moved_after:.2f} s after the kill; {len(failures)} failed attempts in between; "
          f"{len(CLIENTS)} sessions kept their backends {sorted(set(pinned.values()))}")
