"""An HA pair: two fastlb nodes sharing a virtual IP through keepalived (VRRP), each in its own
network namespace on a bridge, a client in a third. The master's fastlb is killed; keepalived's
check notices, the VIP moves to the backup, and the client carries on through it.

The keepalived configs are examples/keepalived/*.conf themselves, with only the interface, the
addresses and the script path put in, so the documented setup is the tested one.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from netns import Network, namespaces_available
from procs import BACKEND_SERVER, REPO, wait_until

EXAMPLES = REPO / "examples" / "keepalived"
VIP = "10.213.0.100"
APP = "10.213.0.20"
PORT = 8080


def setup_module():
    reason = namespaces_available()
    if reason:
        pytest.skip(reason)
    if shutil.which("keepalived") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "keepalived"], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), capture_output=True)


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


def served_by(client, names: tuple[str, ...], start: int = 0) -> re.Match:
    return client.wait_for_line(rf"^ok ({'|'.join(names)}) ", timeout=15, start=start)


def test_vip_moves_to_backup_when_master_fastlb_dies(procs, network, tmp_path):
    lb1 = network.host("lb1", 11)
    lb2 = network.host("lb2", 12)
    app = network.host("app", 20)
    client_ns = network.host("cl", 2)

    # Each node fronts its own pair of backends, so a reply's name says which node relayed it.
    backends = procs.start(in_namespace(app, sys.executable, BACKEND_SERVER, f"n1a:{APP}:9001",
                                        f"n1b:{APP}:9002", f"n2a:{APP}:9003", f"n2b:{APP}:9004"),
                           "backends")
    backends.wait_for_line(r"^ready$")
    nodes = {}
    for name, namespace, ports in (("lb1", lb1, (9001, 9002)), ("lb2", lb2, (9003, 9004))):
        nodes[name] = procs.start(in_namespace(
            namespace, sys.executable, "-m", "fastlb", "--mode", "tcp", "--bind", f"0.0.0.0:{PORT}",
            *(arg for port in ports for arg in ("--backend", f"{APP}:{port}"))), f"fastlb {name}")
        nodes[name].wait_for_line(r"listening on")

    start_keepalived(procs, lb1, keepalived_config("keepalived-master.conf", network.interfaces[lb1], tmp_path), tmp_path)
    start_keepalived(procs, lb2, keepalived_config("keepalived-backup.conf", network.interfaces[lb2], tmp_path), tmp_path)
    wait_until(lambda: holds_vip(network, lb1), timeout=15, what="the VIP on the master")
    assert not holds_vip(network, lb2)

    client = procs.start(in_namespace(client_ns, sys.executable, str(REPO / "tests" / "ha_client.py"),
                                      VIP, str(PORT), "25"), "client")
    served_by(client, ("n1a", "n1b"))
    served_by(client, ("n1a", "n1b"), start=len(client.lines))  # steady through the master

    killed_at_line = len(client.lines)
    killed_at = float(client.lines[-1].split()[-1])
    nodes["lb1"].signal(signal.SIGKILL)

    first_backup = served_by(client, ("n2a", "n2b"), start=killed_at_line)
    moved_at = float(first_backup.string.split()[-1])
    assert moved_at - killed_at <= 3.0, f"the VIP took {moved_at - killed_at:.2f} s to serve again"
    assert holds_vip(network, lb2) and not holds_vip(network, lb1)

    # The client recovered: every attempt from then on succeeds, through the backup.
    settled = len(client.lines)
    served_by(client, ("n2a", "n2b"), start=settled)
    client.signal(signal.SIGTERM)
    client.wait_exit()
    after = client.lines[settled:]
    assert after and all(line.startswith(("ok n2a", "ok n2b")) for line in after), after
    failures = [line for line in client.lines[killed_at_line:] if line.startswith("fail")]
    print(f"VIP moved and served again {moved_at - killed_at:.2f} s after the kill; "
          f"{len(failures)} failed attempts in between")
