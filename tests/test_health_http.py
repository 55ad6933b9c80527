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
from procs import balancer_args as procs_balancer_args

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
    return procs_balancer_args(port, backend_ports, *extra, mode="http")


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
        # (b may die before its first check ran: then that first failure takes it down.)
        fastlb.wait_for_line(rf"backend 127.0.0.1:{ports['b']} DOWN: (2 consecutive check failures|"
                             rf"first check failed) \(connection refused\)")
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


def test_black_hole_and_500_backends_ejected_without_a_failed_idempotent_request(procs):
    """No active checks: passive outlier detection alone must find both, and `--retry-on` re-sends the
    GETs they fail (a 500, a response timeout) to another backend before the client sees anything."""
    ports = {name: free_port() for name in ("good1", "good2", "broken", "hole")}
    backends = procs.start([sys.executable, HEALTH_BACKEND, f"http200:good1:{ports['good1']}",
                            f"http200:good2:{ports['good2']}", f"http500:broken:{ports['broken']}",
                            f"blackhole:hole:{ports['hole']}"], "health backends")
    backends.wait_for_line(r"^ready$")
    port = free_port()
    # 50 % of 4 backends may be ejected: both bad ones. Retries 3: a request may meet both bad backends
    # and still reach a good one.
    fastlb = procs.fastlb(*balancer_args(port, ports.values(), "--outlier-failures", "2",
                                         "--outlier-ejection-time", "30s", "--response-timeout", "0.5s",
                                         "--retries", "3", "--retry-on", "all-retryable-errors"))
    load = KeepAliveLoad(port, max_seconds=30, max_requests=400).start()
    try:
        fastlb.wait_for_line(rf"backend 127.0.0.1:{ports['broken']} ejected for 30s \(ejection 1\): "
                             rf"2 consecutive bad responses \(status 500\)")
        fastlb.wait_for_line(rf"backend 127.0.0.1:{ports['hole']} ejected for 30s \(ejection 1\): "
                             rf"2 consecutive bad responses \(response timeout\)")
        wait_until(lambda: len(load.answers) >= 100, timeout=15, what="100 answers")
    finally:
        load.stop()
    assert load.failures == []
    assert {name for _, name in load.answers} == {"good1", "good2"}


def test_a_500_is_not_retried_for_a_post_nor_by_default(procs):
    """Re-sending a request is only safe when it is idempotent, and only asked for with --retry-on."""
    ports = {name: free_port() for name in ("broken", "good")}
    backends = procs.start([sys.executable, HEALTH_BACKEND, f"http500:broken:{ports['broken']}",
                            f"http200:good:{ports['good']}"], "health backends")
    backends.wait_for_line(r"^ready$")
    seen = {}
    for retry_on in (None, "all-retryable-errors"):
        port = free_port()
        extra = ["--algorithm", "roundrobin", "--outlier-failures", "0"]
        if retry_on:
            extra += ["--retry-on", retry_on]
        fastlb = procs.fastlb(*balancer_args(port, ports.values(), *extra))
        statuses = set()
        with Client(port) as client:
            # Round robin over two backends: two requests of each method meet `broken` first.
            for method in ("POST", "POST", "POST", "POST", "GET", "GET", "GET", "GET"):
                body = b"x" if method == "POST" else None
                statuses.add((method.encode(), client.request(method, "/", body=body).status))
        seen[retry_on] = statuses
        fastlb.kill()
    assert seen[None] == {(b"POST", 500), (b"POST", 200), (b"GET", 500), (b"GET", 200)}
    assert seen["all-retryable-errors"] == {(b"POST", 500), (b"POST", 200), (b"GET", 200)}


def test_all_backends_down_answers_503_fast_then_traffic_resumes_by_itself(procs):
    a, port_a = http_backend(procs, "a")
    b, port_b = http_backend(procs, "b")
    port = free_port()
    fastlb = procs.fastlb(*balancer_args(port, [port_a, port_b], *FAST_CHECKS))
    with Client(port) as client:
        assert client.request().status == 200
    a.kill()
    b.kill()
    for backend_port in (port_a, port_b):
        fastlb.wait_for_line(rf"backend 127.0.0.1:{backend_port} DOWN")
    with Client(port, timeout=3) as client:       # a hang would raise TimeoutError after 3 s
        for _ in range(3):
            response = client.request()
            assert response.status == 503
    fastlb.wait_for_line(r"503 to 127.0.0.1: no backend available")
    # A client keeps asking, on one connection, while a backend comes back: it is served again without
    # anyone touching fastlb.
    load = KeepAliveLoad(port, max_seconds=20).start()
    try:
        http_backend(procs, "a2", port_a)
        fastlb.wait_for_line(rf"backend 127.0.0.1:{port_a} UP")
        wait_until(lambda: load.first_answer_by("a2"), what="a2 answering")
    finally:
        load.stop()
    assert all("HTTP 503" in why for _, why in load.failures)
    assert load.answers and load.answers[-1][1] == "a2"
