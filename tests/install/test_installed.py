"""fastlb as installed from the wheel and from the sdist, each in a fresh virtualenv, run from a directory
outside the source tree (the `installed` fixture): it imports, balances HTTP on its C engine, relays
TCP, terminates TLS, serves its admin bind, and `fastlb demo` and `fastlb ctl` work. A module or data
file missing from the package fails here, as it would for a user."""
from __future__ import annotations

import json
import signal
import socket
import ssl
import textwrap
import urllib.request

import pytest

from http_client import Client
from pki import CA
from procs import backend_name, free_port, port_open, read_all, read_line, wait_until

ADMIN_TOKEN = "install-smoke-token-0123456789"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    """(CA file, server PEM with its key) for a bind of `default.test`."""
    ca = CA(tmp_path_factory.mktemp("pki"), "install-ca")
    return str(ca.path), str(ca.issue("default", "default.test", ("default.test",)))


def start_balancer(installed, procs, port: int, *args: str):
    proc = installed.start(procs, *args)
    proc.wait_for_line(r"listening on")
    wait_until(lambda: port_open(port), what=f"installed fastlb on port {port}")
    return proc


def test_every_module_imports_from_the_virtualenv_and_the_core_balances(installed):
    script = textwrap.dedent("""
        import importlib, json, pkgutil, sys
        import fastlb
        assert fastlb.__file__.startswith(sys.prefix + "/"), fastlb.__file__
        names = [m.name for m in pkgutil.walk_packages(fastlb.__path__, "fastlb.")
                 if m.name != "fastlb.__main__"]          # __main__ would run the command line
        for name in names:
            importlib.import_module(name)
        import fastlb.http.runtime, fastlb.http._fast, fastlb._crelay, fastlb.http2._nghttp2
        compiled = [m.__file__.endswith(".so") for m in (fastlb.http.runtime, fastlb.http._fast, fastlb._crelay,
                                                         fastlb.http2._nghttp2)]
        balancer = fastlb.Balancer(["10.0.0.1:80", "10.0.0.2:80"], "roundrobin")
        print(json.dumps({"modules": len(names), "compiled": compiled, "core": type(balancer).__module__,
                          "picks": [balancer.pick() for _ in range(4)]}))
    """)
    result = installed.run(installed.python, "-c", script)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["modules"] >= 20 and all(seen["compiled"])
    assert seen["core"] == "fastlb._core"          # the compiled core, not its pure-Python twin
    assert seen["picks"] == [0, 1, 0, 1]


def test_http_mode_serves_on_the_c_engine(installed, procs):
    _, ports = procs.http_backends("a", "b")
    port = free_port()
    balancer = start_balancer(installed, procs, port, "--bind", f"127.0.0.1:{port}",
                              *(f"--backend=127.0.0.1:{p}" for p in ports.values()))
    balancer.wait_for_line(rf"127\.0\.0\.1:{port}: HTTP engine c$")
    client = Client(port)
    try:
        answers = [client.request("GET", f"/n{i}") for i in range(4)]
    finally:
        client.close()
    assert [r.status for r in answers] == [200] * 4
    assert {r.header("X-Backend") for r in answers} == {"a", "b"}


def test_tcp_mode_relays(installed, procs):
    _, ports = procs.backends("a", "b")
    port = free_port()
    start_balancer(installed, procs, port, "--mode", "tcp", "--bind", f"127.0.0.1:{port}",
                   *(f"--backend=127.0.0.1:{p}" for p in ports.values()))
    assert {backend_name(port) for _ in range(4)} == {"a", "b"}


def tls_connect(port: int, ca_file: str) -> ssl.SSLSocket:
    """A TLS connection to 127.0.0.1:port that verifies the server as default.test."""
    context = ssl.create_default_context(cafile=ca_file)
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                               server_hostname="default.test")


def test_tls_bind_in_tcp_mode_is_terminated_by_the_relay_thread(installed, procs, certificate):
    ca_file, pem = certificate
    _, ports = procs.backends("a")
    port = free_port()
    balancer = start_balancer(installed, procs, port, "--mode", "tcp", "--bind",
                              f"127.0.0.1:{port},ssl,cert={pem}", f"--backend=127.0.0.1:{ports['a']}")
    balancer.wait_for_line(r"terminated by the relay thread")        # the C relay, linked to libssl
    with tls_connect(port, ca_file) as sock:
        name = read_line(sock)
        sock.sendall(b"ping\n")
        assert (name, read_line(sock)) == (b"a\n", b"ping\n")


def test_tls_bind_in_http_mode(installed, procs, certificate):
    ca_file, pem = certificate
    _, ports = procs.http_backends("a")
    port = free_port()
    start_balancer(installed, procs, port, "--bind", f"127.0.0.1:{port},ssl,cert={pem}",
                   f"--backend=127.0.0.1:{ports['a']}")
    with tls_connect(port, ca_file) as sock:
        sock.sendall(b"GET /tls HTTP/1.1\r\nHost: default.test\r\nConnection: close\r\n\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"a GET /tls\n")


def test_admin_bind_serves_stats_and_fastlb_ctl_talks_to_it(installed, procs, tmp_path):
    _, ports = procs.http_backends("a")
    port, admin = free_port(), free_port()
    token = tmp_path / "token"
    token.write_text(ADMIN_TOKEN)
    start_balancer(installed, procs, port, "--bind", f"127.0.0.1:{port}", f"--backend=127.0.0.1:{ports['a']}",
                   "--admin", f"127.0.0.1:{admin}", "--admin-token-file", str(token))
    wait_until(lambda: port_open(admin), what="the admin bind")
    pages = {}
    for path in ("/healthz", "/stats", "/metrics"):
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=5) as response:
            pages[path] = (response.status, response.read().decode())
    assert pages["/healthz"] == (200, "ok\n")
    assert pages["/stats"][0] == 200 and "<html" in pages["/stats"][1].lower()   # stats.html, package data
    assert pages["/metrics"][0] == 200 and "fastlb_" in pages["/metrics"][1]
    ctl = installed.run(installed.fastlb, "ctl", "--admin", f"127.0.0.1:{admin}", "--token-file", str(token),
                        "backends")
    assert ctl.returncode == 0, ctl.stderr
    assert f"127.0.0.1:{ports['a']}" in ctl.stdout


def test_demo_serves_and_stops_on_ctrl_c(installed, procs):
    port = free_port()
    demo = installed.start(procs, "demo", "--port", str(port), name="demo")
    demo.wait_for_line(rf"curl http://127\.0\.0\.1:{port}/")
    bodies = set()
    for _ in range(3):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert response.status == 200
            bodies.add(response.read().decode())
    assert len(bodies) == 3 and all(b.startswith("hello from demo backend") for b in bodies)
    demo.signal(signal.SIGINT)
    assert demo.wait_exit() == 0
    assert "Traceback" not in demo.output
