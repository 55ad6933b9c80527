"""End-to-end HTTP mode tests: real fastlb processes in front of real HTTP backends on 127.0.0.1.

The backends (tests/http_backend.py) log every request they receive, so tests assert both what the
client got and what reached (or never reached) a backend.
"""
import collections
import hashlib
import socket
import textwrap

import pytest

from http_client import Client, build, requests_seen
from procs import Processes, free_port, wait_until


def start(procs, names=("a", "b"), *extra, backends=None):
    """HTTP backends NAMES and a fastlb in front of them: (port, backend proc, name -> port)."""
    proc, ports = procs.http_backends(*names)
    port = free_port()
    args = ["--bind", f"127.0.0.1:{port}"]
    for name in (backends or names):
        args += ["--backend", f"127.0.0.1:{ports[name]}"]
    procs.fastlb(*args, *extra)
    return port, proc, ports


@pytest.fixture(scope="module", autouse=True)
def on_each_path(http_engine):
    """Every test here runs on the C engine and on the Python path alone (conftest's http_engine)."""


@pytest.fixture(scope="module")
def shared(http_engine):
    """One fastlb over backends a and b for the tests that do not change settings (one per data path)."""
    processes = Processes()
    try:
        port, backend, ports = start(processes, ("a", "b"), "--max-body-size", "8m",
                                     "--response-timeout", "2s")
        yield port, backend
    finally:
        processes.cleanup()


# ---- proxying ----------------------------------------------------------------------------------

def test_get_is_proxied_with_forwarded_headers_and_without_hop_by_hop(shared):
    port, backend = shared
    start_line = len(backend.lines)
    with Client(port) as client:
        response = client.request("GET", "/hello?x=1", {
            "Connection": "keep-alive, X-Secret", "X-Secret": "s", "Keep-Alive": "timeout=1",
            "TE": "trailers", "Proxy-Connection": "keep-alive", "X-Other": "kept",
            "X-Forwarded-Proto": "forged", "X-Forwarded-For": "10.9.9.9"})
    assert response.status == 200 and response.body.endswith(b"GET /hello?x=1\n")
    seen = requests_seen(backend, start_line, at_least=1)[-1]
    names = {k.lower(): v for k, v in seen["headers"]}
    assert names["x-other"] == "kept"
    assert names["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
    assert names["x-forwarded-proto"] == "http" and names["x-forwarded-host"] == "test"
    for hop in ("x-secret", "keep-alive", "te", "proxy-connection", "connection"):
        assert hop not in names, hop


def test_response_hop_by_hop_headers_are_removed(shared):
    port, _ = shared
    with Client(port) as client:
        response = client.request("GET", "/headers")
    assert response.status == 200 and response.header("X-Keep") == "1"
    assert response.header("X-Hop") is None and response.header("Keep-Alive") is None


def test_keep_alive_reuses_connections_on_both_sides(procs):
    port, backend, _ = start(procs, ("a",))
    with Client(port) as client:
        for i in range(5):
            assert client.request("GET", f"/r{i}").status == 200
    with Client(port) as client:
        assert client.request("GET", "/again").status == 200
    conns = {r["conn"] for r in requests_seen(backend, at_least=6)}
    assert len(conns) == 1, conns


def test_pipelined_requests_are_answered_in_order(shared):
    port, _ = shared
    with Client(port) as client:
        client.send(build("GET", "/slow?ms=200") + build("GET", "/one") + build("POST", "/echo", body=b"xyz")
                    + build("GET", "/two"))
        bodies = [client.read_response().body for _ in range(4)]
    assert bodies[0] == b"slow\n" and bodies[1].endswith(b"/one\n") and bodies[2] == b"xyz"
    assert bodies[3].endswith(b"/two\n")


def test_chunked_request_body_is_streamed_to_the_backend(shared):
    port, backend = shared
    start_line = len(backend.lines)
    with Client(port) as client:
        client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: t\r\n\r\n")
        response = client.read_response()
    assert response.status == 200 and response.body == b"hello world!"
    seen = requests_seen(backend, start_line, at_least=1)[-1]
    assert seen["length"] == 12


def test_chunked_response_reaches_the_client_chunked(shared):
    port, _ = shared
    with Client(port) as client:
        response = client.request("GET", "/chunked?n=50")
        assert response.chunked and len(response.body) == 50_000
        assert client.request("GET", "/after").status == 200         # still in step


def test_large_bodies_are_byte_exact_both_ways(shared):
    port, _ = shared
    payload = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32 + 7)
    with Client(port, timeout=20) as client:
        response = client.request("POST", "/echo", body=payload)
        assert response.status == 200
        assert response.header("X-Body-Sha256") == hashlib.sha256(payload).hexdigest()
        assert response.body == payload
        response = client.request("GET", f"/big?n={5 * 1024 * 1024 + 3}")
        block = bytes(range(256)) * 256
        expected = (block * 81)[:5 * 1024 * 1024 + 3]
        assert response.body == expected


