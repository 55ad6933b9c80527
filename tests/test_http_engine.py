"""The C engine of HTTP mode (fastlb/http/_fast.pyx): where it serves, that it serves exactly what the
Python path serves, and what only it holds (its own idle backend connections, deadlines, slots).

The main proof is differential: the same requests, byte for byte, to two fastlb processes in front of
identical backends, one with the engine (the default) and one with `FASTLB_HTTP_ENGINE=python`. Clients
must get the same responses and backends the same requests, including for what the engine hands to the
Python path at the request (bodies, pipelining, unusual headers) or at the response (chunked, large,
bodiless, close-delimited, malformed), followed by a plain request on the same connection.
"""
import socket
import subprocess
import textwrap

import pytest

from http_client import Client, build, requests_seen
from procs import Processes, ensure_debian_tool, free_port, wait_until


def start(procs, *extra, names=("a",), engine="c"):
    """Backends NAMES and a fastlb in front of them, with the engine on or off: (port, backends, lb)."""
    backend, ports = procs.http_backends(*names)
    port = free_port()
    args = ["--bind", f"127.0.0.1:{port}", *extra]
    for name in names:
        args += ["--backend", f"127.0.0.1:{ports[name]}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTLB_HTTP_ENGINE", engine)
        lb = procs.fastlb(*args)
    return port, backend, lb


def engine_line(lb) -> str:
    return lb.wait_for_line(r"HTTP engine (c|python.*)$").group(1)


def test_engine_serves_plain_binds_and_steps_aside_when_python_is_needed(procs):
    _, _, lb = start(procs)
    assert engine_line(lb) == "c"
    _, _, lb = start(procs, "--algorithm", "hash", "--hash-key", "uri")
    assert engine_line(lb) == "c"
    _, _, lb = start(procs, "--algorithm", "hash", "--hash-key", "header:X-User")
    assert engine_line(lb) == "python (sticky sessions or captured headers)"
    _, _, lb = start(procs, "--response-header-set", "X-Served-By: fastlb")
    assert engine_line(lb) == "python (response header rules or retried statuses)"
    _, _, lb = start(procs, engine="python")
    assert engine_line(lb) == "python (FASTLB_HTTP_ENGINE=python)"


AFTER = b"GET /after HTTP/1.1\r\nHost: test\r\n\r\n"

