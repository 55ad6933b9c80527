"""Thousands of backends through the admin API (issue 20, item 13): 2,000 backends added one by one to a
fastlb with two workers are all listed, and every one of them serves requests. (How fast is for
benchmarks/admin_scale.py: no timing here.)"""
import socket
import sys

from http_client import Client, requests_seen
from procs import HTTP_BACKEND, free_port, port_open, wait_until
from test_ops import api, token_file  # noqa: F401  (token_file: fixture)

ADDED = 2000


def distinct_free_ports(count: int) -> list[int]:
    """count different free ports (free_port() one at a time may hand the same one out twice)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def test_two_thousand_backends_added_through_the_api_are_listed_and_served(procs, token_file):  # noqa: F811
    names = [f"b{i}" for i in range(ADDED + 1)]
    ports = dict(zip(names, distinct_free_ports(len(names))))
    backend = procs.start([sys.executable, HTTP_BACKEND, *(f"{n}:{p}" for n, p in ports.items())], "http-backends")
    backend.wait_for_line(r"^ready$", timeout=60)
    port, admin = free_port(), free_port()
    procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['b0']}", "--workers", "2",
                 "--admin", str(admin), "--admin-token-file", token_file, "--log-level", "warning",
                 wait_port=0)
    wait_until(lambda: port_open(admin) and port_open(port), what="fastlb and its admin bind")
    wait_until(lambda: api(admin, "GET", "/api/backends")["workers"] == 2, what="both workers reporting")
    for name in names[1:]:
        api(admin, "POST", "/api/backends", {"address": f"127.0.0.1:{ports[name]}"}, expect=201)

    listed = api(admin, "GET", "/api/backends")["pools"][0]["backends"]
    assert sorted(b["address"] for b in listed) == sorted(f"127.0.0.1:{p}" for p in ports.values())
    assert all(b["state"] == "up" for b in listed)

    # One keep-alive client lands on one worker, whose round robin goes through every backend in turn.
    start = len(backend.lines)
    with Client(port, timeout=10) as client:
        for i in range(ADDED + 1):
            response = client.request("GET", f"/n{i}")
            assert response.status == 200, (i, response.status, response.body)
    served = {r["backend"] for r in requests_seen(backend, start, at_least=ADDED + 1)}
    assert served == set(names)
    # The counters of every backend reached the master (each worker sends what changed).
    counted = wait_until(lambda: sum(b["requests"] for b in api(admin, "GET", "/api/backends")["pools"][0]
                                     ["backends"]) >= ADDED + 1 or None, what="requests counted")
    assert counted
