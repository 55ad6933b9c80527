"""Health checks, failover and recovery with real processes on 127.0.0.1.

Timings are short (checks every 0.2 s) so the suite stays fast; every wait is on a condition (a log line,
an answer from a backend) with a bound, never a bare sleep.
"""
import os
import signal
import socket
import sys
import time
from pathlib import Path

from procs import (BACKEND_SERVER, ConnectionLoad, backend_name, balancer_args, connect, free_port,
                   read_line, wait_until)

HEALTH_BACKEND = str(Path(__file__).with_name("health_backend.py"))
FAST_CHECKS = ["--check", "tcp", "--check-interval", "0.2s", "--check-timeout", "0.5s",
               "--rise", "2", "--fall", "2"]


def echo_backend(procs, name, port=None):
    """One echo backend in its own process (so it can be killed alone): (proc, port)."""
    port = port or free_port()
    proc = procs.start([sys.executable, BACKEND_SERVER, f"{name}:{port}"], f"backend {name}")
    proc.wait_for_line(r"^ready$")
    return proc, port


def test_tcp_backend_killed_and_restarted_under_load_loses_no_connection(procs, tcp_relay):
    ports = {}
    backends = {}
    for name in "abc":
        backends[name], ports[name] = echo_backend(procs, name)
    port = free_port()
    rise, interval, slowstart = 2, 0.2, 1.0
    fastlb = procs.fastlb(*balancer_args(port, ports.values(), *FAST_CHECKS, "--slowstart", f"{slowstart}s"))
    load = ConnectionLoad(port, max_seconds=40).start()
    try:
        started = time.monotonic()
        wait_until(lambda: load.first_answer_by("b"), what="traffic to b")
        with load.between_connections():
            backends["b"].kill()
        fastlb.wait_for_line(rf"backend 127.0.0.1:{ports['b']} DOWN: 2 consecutive check failures "
                             rf"\(connection refused\)")
        # Restart b on its port once the client has run a while without it.
        wait_until(lambda: time.monotonic() - started > 4, what="load without b")
        backends["b"], _ = echo_backend(procs, "b", ports["b"])
        restarted = time.monotonic()
        fastlb.wait_for_line(rf"backend 127.0.0.1:{ports['b']} UP: 2 consecutive checks passed")
        back = wait_until(lambda: load.first_answer_by("b", since=restarted), timeout=15,
                          what="b answering again")
        wait_until(lambda: time.monotonic() - started >= 10, timeout=30, what="10 s of load")
    finally:
        load.stop()
    assert load.failures == []
    assert len(load.answers) > 100
    # Back within rise x interval (+ jitter, one check timeout, slow start's first step), with a margin
    # for a loaded machine: the bound the feature promises, not a speed benchmark.
    assert back - restarted < rise * interval * 1.1 + 0.5 + slowstart + 2.0
    assert {name for _, name in load.answers} == {"a", "b", "c"}
    assert fastlb.output.count(f"backend 127.0.0.1:{ports['b']} DOWN") == 1


def test_http_checks_take_down_a_black_hole_and_a_500_backend(procs):
    ports = {name: free_port() for name in ("good", "broken", "hole")}
    backends = procs.start([sys.executable, HEALTH_BACKEND, f"http200:good:{ports['good']}",
                            f"http500:broken:{ports['broken']}", f"blackhole:hole:{ports['hole']}"],
                           "http backends")
    backends.wait_for_line(r"^ready$")
    port = free_port()
    fastlb = procs.fastlb(*balancer_args(port, ports.values(), "--check", "http", "--check-path", "/health",
                                         "--check-interval", "0.2s", "--check-timeout", "0.4s",
                                         "--fall", "2", "--check-expect", "200-299"))
    fastlb.wait_for_line(rf"backend 127.0.0.1:{ports['broken']} DOWN: first check failed "
                         rf"\(HTTP 500, expected 200-299\)")
    fastlb.wait_for_line(rf"backend 127.0.0.1:{ports['hole']} DOWN: first check failed "
                         rf"\(timeout after 0.4s\)")
    assert f"127.0.0.1:{ports['good']} DOWN" not in fastlb.output
    for _ in range(12):                     # tcp mode relays a whole HTTP exchange: only good answers
        with connect(port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"good\n")


