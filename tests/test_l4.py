"""End-to-end L4 relay tests: real fastlb processes in front of real echo backends on 127.0.0.1, each
on every `--mode tcp` data path (conftest's tcp_relay: the C relay in its thread, inline, and uvloop)."""
import collections
import hashlib
import os
import signal
import socket
import threading
import time

import pytest

from fastlb import ALGORITHMS, proxy_protocol
from procs import balancer_args, backend_name, connect, free_port, read_all, read_line, wait_until


@pytest.fixture(autouse=True)
def on_each_path(tcp_relay):
    """Every test here runs on each TCP data path."""


def hold_connections(port, count):
    """Opens count connections one after another, each held open after its backend said its name."""
    socks, names = [], []
    for _ in range(count):
        sock = connect(port)
        socks.append(sock)
        names.append(read_line(sock).decode().strip())
    return socks, names


# ---- distribution per algorithm ----------------------------------------------------------------

def test_every_core_algorithm_is_covered():
    assert set(ALGORITHMS) == {"roundrobin", "random", "leastconn", "leasttime", "p2c", "first",
                               "hash", "ketama", "maglev"}


def test_roundrobin_follows_weights_exactly(procs):
    _, ports = procs.backends("a", "b", "c")
    port = free_port()
    procs.fastlb(*balancer_args(port, [f"127.0.0.1:{ports['a']}", f"127.0.0.1:{ports['b']}",
                                    f"127.0.0.1:{ports['c']},weight=2"]))
    counts = collections.Counter(backend_name(port) for _ in range(40))
    assert counts == {"a": 10, "b": 10, "c": 20}


@pytest.mark.parametrize("algorithm", ["random", "p2c"])
def test_random_algorithms_reach_every_backend(procs, algorithm):
    _, ports = procs.backends("a", "b", "c")
    port = free_port()
    procs.fastlb(*balancer_args(port, [f"127.0.0.1:{p}" for p in ports.values()],
                             "--algorithm", algorithm, "--seed", "7"))
    counts = collections.Counter(backend_name(port) for _ in range(60))
    assert set(counts) == {"a", "b", "c"} and sum(counts.values()) == 60


def test_leastconn_spreads_held_connections_evenly(procs):
    _, ports = procs.backends("a", "b", "c")
    port = free_port()
    procs.fastlb(*balancer_args(port, [f"127.0.0.1:{p}" for p in ports.values()], "--algorithm", "leastconn"))
    socks, names = hold_connections(port, 30)
    try:
        assert collections.Counter(names) == {"a": 10, "b": 10, "c": 10}
    finally:
        for sock in socks:
            sock.close()


def test_leasttime_spreads_held_connections(procs):
    _, ports = procs.backends("a", "b", "c")
    port = free_port()
    procs.fastlb(*balancer_args(port, [f"127.0.0.1:{p}" for p in ports.values()], "--algorithm", "leasttime"))
    socks, names = hold_connections(port, 30)
    try:
        counts = collections.Counter(names)
        assert sum(counts.values()) == 30 and len(counts) >= 2, counts
    finally:
        for sock in socks:
            sock.close()


def test_first_fills_backends_in_order_up_to_their_maxconn(procs):
    _, ports = procs.backends("a", "b", "c")
    port = free_port()
    procs.fastlb(*balancer_args(port, [f"127.0.0.1:{ports['a']},maxconn=4", f"127.0.0.1:{ports['b']}",
                                    f"127.0.0.1:{ports['c']}"], "--algorithm", "first"))
    socks, names = hold_connections(port, 10)
    try:
        assert names == ["a"] * 4 + ["b"] * 6
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("algorithm", ["hash", "ketama", "maglev"])
def test_source_hashing_is_sticky_per_client_ip(procs, algorithm):
    _, ports = procs.backends("a", "b", "c")
    port = free_port()
    procs.fastlb(*balancer_args(port, [f"127.0.0.1:{p}" for p in ports.values()],
                             "--algorithm", algorithm, "--hash-key", "source"))
    # All of 127.0.0.0/8 is loopback on Linux: each source address is a different client IP.
    sources = [f"127.0.0.{i}" for i in range(2, 26)]
    first = {ip: backend_name(port, ip) for ip in sources}
    second = {ip: backend_name(port, ip) for ip in sources}
    assert first == second
    assert len(set(first.values())) >= 2, first


# ---- failover and limits ---------------------------------------------------------------------

def test_failed_connect_goes_to_the_next_candidate(procs):
    _, ports = procs.backends("a", "b")
    closed = free_port()
    port = free_port()
    fastlb = procs.fastlb(*balancer_args(port, [f"127.0.0.1:{closed}", f"127.0.0.1:{ports['a']}",
                                             f"127.0.0.1:{ports['b']}"], "--log-level", "debug"))
    names = [backend_name(port) for _ in range(30)]
    assert collections.Counter(names).keys() == {"a", "b"} and len(names) == 30
    fastlb.wait_for_line(rf"connect to 127\.0\.0\.1:{closed} failed")
    assert "closing client connection" not in fastlb.output