def test_expect_100_continue(shared):
    port, _ = shared
    with Client(port) as client:
        client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        client.sock.settimeout(5)
        first = client.sock.recv(100)
        assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(b"body")
        response = client.read_response()
    assert response.status == 200 and response.body == b"body"


@pytest.mark.parametrize("path, method", [("/", "HEAD"), ("/status?code=204", "GET"),
                                          ("/status?code=304", "GET")])
def test_responses_without_body_keep_the_connection_in_step(shared, path, method):
    port, _ = shared
    with Client(port) as client:
        response = client.request(method, path)
        assert response.body == b""
        if method == "HEAD":
            assert response.status == 200 and response.header("Content-Length") is not None
        follow = client.request("GET", "/next")
        assert follow.status == 200 and follow.body.endswith(b"GET /next\n")


def test_connection_close_is_honoured(shared):
    port, _ = shared
    with Client(port) as client:
        response = client.request("GET", "/", {"Connection": "close"})
        assert response.status == 200 and response.header("Connection") == "close"
        assert client.closed()


def test_http10_client_gets_a_close_delimited_or_framed_response(shared):
    port, _ = shared
    with Client(port) as client:
        client.send(b"GET /chunked?n=2 HTTP/1.0\r\n\r\n")
        response = client.read_response()
        assert response.status == 200 and len(response.body) == 2000
        assert client.closed()


def test_body_delimited_by_backend_close(shared):
    port, _ = shared
    with Client(port) as client:
        response = client.request("GET", "/eof")
        assert response.body == b"body until close\n"
        assert client.closed()


def test_websocket_upgrade_becomes_a_tunnel(shared):
    port, _ = shared
    with Client(port) as client:
        client.send(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nearly")
        response = client.read_response()
        assert response.status == 101 and response.header("Upgrade") == "websocket"
        received = client.leftover
        client.send(b"ping-pong")
        while len(received) < len(b"earlyping-pong"):
            received += client.sock.recv(100)
        assert received == b"earlyping-pong"


# ---- routing and keys --------------------------------------------------------------------------

def test_routing_rules_from_the_config_file(procs, tmp_path):
    backend, ports = procs.http_backends("web", "api", "admin", "img", "gold", "posts")
    port = free_port()
    path = tmp_path / "lb.toml"
    path.write_text(textwrap.dedent(f"""\
        default_pool = "web"
        [[bind]]
        address = "127.0.0.1:{port}"
        [[pool]]
        name = "web"
        backend = ["127.0.0.1:{ports['web']}"]
        [[pool]]
        name = "api"
        backend = ["127.0.0.1:{ports['api']}"]
        [[pool]]
        name = "admin"
        backend = ["127.0.0.1:{ports['admin']}"]
        [[pool]]
        name = "img"
        backend = ["127.0.0.1:{ports['img']}"]
        [[pool]]
        name = "gold"
        backend = ["127.0.0.1:{ports['gold']}"]
        [[pool]]
        name = "posts"
        backend = ["127.0.0.1:{ports['posts']}"]
        [[route]]
        pool = "admin"
        host = "admin.example.com"
        [[route]]
        pool = "gold"
        header = "X-Tier: gold"
        [[route]]
        pool = "posts"
        method = "POST"
        path_prefix = "/api/"
        [[route]]
        pool = "api"
        path_prefix = "/api/"
        [[route]]
        pool = "img"
        path_regex = "\\\\.(png|jpg)$"
        """))
    procs.fastlb("--config", str(path), wait_port=port)
    cases = [("GET", "/", {}, "web"), ("GET", "/api/x", {}, "api"), ("POST", "/api/x", {}, "posts"),
             ("GET", "/a/b.png", {}, "img"), ("GET", "/a/b.png?x", {}, "img"),
             ("GET", "/api/x", {"X-Tier": "gold"}, "gold"), ("GET", "/", {"X-Tier": "silver"}, "web")]
    with Client(port) as client:
        for method, target, headers, expected in cases:
            response = client.request(method, target, headers, b"" if method == "POST" else None)
            assert response.header("X-Backend") == expected, (method, target, headers)
        client.send(build("GET", "/", host="Admin.Example.com:8080"))
        assert client.read_response().header("X-Backend") == "admin"


@pytest.mark.parametrize("hash_key, vary", [
    ("uri", lambda i: ("/p?i=%d" % i, {})),
    ("path", lambda i: ("/p%d?same" % i, {})),
    ("header:X-User", lambda i: ("/", {"X-User": "u%d" % i})),
    ("cookie:sid", lambda i: ("/", {"Cookie": "a=1; sid=s%d; b=2" % i})),
    ("query:user", lambda i: ("/x?a=1&user=%d" % i, {})),
])
def test_hash_keys_pin_a_key_to_one_backend(procs, hash_key, vary):
    port, _, _ = start(procs, ("a", "b", "c"), "--algorithm", "ketama", "--hash-key", hash_key)
    by_key = collections.defaultdict(set)
    with Client(port) as client:
        for round_ in range(3):
            for i in range(12):
                target, headers = vary(i)
                by_key[i].add(client.request("GET", target, headers).header("X-Backend"))
    assert all(len(names) == 1 for names in by_key.values()), by_key
    assert len(set().union(*by_key.values())) >= 2


def test_hash_key_source(procs):
    port, _, _ = start(procs, ("a", "b", "c"), "--algorithm", "maglev", "--hash-key", "source")
    names = set()
    for _ in range(6):
        with Client(port) as client:
            names.add(client.request("GET", "/").header("X-Backend"))
    assert len(names) == 1


# ---- retries -----------------------------------------------------------------------------------

def test_connect_failure_goes_to_the_next_backend(procs):
    proc, ports = procs.http_backends("a")
    port = free_port()
    procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{free_port()}",
                 "--backend", f"127.0.0.1:{ports['a']}")
    with Client(port) as client:
        for _ in range(6):
            response = client.request("POST", "/echo", body=b"x")
            assert response.status == 200 and response.header("X-Backend") == "a"