def test_all_backends_down_clients_refused_fast_then_traffic_resumes(procs):
    a, port_a = echo_backend(procs, "a")
    b, port_b = echo_backend(procs, "b")
    port = free_port()
    fastlb = procs.fastlb(*balancer_args(port, [port_a, port_b], *FAST_CHECKS))
    assert backend_name(port) in ("a", "b")
    a.kill()
    b.kill()
    for backend_port in (port_a, port_b):
        fastlb.wait_for_line(rf"backend 127.0.0.1:{backend_port} DOWN")
    for _ in range(3):
        # Closed at once, not left hanging: the socket's 5 s timeout would raise otherwise.
        with connect(port, timeout=5) as sock:
            try:
                assert sock.recv(64) == b""
            except ConnectionResetError:
                pass
    fastlb.wait_for_line(r"no backend available")
    echo_backend(procs, "a2", port_a)
    fastlb.wait_for_line(rf"backend 127.0.0.1:{port_a} UP")
    assert {backend_name(port) for _ in range(5)} == {"a2"}


def test_with_two_workers_the_master_checks_once_and_both_workers_follow(procs):
    a, port_a = echo_backend(procs, "a")
    b, port_b = echo_backend(procs, "b")
    port = free_port()
    # No retries and no passive ejection: a worker that did not know b is down would fail connections.
    fastlb = procs.fastlb(*balancer_args(port, [port_a, port_b], *FAST_CHECKS, "--workers", "2",
                                         "--retries", "0", "--outlier-failures", "0",
                                         "--log-level", "debug"))
    master_pid = fastlb.pid
    fastlb.wait_for_line(r"master running 2 workers, checking 2 backend\(s\)")
    worker_pids = [int(fastlb.wait_for_line(rf"worker {i} started \(pid (\d+)\)").group(1)) for i in (0, 1)]
    for pid in worker_pids:
        fastlb.wait_for_line(rf"fastlb\[{pid}\] worker \d: INFO listening on")
    b.kill()
    fastlb.wait_for_line(rf"fastlb\[{master_pid}\] master: WARNING backend 127.0.0.1:{port_b} DOWN")
    for pid in worker_pids:
        fastlb.wait_for_line(rf"fastlb\[{pid}\] worker \d: DEBUG backend 127.0.0.1:{port_b} now down "
                             rf"\(health check")
    assert {backend_name(port) for _ in range(40)} == {"a"}
    # Only the master checks and logs the verdict.
    assert fastlb.output.count(f"backend 127.0.0.1:{port_b} DOWN") == 1
    # A restarted worker starts with the current verdicts.
    restarts_from = len(fastlb.lines)
    os.kill(worker_pids[0], signal.SIGKILL)
    new_pid = int(fastlb.wait_for_line(r"worker 0 started \(pid (\d+)\)", start=restarts_from).group(1))
    fastlb.wait_for_line(rf"fastlb\[{new_pid}\] worker 0: DEBUG backend 127.0.0.1:{port_b} now down "
                         rf"\(health check: down at start\)", start=restarts_from)
    fastlb.wait_for_line(rf"fastlb\[{new_pid}\] worker 0: INFO listening on", start=restarts_from)
    assert {backend_name(port) for _ in range(40)} == {"a"}
    # b comes back: every worker sends to it again.
    echo_backend(procs, "b2", port_b)
    fastlb.wait_for_line(rf"backend 127.0.0.1:{port_b} UP")
    for pid in (new_pid, worker_pids[1]):
        fastlb.wait_for_line(rf"fastlb\[{pid}\] worker \d: DEBUG backend 127.0.0.1:{port_b} now up")
    assert "b2" in {backend_name(port) for _ in range(20)}