def test_backend_killed_mid_run_is_failed_over(procs):
    proc_a, ports_a = procs.backends("a")
    _, ports_b = procs.backends("b")
    port = free_port()
    procs.fastlb(*balancer_args(port, [f"127.0.0.1:{ports_a['a']}", f"127.0.0.1:{ports_b['b']}"]))
    assert {backend_name(port) for _ in range(4)} == {"a", "b"}
    proc_a.kill()
    assert [backend_name(port) for _ in range(10)] == ["b"] * 10


def test_backups_take_over_only_when_no_primary_can(procs):
    _, ports = procs.backends("primary", "spare")
    dead = free_port()
    port = free_port()
    procs.fastlb(*balancer_args(port, [f"127.0.0.1:{ports['primary']}", f"127.0.0.1:{ports['spare']},backup"]))
    assert {backend_name(port) for _ in range(10)} == {"primary"}
    # A second balancer whose only primary is dead: every connection lands on the backup.
    port2 = free_port()
    procs.fastlb(*balancer_args(port2, [f"127.0.0.1:{dead}", f"127.0.0.1:{ports['spare']},backup"]))
    assert {backend_name(port2) for _ in range(5)} == {"spare"}
    # A primary at its maxconn is busy, not down: the next client waits for it, never the backup.
    port3 = free_port()
    procs.fastlb(*balancer_args(port3, [f"127.0.0.1:{ports['primary']},maxconn=1",
                                     f"127.0.0.1:{ports['spare']},backup"], "--queue-timeout", "200ms"))
    with connect(port3) as held:
        assert read_line(held) == b"primary\n"
        assert backend_name(port3) == ""          # queued, then closed at the queue timeout


def test_no_backend_reachable_closes_the_client_quickly(procs):
    port = free_port()
    fastlb = procs.fastlb(*balancer_args(port, [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]))
    with connect(port) as sock:
        assert read_all(sock) == b""
    fastlb.wait_for_line(r"closing client connection\(s\) from 127\.0\.0\.1: connect failed")


def test_global_maxconn_queues_then_serves_in_order(procs):
    _, ports = procs.backends("a")
    port = free_port()
    procs.fastlb(*balancer_args(port, [f"127.0.0.1:{ports['a']}"], "--maxconn", "2", "--queue-timeout", "10s"))
    held, _ = hold_connections(port, 2)
    waiting = connect(port)
    try:
        waiting.settimeout(0.3)
        with pytest.raises(socket.timeout):
            waiting.recv(1)                   # queued: no backend connection yet
        waiting.settimeout(5)
        held[0].close()
        assert read_line(waiting) == b"a\n"   # a slot freed: the queued client is served
    finally:
        waiting.close()
        for sock in held:
            sock.close()


def test_queue_timeout_and_queue_size_bound_the_wait(procs):
    _, ports = procs.backends("a")
    port = free_port()
    procs.fastlb(*balancer_args(port, [f"127.0.0.1:{ports['a']},maxconn=1"], "--queue-size", "1",
                             "--queue-timeout", "300ms"))
    held, _ = hold_connections(port, 1)
    queued = connect(port)
    overflow = connect(port)
    try:
        assert read_all(overflow) == b""      # the queue's one place is taken: closed at once
        started = time.monotonic()
        assert read_all(queued) == b""        # closed when its wait times out
        assert time.monotonic() - started < 5
    finally:
        for sock in (queued, overflow, *held):
            sock.close()


def test_connect_timeout_moves_on_to_the_next_backend(procs):
    # A listener whose accept queue is full drops further SYNs, so connecting to it hangs.
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(0)
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(black_hole.getsockname())
            fillers.append(filler)
        _, ports = procs.backends("a")
        port = free_port()
        fastlb = procs.fastlb(*balancer_args(port, [f"127.0.0.1:{black_hole.getsockname()[1]}",
                                                 f"127.0.0.1:{ports['a']}"],
                                          "--connect-timeout", "200ms", "--log-level", "debug"))
        assert [backend_name(port) for _ in range(4)] == ["a"] * 4
        fastlb.wait_for_line(r"failed \(TimeoutError\)")
    finally:
        for sock in (black_hole, *fillers):
            sock.close()


def test_idle_timeout_closes_silent_connections(procs):
    _, ports = procs.backends("a")
    port = free_port()
    procs.fastlb(*balancer_args(port, [f"127.0.0.1:{ports['a']}"], "--idle-timeout", "300ms"))
    with connect(port) as sock:
        assert read_line(sock) == b"a\n"
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
        started = time.monotonic()
        assert read_all(sock) == b""
        assert time.monotonic() - started >= 0.25     # not cut while it was active or too early