# (name, bytes sent, responses to read, HEAD?) -- each followed by AFTER on the same connection when
# the connection is still open.
EXCHANGES = [
    # served by the engine
    ("plain", b"GET /p HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    ("headers as sent", b"GET /h?q=1&r=%20x HTTP/1.1\r\nHost: test:8080\r\nX-A:   spaced value \t \r\n"
                        b"x-empty:\r\nX-Obs: caf\xe9\r\nAccept: */*\r\nuser-AGENT: t/1\r\n\r\n", 1, False),
    ("hop-by-hop and forged", b"GET /hop HTTP/1.1\r\nHost: test\r\nConnection: Keep-Alive\r\nKeep-Alive: 5\r\n"
                              b"TE: trailers\r\nProxy-Connection: x\r\nX-Forwarded-Proto: forged\r\n"
                              b"X-Forwarded-Host: forged\r\nX-Client-Subject: forged\r\n\r\n", 1, False),
    ("delete", b"DELETE /d HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    ("options", b"OPTIONS /o HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    ("connection close", b"GET /c HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n", 1, False),
    ("backend closes", b"GET /close HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    ("server error", b"GET /status?code=503 HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    ("post", b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n"
             b'{"amount": 5}', 1, False),
    ("put", b"PUT /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\n\r\nabc", 1, False),
    ("patch", b"PATCH /echo HTTP/1.1\r\nContent-Length: 003\r\nHost: test\r\n\r\nxyz", 1, False),
    ("get with length 0", b"GET /z HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n", 1, False),
    # handed to the Python path at the request
    ("x-forwarded-for", b"GET /x HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n", 1, False),
    ("connection names a header", b"GET /x HTTP/1.1\r\nHost: test\r\nConnection: keep-alive, X-S\r\n"
                                  b"X-S: 1\r\n\r\n", 1, False),
    ("head", b"HEAD /x HTTP/1.1\r\nHost: test\r\n\r\n", 1, True),
    ("two lengths", b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na", 1,
     False),
    ("signed length", b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: +1\r\n\r\na", 1, False),
    ("body then a request", b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\nabGET /2 HTTP/1.1\r\n"
                            b"Host: test\r\n\r\n", 2, False),
    ("length over the limit", b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000, 1,
     False),
    ("chunked post", b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
     1, False),
    ("http/1.0", b"GET /x HTTP/1.0\r\n\r\n", 1, False),
    ("ipv6 host", b"GET /x HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", 1, False),
    ("absolute form", b"GET http://test/abs HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    ("pipelined", b"GET /1 HTTP/1.1\r\nHost: test\r\n\r\nGET /2 HTTP/1.1\r\nHost: test\r\n\r\n", 2, False),
    ("no host", b"GET /x HTTP/1.1\r\nX-A: 1\r\n\r\n", 1, False),
    ("two hosts", b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 1, False),
    ("bare LF", b"GET /x HTTP/1.1\nHost: test\n\n", 1, False),
    ("smuggling", b"GET /x HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"0\r\n\r\n", 1, False),
    ("obs-fold", b"GET /x HTTP/1.1\r\nHost: test\r\nX-A: 1\r\n 2\r\n\r\n", 1, False),
    ("space before colon", b"GET /x HTTP/1.1\r\nHost : test\r\n\r\n", 1, False),
    ("NUL in a value", b"GET /x HTTP/1.1\r\nHost: test\r\nX-A: a\x00b\r\n\r\n", 1, False),
    ("non-ASCII target", b"GET /caf\xe9 HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    # handed to the Python path at the response
    ("chunked response", b"GET /chunked?n=3 HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    ("large response", b"GET /big?n=300000 HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    ("no content", b"GET /status?code=204 HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    ("not modified", b"GET /status?code=304 HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    ("response hop-by-hop", b"GET /headers HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    ("body until close", b"GET /eof HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    ("bad framing", b"GET /garbage HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
]


def exchange(port: int, data: bytes, count: int, head: bool) -> list:
    """What a client sees: each response's status, headers and body, then AFTER's if still open,
    and whether the connection ended."""
    seen = []
    with Client(port) as client:
        client.send(data)
        try:
            for _ in range(count):
                response = client.read_response(head=head)
                seen.append((response.status, response.headers, response.body))
            if getattr(response, "closed", False) or response.header("Connection") == "close":
                seen.append("closed")
                return seen
            client.send(AFTER)
            response = client.read_response()
            seen.append((response.status, response.headers, response.body))
        except (ConnectionError, TimeoutError) as exc:
            seen.append(type(exc).__name__)
    return seen


def backend_view(backend, start: int, lb_port: int) -> list:
    """The requests a backend got from line `start` on, up to a marker request sent now; the
    balancer's own port (its default Host) written as LB."""
    with Client(lb_port) as client:
        assert client.request("GET", "/marker").status == 200
    wait_until(lambda: any(r["url"] == "/marker" for r in requests_seen(backend, start)), what="the marker")
    seen = requests_seen(backend, start)
    seen = seen[:[r["url"] for r in seen].index("/marker")]
    return [(r["method"], r["url"], r["length"], r["sha"],
             [[name, value.replace(f":{lb_port}", ":LB")] for name, value in r["headers"]])
            for r in seen]


@pytest.mark.parametrize("name,data,count,head", EXCHANGES, ids=[e[0] for e in EXCHANGES])
def test_engine_and_python_path_answer_alike(paired, name, data, count, head):
    (c_port, c_backend), (py_port, py_backend) = paired
    c_start, py_start = len(c_backend.lines), len(py_backend.lines)
    with_engine = exchange(c_port, data, count, head)
    python_only = exchange(py_port, data, count, head)
    assert with_engine == python_only
    # Both backends got the same requests: a marker request, sent last, is logged after all of them.
    assert backend_view(c_backend, c_start, c_port) == backend_view(py_backend, py_start, py_port)


@pytest.fixture(scope="module")
def paired():
    processes = Processes()
    try:
        c_port, c_backend, _ = start(processes, "--response-timeout", "2s", "--max-body-size", "1000")
        py_port, py_backend, _ = start(processes, "--response-timeout", "2s", "--max-body-size", "1000",
                                       engine="python")
        yield (c_port, c_backend), (py_port, py_backend)
    finally:
        processes.cleanup()


def test_engine_reuses_its_backend_connections(procs):
    port, backend, _ = start(procs)
    for _ in range(3):                   # new client connections: the backend connection stays
        with Client(port) as client:
            for i in range(3):
                assert client.request("GET", f"/r{i}").status == 200
    conns = {r["conn"] for r in requests_seen(backend, 0, at_least=9)}
    assert len(conns) == 1


def test_idle_backend_connection_closed_by_the_backend_is_not_used(procs):
    port, backend, _ = start(procs)
    with Client(port) as client:
        assert client.request("GET", "/close").status == 200     # the backend closes after answering
        assert client.request("GET", "/next").status == 200
    seen = requests_seen(backend, 0, at_least=2)
    assert seen[0]["conn"] != seen[1]["conn"]


def established_to(port: int) -> int:
    """TCP connections established to 127.0.0.1:port (ss, from iproute2)."""
    out = subprocess.run(["ss", "-Htn", "state", "established", "dst", f"127.0.0.1:{port}"],
                         capture_output=True, text=True, check=True).stdout
    return len(out.splitlines())


def test_backend_idle_timeout_expires_engine_connections(procs):
    ensure_debian_tool("ss", "iproute2")
    backend, ports = procs.http_backends("a")
    port = free_port()
    procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                 "--backend-idle-timeout", "300ms")
    with Client(port) as client:
        assert client.request("GET", "/1").status == 200
        wait_until(lambda: established_to(ports["a"]) == 0, what="the idle backend connection to expire")
        assert client.request("GET", "/2").status == 200
    first, second = requests_seen(backend, 0, at_least=2)
    assert first["conn"] != second["conn"]


def test_silent_connection_gets_408(procs):
    port, backend, _ = start(procs, "--http-request-timeout", "300ms")
    with Client(port) as client:
        response = client.read_response()       # nothing sent
        assert response.status == 408
        assert client.closed()
    assert requests_seen(backend) == []


def test_client_gone_mid_request_gives_the_slot_back(procs):
    # maxconn=1: a slot the engine kept after its client left would make every later request wait.
    _, ports = procs.http_backends("a")
    port = free_port()
    procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']},maxconn=1",
                 "--queue-timeout", "2s")
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /slow?ms=200 HTTP/1.1\r\nHost: test\r\n\r\n")
        sock.close()
    for i in range(3):
        with Client(port) as client:
            assert client.request("GET", f"/after{i}").status == 200


def test_response_timeout_of_an_engine_request_is_504_then_the_connection_serves_on(procs):
    port, _, _ = start(procs, "--response-timeout", "300ms")
    with Client(port) as client:
        assert client.request("GET", "/warm").status == 200      # an idle backend connection exists
        assert client.request("GET", "/hang").status == 504
        assert client.request("GET", "/ok").status == 200


def test_failed_connects_are_answered_as_the_python_path_answers(procs):
    dead = free_port()                     # nothing listens there: every connect is refused
    ports = []
    for engine in ("c", "python"):
        port = free_port()
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("FASTLB_HTTP_ENGINE", engine)
            procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{dead}")
        ports.append(port)
    seen = []
    for port in ports:
        with Client(port) as client:
            first = client.request("GET", "/a")
            second = client.request("GET", "/b", {"Connection": "close"})
            seen.append((first.status, first.headers, second.status, second.headers, client.closed()))
    assert seen[0] == seen[1]
    assert seen[0][0] == 503 and seen[0][4]


@pytest.mark.parametrize("hash_key", ["uri", "path", "source"])
def test_hashing_keys_pick_as_the_python_path_picks(procs, hash_key):
    picks = []
    for engine in ("c", "python"):
        port, _, _ = start(procs, "--algorithm", "hash", "--hash-key", hash_key, names=("a", "b", "c"),
                           engine=engine)
        with Client(port) as client:
            picks.append([client.request("GET", f"/item/{i}?page={i % 3}").header("X-Backend")
                          for i in range(30)])
    assert picks[0] == picks[1]
    assert len(set(picks[0])) == (1 if hash_key == "source" else 3)


ROUTED = """\
    default_pool = "web"
    [[bind]]
    address = "127.0.0.1:{port}"
    [[pool]]
    name = "web"
    backend = ["127.0.0.1:{web}"]
    [[pool]]
    name = "api"
    backend = ["127.0.0.1:{api}", "127.0.0.1:{api2}"]
    algorithm = "hash"
    hash_key = "path"
    max_body_size = "10"
    [[pool]]
    name = "admin"
    backend = ["127.0.0.1:{admin}"]
    [[pool]]
    name = "posts"
    backend = ["127.0.0.1:{posts}"]
    [[route]]
    pool = "admin"
    host = "admin.example.com"
    [[route]]
    pool = "posts"
    method = "POST"
    path_prefix = "/api/"
    [[route]]
    pool = "api"
    path_prefix = "/api/"
    [[route]]
    pool = "admin"
    path_regex = "\\\\.(png|jpg)$"
    """


def test_routing_rules_are_served_by_the_engine_as_by_the_python_path(procs, tmp_path):
    seen = []
    for engine in ("c", "python"):
        backend, ports = procs.http_backends("web", "api", "api2", "admin", "posts")
        port = free_port()
        path = tmp_path / f"{engine}.toml"
        path.write_text(textwrap.dedent(ROUTED.format(port=port, **ports)))
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("FASTLB_HTTP_ENGINE", engine)
            lb = procs.fastlb("--config", str(path), wait_port=port)
        assert engine_line(lb) == ("c" if engine == "c" else "python (FASTLB_HTTP_ENGINE=python)")
        answers = []
        with Client(port) as client:
            for i in range(8):
                answers.append(client.request("GET", f"/api/item{i}?q=1").header("X-Backend"))
            answers.append(client.request("POST", "/api/pay", {}, b"{}").header("X-Backend"))
            answers.append(client.request("GET", "/a/b.png").header("X-Backend"))
            client.send(build("GET", "/", host="Admin.Example.com:8080"))
            answers.append(client.read_response().header("X-Backend"))
            answers.append(client.request("GET", "/home").header("X-Backend"))
            answers.append(client.request("PUT", "/api/x", {}, b"x" * 11).status)      # over api's limit: 413
        seen.append(answers)
    assert seen[0] == seen[1]
    assert seen[0][8:] == ["posts", "admin", "admin", "web", 413]
    assert set(seen[0][:8]) == {"api", "api2"}
