"""Issue 8 in HTTP mode (the default): failover and recovery under keep-alive load, real processes.

Timings are short (checks every 0.2 s) so the suite stays fast; every wait is on a condition (a log line,
an answer) with a bound, never a bare sleep. The client loop (http_client.KeepAliveLoad) holds nothing
back around a kill: a request in flight on a dying backend is the balancer's to re-send.
"""
import sys
import time
from pathlib import Path

from http_client import Client, KeepAliveLoad
from procs import HTTP_BACKEND, free_port, wait_until

HEALTH_BACKEND = str(Path(__file__).with_name("health_backend.py"))
RISE, INTERVAL = 2, 0.2
FAST_CHECKS = ["--check", "http", "--check-path", "/health", "--check-interval", f"{INTERVAL}s",
               "--check-timeout", "0.5s", "--rise", str(RISE), "--fall", "2"]


def http_backend(procs, name, port=None):
    """One HTTP backend (tests/http_backend.py) in its own process, so it can be killed alone."""
    port = port or free_port()
    proc = procs.start([sys.executable, HTTP_BACKEND, f"{name}:{port}"], f"backend {name}")
    proc.wait_for_line(r"^ready$")
    return proc, port


def balancer_args(port, backend_ports, *extra):
    args = ["--mode", "http", "--bind", f"127.0.0.1:{port}"]
    for backend_port in backend_ports:
        args += ["--backend", f"127.0.0.1:{backend_port}"]
    return [*args, *extra]


def test_http_backend_killed_and_restarted_under_keepalive_load_fails_no_request(procs):
    backends, ports = {}, {}
    for name in "abc":
        backends[name], ports[name] = http_backend(procs, name)
    port = free_port()
    slowstart = 1.0
    fastlb = procs.fastlb(*balancer_args(port, ports.values(), *FAST_CHECKS, "--slowstart", f"{slowstart}s"))
    load = KeepAliveLoad(port, max_seconds=40).start()
    try:
        started = time.monotonic()
        wait_until(lambda: load.first_answer_by("b"), what="traffic to b")
        backends["b"].kill()               # mid-stream: requests in flight on b must be re-sent elsewhere
        fastlb.wait_for_line(rf"backend 127.0.0.1:{ports['b']} DOWN: 2 consecutive check failures "
                             rf"\(connection refused\)")
        wait_until(lambda: time.monotonic() - started > 4, what="load without b")
        backends["b"], _ = http_backend(procs, "b", ports["b"])
        restarted = time.monotonic()
        fastlb.wait_for_line(rf"backend 127.0.0.1:{ports['b']} UP: 2 consecutive checks passed")
        back = wait_until(lambda: load.first_answer_by("b", since=restarted), timeout=15,
                          what="b answering again")
        wait_until(lambda: time.monotonic() - started >= 10, timeout=30, what="10 s of load")
    finally:
        load.stop()
    assert load.failures == []
    assert len(load.answers) > 100
    assert load.connections == 1           # one keep-alive connection all along: nothing was cut
    # Back within rise x interval (+ jitter, one check timeout, slow start's first step), with a margin
    # for a loaded machine: the bound the feature promises, not a speed benchmark.
    assert back - restarted < RISE * INTERVAL * 1.1 + 0.5 + slowstart + 2.0
    assert {name for _, name in load.answers} == {"a", "b", "c"}
    assert fastlb.output.count(f"backend 127.0.0.1:{ports['b']} DOWN") == 1