# ---- bytes ------------------------------------------------------------------------------------

def test_half_close_forwards_eof_and_keeps_the_other_direction(procs):
    _, ports = procs.backends("a")
    port = free_port()
    procs.fastlb(*balancer_args(port, [f"127.0.0.1:{ports['a']}"]))
    with connect(port) as sock:
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        # The backend echoes and half-closes only after it saw our EOF, which fastlb forwarded.
        assert read_all(sock) == b"a\nhello"


def test_large_transfer_is_byte_exact(procs):
    _, ports = procs.backends("a")
    port = free_port()
    procs.fastlb(*balancer_args(port, [f"127.0.0.1:{ports['a']}"]))
    payload = os.urandom(20 * 1024 * 1024)
    with connect(port, timeout=30) as sock:
        assert read_line(sock) == b"a\n"

        def send():
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        digest, received = hashlib.sha256(), 0
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
        sender.join(30)
    assert received == len(payload)
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()


# ---- PROXY protocol ---------------------------------------------------------------------------

def test_send_proxy_v1_tells_the_backend_the_client_address(procs):
    _, ports = procs.backends("a")
    port = free_port()
    procs.fastlb(*balancer_args(port, [f"127.0.0.1:{ports['a']},send-proxy"]))
    with connect(port, source_ip="127.0.0.9") as sock:
        client_port = sock.getsockname()[1]
        assert read_line(sock) == b"a\n"
        sock.sendall(b"x")
        header = read_line(sock)           # the backend echoes what it received, header first
        assert header == f"PROXY TCP4 127.0.0.9 127.0.0.1 {client_port} {port}\r\n".encode()
        assert sock.recv(1) == b"x"


def test_accept_proxy_and_send_proxy_v2_carry_the_original_client(procs):
    _, ports = procs.backends("a")
    port = free_port()
    procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port},accept-proxy", "--backend", f"127.0.0.1:{ports['a']},send-proxy-v2")
    with connect(port) as sock:
        sock.sendall(b"PROXY TCP4 10.1.2.3 10.0.0.1 1111 80\r\nhello")
        assert read_line(sock) == b"a\n"
        header = proxy_protocol.build_v2(("10.1.2.3", 1111), ("10.0.0.1", 80))
        echoed = b""
        while len(echoed) < len(header) + 5:
            chunk = sock.recv(4096)
            assert chunk, echoed
            echoed += chunk
        assert proxy_protocol.parse(echoed) == (len(header), ("10.1.2.3", 1111), ("10.0.0.1", 80))
        assert echoed[len(header):] == b"hello"


def test_accept_proxy_rejects_a_connection_without_header(procs):
    _, ports = procs.backends("a")
    port = free_port()
    procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port},accept-proxy", "--backend", f"127.0.0.1:{ports['a']}")
    with connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert read_all(sock) == b""


@pytest.mark.parametrize("source,destination", [
    (("192.0.2.1", 56324), ("198.51.100.7", 443)),
    (("2001:db8::1", 40000), ("2001:db8::2", 8443)),
])
def test_proxy_protocol_headers_round_trip(source, destination):
    for build in (proxy_protocol.build_v1, proxy_protocol.build_v2):
        header = build(source, destination)
        assert proxy_protocol.parse(header + b"rest") == (len(header), source, destination)
        assert proxy_protocol.parse(header[:-1]) is None


def test_proxy_protocol_rejects_garbage():
    for bad in (b"GET / HTTP/1.1\r\n", b"PROXY TCP4 1.2.3.4 nope 1 2\r\n", b"PROXY TCP9 a b 1 2\r\n",
                b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c"):
        with pytest.raises(proxy_protocol.ProxyProtocolError):
            proxy_protocol.parse(bad)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_backpressure_stops_a_client_that_does_not_read(procs):
    """A client that writes without reading its echo must be stopped by full buffers along the path,
    not buffered inside fastlb: its sends block, fastlb's memory stays flat, and every byte arrives."""
    _, ports = procs.backends("a")
    port = free_port()
    fastlb = procs.fastlb(*balancer_args(port, [f"127.0.0.1:{ports['a']}"]))
    limit = 128 * 1024 * 1024
    chunk = b"z" * (256 * 1024)
    with connect(port, timeout=30) as sock:
        assert read_line(sock) == b"a\n"
        rss_before = rss_kib(fastlb.pid)
        sock.settimeout(0.5)
        sent = 0
        try:
            while sent < limit:
                sent += sock.send(chunk)
        except socket.timeout:
            pass
        assert sent < limit, "sending never blocked: nothing pushed back"
        assert rss_kib(fastlb.pid) - rss_before < 16 * 1024
        sock.settimeout(30)
        sock.shutdown(socket.SHUT_WR)
        received = 0
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            received += len(data)
    assert received == sent