def test_passive_ejection_grows_and_never_ejects_past_the_cap(procs):
    backends, ports = {}, {}
    for name in "abc":
        backends[name], ports[name] = echo_backend(procs, name)
    port = free_port()
    fastlb = procs.fastlb(*balancer_args(port, ports.values(), "--outlier-failures", "2",
                                         "--outlier-ejection-time", "0.3s", "--max-ejection-percent", "50",
                                         "--retries", "2"))
    load = ConnectionLoad(port, max_seconds=30).start()
    try:
        wait_until(lambda: load.first_answer_by("c"), what="traffic to c")
        with load.between_connections():
            backends["b"].kill()
            backends["c"].kill()
        # One of the two dead backends is ejected, again and again for longer; the other is not: 50 % of
        # 3 backends is 1.
        first = fastlb.wait_for_line(r"backend (127.0.0.1:\d+) ejected for 0.3s \(ejection 1\): "
                                     r"2 consecutive connect failures \(connection refused\)")
        ejected = first.group(1)
        fastlb.wait_for_line(r"not ejected after 2 consecutive connect failures \(connection refused\): "
                             r"1 of 3 already ejected, max_ejection_percent is 50")
        fastlb.wait_for_line(rf"backend {ejected} back from ejection")
        fastlb.wait_for_line(rf"backend 127.0.0.1:\d+ ejected for 0.6s \(ejection 2\)")
    finally:
        load.stop()
    assert load.failures == []
    assert {name for _, name in load.answers[-20:]} == {"a"}


def test_the_last_available_backend_is_never_ejected(procs):
    a, port_a = echo_backend(procs, "a")
    port = free_port()
    fastlb = procs.fastlb(*balancer_args(port, [port_a], "--outlier-failures", "1",
                                         "--max-ejection-percent", "100"))
    a.kill()
    with connect(port) as sock:
        assert sock.recv(64) == b""
    # refused, or reset when the connect raced the kill (it sat in the dying backend's accept queue)
    fastlb.wait_for_line(r"not ejected after 1 consecutive connect failures \(connection (refused|reset)\): "
                         r"it is the last available backend of its pool")
    echo_backend(procs, "a2", port_a)
    assert backend_name(port) == "a2"       # never ejected: back as soon as it listens


def test_backup_takes_over_only_while_every_primary_is_down(procs):
    a, port_a = echo_backend(procs, "a")
    _, port_spare = echo_backend(procs, "spare")
    port = free_port()
    fastlb = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{port_a}",
                          "--backend", f"127.0.0.1:{port_spare},backup", *FAST_CHECKS)
    assert {backend_name(port) for _ in range(5)} == {"a"}
    a.kill()
    fastlb.wait_for_line(rf"backend 127.0.0.1:{port_a} DOWN")
    assert {backend_name(port) for _ in range(5)} == {"spare"}
    echo_backend(procs, "a2", port_a)
    fastlb.wait_for_line(rf"backend 127.0.0.1:{port_a} UP")
    assert {backend_name(port) for _ in range(5)} == {"a2"}


def test_a_check_port_is_checked_instead_of_the_traffic_port(procs):
    _, port_a = echo_backend(procs, "a")
    _, port_b = echo_backend(procs, "b")
    closed_port = free_port()               # nothing listens there: b's checks fail, b's traffic port works
    port = free_port()
    fastlb = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{port_a}",
                          "--backend", f"127.0.0.1:{port_b},check-port={closed_port}", *FAST_CHECKS)
    fastlb.wait_for_line(rf"backend 127.0.0.1:{port_b} DOWN: first check failed \(connection refused\)")
    assert {backend_name(port) for _ in range(6)} == {"a"}
    assert f"127.0.0.1:{port_a} DOWN" not in fastlb.output


def test_http_check_expecting_body_text(procs):
    ports = {name: free_port() for name in ("good", "other")}
    backends = procs.start([sys.executable, HEALTH_BACKEND, f"http200:good:{ports['good']}",
                            f"http200:other:{ports['other']}"], "http backends")
    backends.wait_for_line(r"^ready$")
    port = free_port()
    fastlb = procs.fastlb(*balancer_args(port, ports.values(), "--check", "http", "--check-body", "good",
                                         "--check-interval", "0.2s", "--check-host", "health.internal"))
    fastlb.wait_for_line(rf"backend 127.0.0.1:{ports['other']} DOWN: first check failed "
                         rf"\(HTTP 200 but the body lacks 'good'\)")
    assert f"127.0.0.1:{ports['good']} DOWN" not in fastlb.output