def test_idempotent_request_is_retried_but_post_is_never_replayed(procs):
    port, backend, _ = start(procs, ("a", "b"))
    with Client(port) as client:
        for _ in range(4):
            response = client.request("GET", "/dropif?name=a")
            assert response.status == 200 and response.header("X-Backend") == "b"
    start_line = len(backend.lines)
    statuses = []
    for i in range(4):
        with Client(port) as client:
            statuses.append(client.request("POST", f"/dropif?name=a&i={i}", body=b"pay").status)
    assert statuses.count(502) >= 1 and set(statuses) <= {200, 502}
    posts = [r for r in requests_seen(backend, start_line, at_least=4) if r["method"] == "POST"]
    urls = collections.Counter(r["url"] for r in posts)
    assert all(count == 1 for count in urls.values()), urls       # never sent twice
    assert statuses.count(502) == sum(1 for r in posts if r["backend"] == "a")


# ---- errors, limits, timeouts ------------------------------------------------------------------

def test_503_when_no_backend_is_up(procs):
    port = free_port()
    procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{free_port()}",
                 "--connect-timeout", "1s")
    with Client(port) as client:
        assert client.request("GET", "/").status == 503
        assert client.request("GET", "/").status == 503          # the connection stays usable


def test_502_on_a_bad_backend_response(shared):
    port, _ = shared
    with Client(port) as client:
        assert client.request("GET", "/garbage").status == 502


def test_504_when_the_backend_does_not_answer(procs):
    port, _, _ = start(procs, ("a",), "--response-timeout", "300ms")
    with Client(port) as client:
        response = client.request("GET", "/hang")
        assert response.status == 504
        assert client.request("GET", "/ok").status == 200


def test_408_for_a_slow_request_head(procs):
    port, backend, _ = start(procs, ("a",), "--http-request-timeout", "300ms")
    with Client(port) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: t\r\n")          # never finished: slowloris
        response = client.read_response()
        assert response.status == 408
        assert client.closed()
    assert requests_seen(backend) == []


def test_keepalive_idle_timeout_closes_quietly(procs):
    port, _, _ = start(procs, ("a",), "--keepalive-timeout", "300ms")
    with Client(port) as client:
        assert client.request("GET", "/").status == 200
        assert client.closed(timeout=5)


def test_tunnel_idle_timeout(procs):
    port, _, _ = start(procs, ("a",), "--tunnel-timeout", "300ms")
    with Client(port) as client:
        client.send(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        assert client.read_response().status == 101
        assert client.closed(timeout=5)


@pytest.mark.parametrize("flag, request_bytes, status", [
    (("--max-body-size", "10"), build("POST", "/echo", body=b"x" * 11), 413),
    (("--max-body-size", "10"), b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n", 413),
    (("--max-uri-length", "100"), build("GET", "/" + "u" * 200), 414),
    (("--max-header-size", "1k"), build("GET", "/", {"X-Big": "v" * 2000}), 431),
    (("--max-headers", "5"), build("GET", "/", {f"X-H{i}": "v" for i in range(10)}), 431),
])
def test_limits(procs, flag, request_bytes, status):
    port, backend, _ = start(procs, ("a",), *flag)
    with Client(port) as client:
        client.send(request_bytes)
        assert client.read_response().status == status
        assert client.closed()
    with Client(port) as client:
        assert client.request("GET", "/fine").status == 200
    assert [r["url"] for r in requests_seen(backend, at_least=1)] == ["/fine"]


def test_header_rules_and_via(procs):
    port, backend, _ = start(procs, ("a",), "--request-header-set", "X-Env: prod",
                             "--request-header-delete", "X-Internal", "--response-header-set",
                             "Strict-Transport-Security: max-age=60", "--response-header-delete",
                             "X-Backend", "--via", "edge1")
    with Client(port) as client:
        response = client.request("GET", "/", {"X-Internal": "secret", "X-Env": "forged"})
    assert response.header("Strict-Transport-Security") == "max-age=60"
    assert response.header("X-Backend") is None and response.header("Via") == "1.1 edge1"
    names = {}
    for k, v in requests_seen(backend, at_least=1)[-1]["headers"]:
        names.setdefault(k.lower(), []).append(v)
    assert names["x-env"] == ["prod"] and "x-internal" not in names and names["via"] == ["1.1 edge1"]


def test_sigterm_drains_http(procs):
    """The response in flight ends with Connection: close; when that last connection goes (the engine
    says so from C, the Python path from connection_lost), the worker exits, well within its grace
    period (which would otherwise run out and be logged)."""
    port, _, ports = start(procs, ("a",), "--grace-period", "600s")
    fastlb = procs.started[-1]
    client = Client(port)
    client.send(build("GET", "/slow?ms=500"))
    wait_until(lambda: any("REQ" in line for line in procs.started[0].lines), what="request at backend")
    fastlb.signal(15)
    response = client.read_response()
    assert response.status == 200 and response.header("Connection") == "close"
    assert fastlb.wait_exit(30) == 0
    assert "grace period over" not in fastlb.output
    client.close()


def test_5xx_responses_eject_a_backend_passively(procs):
    port, _, _ = start(procs, ("a", "b"), "--outlier-failures", "2", "--outlier-ejection-time", "30s")
    with Client(port) as client:
        answers = [client.request("GET", "/failif?name=a").header("X-Backend") for _ in range(10)]
    # a answers twice with 500 (the 2 failures that eject it), then only b answers.
    assert answers.count("a") == 2 and answers[-6:] == ["b"] * 6, answers


def test_backend_connection_is_not_reused_after_a_response_not_read_to_its_end(procs):
    port, backend, _ = start(procs, ("a",))
    with Client(port) as client:
        assert client.request("GET", "/first").status == 200
    with Client(port) as client:
        client.send(build("GET", f"/big?n={64 * 1024 * 1024}"))
        assert client.sock.recv(1000).startswith(b"HTTP/1.1 200")
    # The client left mid-body: that backend connection is closed, never handed to the next request.
    with Client(port) as client:
        assert client.request("GET", "/after").status == 200
    seen = requests_seen(backend, at_least=3)
    conns = {r["url"].split("?")[0]: r["conn"] for r in seen}
    assert conns["/first"] == conns["/big"] and conns["/after"] != conns["/big"], conns


def test_two_workers_serve_http(procs):
    port, _, _ = start(procs, ("a", "b"), "--workers", "2")
    names = set()
    for _ in range(8):
        with Client(port) as client:
            response = client.request("GET", "/")
            assert response.status == 200
            names.add(response.header("X-Backend"))
    assert names == {"a", "b"}


def test_408_when_the_client_stops_sending_its_body(procs):
    port, _, _ = start(procs, ("a",), "--response-timeout", "300ms")
    with Client(port) as client:
        client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        assert client.read_response().status == 408
        assert client.closed()
    with Client(port) as client:
        assert client.request("GET", "/ok").status == 200
