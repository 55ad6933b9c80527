"""The C engine of HTTP mode (fastlb/http/_fast.pyx): where it serves, that it serves exactly what the
Python path serves, and what only it holds (its own idle backend connections, deadlines, slots).

The main proof is differential: the same requests, byte for byte, to two fastlb processes in front of
identical backends, one with the engine (the default) and one with `FASTLB_HTTP_ENGINE=python`. Clients
must get the same responses and backends the same requests, including for what the engine hands to the
Python path at the request (bodies, pipelining, unusual headers) or at the response (chunked, large,
bodiless, close-delimited, malformed), followed by a plain request on the same connection.
"""
import collections
import http.client
import json
import re
import socket
import ssl
import subprocess
import textwrap
import time
import types

import pytest

from http_client import Client, TLSClient, build, requests_seen
from pki import CA
from procs import Processes, ensure_debian_tool, free_port, wait_until
from stores import start_redis


def start(procs, *extra, names=("a",), engine="c", bind_options=""):
    """Backends NAMES and a fastlb in front of them, with the engine on or off: (port, backends, lb).
    bind_options: appended to the bind (`ssl,cert=...`)."""
    backend, ports = procs.http_backends(*names)
    port = free_port()
    args = ["--bind", f"127.0.0.1:{port}" + (f",{bind_options}" if bind_options else ""), *extra]
    for name in names:
        args += ["--backend", f"127.0.0.1:{ports[name]}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTLB_HTTP_ENGINE", engine)
        lb = procs.fastlb(*args)
    return port, backend, lb


COOKIE_SECRET = "0123456789abcdef-engine-test-secret"


def engine_line(lb) -> str:
    return lb.wait_for_line(r"HTTP engine (c|python.*)$").group(1)


def test_engine_serves_plain_binds_and_steps_aside_when_python_is_needed(procs, tmp_path):
    _, _, lb = start(procs)
    assert engine_line(lb) == "c"
    _, _, lb = start(procs, "--algorithm", "hash", "--hash-key", "uri")
    assert engine_line(lb) == "c"
    _, _, lb = start(procs, "--algorithm", "hash", "--hash-key", "header:X-User")
    assert engine_line(lb) == "c"
    (tmp_path / "secret").write_text(COOKIE_SECRET)
    _, _, lb = start(procs, "--sticky", "cookie:SRV,indirect,nocache", "--cookie-secret-file",
                     str(tmp_path / "secret"))
    assert engine_line(lb) == "c"
    assert lb.wait_for_line(r"HTTP engine hands to the Python path: (.*)$").group(1) == (
        "responses with set-cookie (a sticky rule reads them); requests repeating a header a hashing key "
        "or sticky rule reads, or a Cookie header over 4096 bytes")
    _, _, lb = start(procs, "--response-header-set", "X-Served-By: fastlb", "--response-header-delete", "Server",
                     "--request-header-set", "X-Env: prod", "--via", "lb")
    assert engine_line(lb) == "c"
    _, _, lb = start(procs, "--access-log", "-", "--access-log-format", "json")
    assert engine_line(lb) == "c"
    _, _, lb = start(procs, "--retry-on", "503,502")
    assert engine_line(lb) == "c"
    assert lb.wait_for_line(r"HTTP engine hands to the Python path: (.*)$").group(1) == (
        "responses with a --retry-on status (502, 503) to a request that may be sent again")
    _, _, lb = start(procs, "--request-header-delete", "X-User", "--algorithm", "hash", "--hash-key",
                     "header:X-User", "--sticky", "source")
    assert engine_line(lb) == "python (a hashing key or sticky rule on a header fastlb sets or removes)"
    _, _, lb = start(procs, engine="python")
    assert engine_line(lb) == "python (FASTLB_HTTP_ENGINE=python)"


AFTER = b"GET /after HTTP/1.1\r\nHost: test\r\n\r\n"

# (name, bytes sent, responses to read, HEAD?) -- each followed by AFTER on the same connection when
# the connection is still open. By where the engine serves them (its counters say so: engine_counts).
SERVED_IN_C = [
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
    # A body longer than one read: the engine relays the rest as it comes (relay_body).
    ("large response", b"GET /big?n=300000 HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
]
HANDED_AT_REQUEST = [
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
]
HANDED_AT_RESPONSE = [
    ("chunked response", b"GET /chunked?n=3 HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    ("no content", b"GET /status?code=204 HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    ("not modified", b"GET /status?code=304 HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    ("response hop-by-hop", b"GET /headers HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    ("body until close", b"GET /eof HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    ("bad framing", b"GET /garbage HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
]
EXCHANGES = SERVED_IN_C + HANDED_AT_REQUEST + HANDED_AT_RESPONSE


def exchange(port: int, data: bytes, count: int, head: bool, connect=Client) -> list:
    """What a client sees: each response's status, headers and body, then AFTER's if still open,
    and whether the connection ended. connect(port): the client connection (plain or TLS)."""
    seen = []
    with connect(port) as client:
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


def backend_view(backend, start: int, lb_port: int, connect=Client) -> list:
    """The requests a backend got from line `start` on, up to a marker request sent now; the
    balancer's own port (its default Host) written as LB."""
    with connect(lb_port) as client:
        assert client.request("GET", "/marker").status == 200
    wait_until(lambda: any(r["url"] == "/marker" for r in requests_seen(backend, start)), what="the marker")
    seen = requests_seen(backend, start)
    seen = seen[:[r["url"] for r in seen].index("/marker")]
    return [(r["method"], r["url"], r["length"], r["sha"],
             [[name, value.replace(f":{lb_port}", ":LB")] for name, value in r["headers"]])
            for r in seen]


def engine_counts(admin: int) -> dict | None:
    """The engine's counters: /stats.json's "engine" (fastlb/http/fast.py FastPath.counts); None where
    the engine serves no bind."""
    status, data = admin_get(admin, "/stats.json")
    assert status == 200
    return json.loads(data).get("engine")


def engine_work(admin: int, run):
    """run()'s result, with what the engine did meanwhile by its counters: (result, requests it served
    in C, {reason: connections it handed to the Python path})."""
    before = engine_counts(admin)
    result = run()
    if before is None:
        return result, None, None              # (the Python path alone)
    after = engine_counts(admin)
    handed = {reason: count - before["handed_over"][reason]
              for reason, count in after["handed_over"].items() if count != before["handed_over"][reason]}
    return result, after["requests"] - before["requests"], handed


def expected_engine_work(name: str, seen: list) -> tuple[int, dict]:
    """What the engine must have done for the EXCHANGES entry `name` whose client saw `seen`: served
    each response itself, or handed the connection over (at the request or at the response) and
    served none of them."""
    if any(name == entry[0] for entry in SERVED_IN_C):
        return sum(isinstance(item, tuple) for item in seen), {}
    return 0, {"request" if any(name == entry[0] for entry in HANDED_AT_REQUEST) else "response": 1}


@pytest.mark.parametrize("name,data,count,head", EXCHANGES, ids=[e[0] for e in EXCHANGES])
def test_engine_and_python_path_answer_alike(paired, name, data, count, head):
    (c_port, c_backend, c_admin), (py_port, py_backend) = paired
    c_start, py_start = len(c_backend.lines), len(py_backend.lines)
    with_engine, served, handed = engine_work(c_admin, lambda: exchange(c_port, data, count, head))
    python_only = exchange(py_port, data, count, head)
    assert with_engine == python_only
    assert (served, handed) == expected_engine_work(name, with_engine)
    # Both backends got the same requests: a marker request, sent last, is logged after all of them.
    assert backend_view(c_backend, c_start, c_port) == backend_view(py_backend, py_start, py_port)


@pytest.fixture(scope="module")
def paired():
    processes = Processes()
    try:
        c_admin = free_port()
        c_port, c_backend, _ = start(processes, "--response-timeout", "2s", "--max-body-size", "1000",
                                     "--admin", str(c_admin))
        py_port, py_backend, _ = start(processes, "--response-timeout", "2s", "--max-body-size", "1000",
                                       engine="python")
        yield (c_port, c_backend, c_admin), (py_port, py_backend)
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


CHUNKED_POST = (b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\n\r\n")        # chunked: always the Python path's


def test_engine_and_python_path_share_one_idle_pool(procs):
    """A connection the Python path finished with serves the engine's next request, and the other way
    round: one idle pool per backend, not one per path."""
    port, backend, _ = start(procs)
    with Client(port) as client:
        client.send(CHUNKED_POST)
        assert client.read_response().status == 200
    with Client(port) as client:
        assert client.request("GET", "/engine").status == 200
    with Client(port) as client:
        client.send(CHUNKED_POST)
        assert client.read_response().status == 200
    seen = requests_seen(backend, 0, at_least=3)
    assert [r["method"] for r in seen] == ["POST", "GET", "POST"]
    assert len({r["conn"] for r in seen}) == 1


def test_backend_max_idle_bounds_both_paths_together(procs):
    ensure_debian_tool("ss", "iproute2")
    backend, ports = procs.http_backends("a")
    port = free_port()
    procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}", "--backend-max-idle", "1",
                 "--backend-idle-timeout", "60s")
    # Two requests in flight at once (one each way), so two backend connections; both end idle.
    python_side, engine_side = Client(port), Client(port)
    with python_side, engine_side:
        python_side.send(b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
        engine_side.send(b"GET /slow?ms=300 HTTP/1.1\r\nHost: test\r\n\r\n")
        wait_until(lambda: len(requests_seen(backend, 0)) >= 1, what="the slow request at the backend")
        python_side.send(b"3\r\nabc\r\n0\r\n\r\n")
        assert python_side.read_response().status == 200
        assert engine_side.read_response().status == 200
    assert len({r["conn"] for r in requests_seen(backend, 0, at_least=2)}) == 2
    wait_until(lambda: established_to(ports["a"]) == 1, what="one idle connection kept, not one per path")


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


def test_failed_connects_are_answered_and_logged_as_the_python_path_does(procs, tmp_path):
    dead = free_port()                     # nothing listens there: every connect is refused
    ports, logs = [], []
    for engine in ("c", "python"):
        port = free_port()
        logs.append(tmp_path / f"{engine}.log")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("FASTLB_HTTP_ENGINE", engine)
            procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{dead}",
                         "--access-log", str(logs[-1]), "--access-log-format", "json")
        ports.append(port)
    seen = []
    for port in ports:
        with Client(port) as client:
            first = client.request("GET", "/a")
            second = client.request("GET", "/b", {"Connection": "close"})
            seen.append((first.status, first.headers, second.status, second.headers, client.closed()))
    assert seen[0] == seen[1]
    assert seen[0][0] == 503 and seen[0][4]
    logged = [wait_until(lambda: (lambda lines: lines if len(lines) == 2 else None)(
        path.read_text().splitlines() if path.exists() else []), what=f"two lines in {path.name}")
        for path in logs]
    assert [[comparable(line, "json") for line in lines] for lines in logged][0] == \
        [[comparable(line, "json") for line in lines] for lines in logged][1]
    assert [json.loads(line)["status"] for line in logged[0]] == [503, 503]
    assert [json.loads(line)["target"] for line in logged[0]] == ["/a", "/b"]


# Values of the header, cookie and query keys as clients spell them (quoted, encoded, repeated...), then
# requests without a key (absent, or empty where RoutePool.key says none), which pick at random.
KEYED_HEADERS = ([{"X-User": f"user-{i}"} for i in range(12)] + [{"X-User": ""}, {"X-User": " spaced "}],
                 [{}])
KEYED_COOKIES = ([{"Cookie": f"a=1; uid={i}; b=2"} for i in range(12)]
                 + [{"Cookie": 'uid="7"'}, {"Cookie": "xuid=3; uid=4"}, {"Cookie": "uid=5;uid=6"},
                    {"Cookie": "  uid=8  ;"}, {"Cookie": "a=1; uid= 9"}],
                 [{}, {"Cookie": "uid="}, {"Cookie": "a=1"}, {"Cookie": "uid = 4"}])
KEYED_QUERIES = ([f"/q?u=user-{i}&x=1" for i in range(12)]
                 + ["/q?x=1&u=a+b", "/q?%75=enc", "/q?u=%41%4", "/q?u=1#frag", "/q?uu=1&u=2", "/q?x&u=%2B+"],
                 ["/q", "/q?u=", "/q?u#x", "/q?#u=1"])


def keyless_count(hash_key: str) -> int:
    """The requests without a key test_hashing_keys_pick_as_the_python_path_picks sends."""
    keyed = {"header": KEYED_HEADERS, "cookie": KEYED_COOKIES, "query": KEYED_QUERIES}.get(hash_key.partition(":")[0])
    return len(keyed[1]) if keyed else 0


@pytest.mark.parametrize("hash_key", ["uri", "path", "source", "header:X-User", "cookie:uid", "query:u"])
def test_hashing_keys_pick_as_the_python_path_picks(procs, hash_key):
    picks = []
    admin = free_port()
    for engine in ("c", "python"):
        port, _, lb = start(procs, "--algorithm", "hash", "--hash-key", hash_key, "--admin", str(admin),
                            names=("a", "b", "c"), engine=engine)
        assert engine_line(lb) == ("c" if engine == "c" else "python (FASTLB_HTTP_ENGINE=python)")
        if engine == "c":
            before = engine_counts(admin)
        with Client(port) as client:
            kind = hash_key.partition(":")[0]
            if kind in ("header", "cookie"):
                keyed, keyless = KEYED_HEADERS if kind == "header" else KEYED_COOKIES
                picks.append([client.request("GET", "/h", headers).header("X-Backend") for headers in keyed * 2])
                assert all(client.request("GET", "/h", headers).status == 200 for headers in keyless)
            elif kind == "query":
                keyed, keyless = KEYED_QUERIES
                picks.append([client.request("GET", url).header("X-Backend") for url in keyed * 2])
                assert all(client.request("GET", url).status == 200 for url in keyless)
            else:
                picks.append([client.request("GET", f"/item/{i}?page={i % 3}").header("X-Backend")
                              for i in range(30)])
        if engine == "c":
            # Every request, keyed or not, was the engine's (one connection: a hand-over would have
            # left all the rest to the Python path).
            after = engine_counts(admin)
            assert after["requests"] - before["requests"] == len(picks[0]) + keyless_count(hash_key)
            assert after["handed_over"] == before["handed_over"]
        lb.kill()
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


# ---- features the engine serves: the access log, header rules, connection counts ----------------------

FEATURES = ("--request-header-set", "X-Env: prod", "--request-header-delete", "Accept",
            "--response-header-set", "X-Frame-Options: DENY", "--response-header-delete", "X-Backend",
            "--via", "lb-test", "--response-timeout", "2s", "--max-body-size", "1000")


@pytest.fixture(scope="module", params=["text", "json"])
def featured(request, tmp_path_factory):
    """Two fastlb (engine on, engine off) with an access log in the format of the param and header rules:
    ((port, backend, log path), (port, backend, log path), format)."""
    processes = Processes()
    directory = tmp_path_factory.mktemp("featured")
    try:
        pair = []
        for engine in ("c", "python"):
            path = directory / f"{engine}-{request.param}.log"
            port, backend, lb = start(processes, *FEATURES, "--access-log", str(path),
                                      "--access-log-format", request.param, engine=engine)
            assert engine_line(lb) == ("c" if engine == "c" else "python (FASTLB_HTTP_ENGINE=python)")
            pair.append((port, backend, path))
        yield pair[0], pair[1], request.param
    finally:
        processes.cleanup()


def log_lines(path, start: int) -> list[str]:
    """The lines from line `start` up to the marker request's (backend_view sends it last), waited for."""
    def through_marker():
        lines = path.read_text().splitlines()[start:] if path.exists() else []
        return lines if any("/marker" in line for line in lines) else None
    lines = wait_until(through_marker, what=f"the marker request in {path.name}")
    return lines[:next(i for i, line in enumerate(lines) if "/marker" in line)]


def comparable(line: str, fmt: str) -> list:
    """A log line less what differs between two runs: the time, the timings and the backend's port."""
    if fmt == "json":
        entry = json.loads(line)
        for key in ("time", "connect_ms", "total_ms"):
            assert key in entry
            entry[key] = None
        entry["backend"] = entry["backend"].rsplit(":", 1)[0]
        return sorted(entry.items())
    fields = line.split(" ")
    fields[0] = fields[7] = fields[8] = None
    fields[3] = fields[3].rsplit(":", 1)[0]
    return fields


@pytest.mark.parametrize("name,data,count,head", EXCHANGES, ids=[e[0] for e in EXCHANGES])
def test_engine_and_python_path_log_and_rewrite_alike(featured, name, data, count, head):
    """With an access log and header rules: the same answers, the same requests at the backends, the
    same access-log lines (less times and timings)."""
    (c_port, c_backend, c_log), (py_port, py_backend, py_log), fmt = featured
    c_start, py_start = len(c_backend.lines), len(py_backend.lines)
    c_lines = len(c_log.read_text().splitlines()) if c_log.exists() else 0
    py_lines = len(py_log.read_text().splitlines()) if py_log.exists() else 0
    with_engine = exchange(c_port, data, count, head)
    python_only = exchange(py_port, data, count, head)
    assert with_engine == python_only
    if with_engine and isinstance(with_engine[0], tuple) and with_engine[0][0] == 200:
        headers = dict(with_engine[0][1])
        assert headers.get("X-Frame-Options") == "DENY" and "X-Backend" not in headers
    assert backend_view(c_backend, c_start, c_port) == backend_view(py_backend, py_start, py_port)
    c_logged = [comparable(line, fmt) for line in log_lines(c_log, c_lines)]
    py_logged = [comparable(line, fmt) for line in log_lines(py_log, py_lines)]
    assert c_logged == py_logged
    assert len(c_logged) >= count


def test_engine_rewrites_headers_as_configured(procs):
    port, backend, lb = start(procs, *FEATURES)
    assert engine_line(lb) == "c"
    start_line = len(backend.lines)
    with Client(port) as client:
        response = client.request("GET", "/x", {"Accept": "*/*", "Via": "1.1 forged", "X-Keep": "1"})
    assert response.status == 200
    assert response.header("X-Frame-Options") == "DENY" and response.header("Via") == "1.1 lb-test"
    assert response.header("X-Backend") is None
    wait_until(lambda: requests_seen(backend, start_line), what="the request at the backend")
    headers = dict((name.lower(), value) for name, value in requests_seen(backend, start_line)[0]["headers"])
    assert headers["x-env"] == "prod" and headers["via"] == "1.1 lb-test" and headers["x-keep"] == "1"
    assert "accept" not in headers


@pytest.mark.parametrize("engine", ["c", "python"])
def test_client_connections_are_counted_in_metrics(procs, engine):
    admin = free_port()
    port, _, lb = start(procs, "--admin", str(admin), engine=engine)
    assert engine_line(lb) == ("c" if engine == "c" else "python (FASTLB_HTTP_ENGINE=python)")
    connections = 5
    held = []
    for _ in range(connections):
        client = Client(port).__enter__()
        assert client.request("GET", "/x").status == 200
        held.append(client)

    def sample(name):
        status, data = admin_get(admin, "/metrics")
        assert status == 200
        found = re.search(rf"^{name} (\S+)$", data.decode(), re.M)
        return float(found.group(1)) if found else None

    try:
        # The probe connection procs.fastlb made to see the port open counts too.
        wait_until(lambda: sample("fastlb_client_connections") == connections, what="open connections")
        assert sample("fastlb_client_connections_accepted_total") == connections + 1
        stats = json.loads(admin_get(admin, "/stats.json")[1])
        assert stats["clients"] == {"open": connections, "accepted": connections + 1}
    finally:
        for client in held:
            client.__exit__(None, None, None)
    wait_until(lambda: sample("fastlb_client_connections") == 0, what="connections closed")


def admin_get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# ---- TLS binds: the engine terminates TLS (fastlb/http/_etls.pxi) -----------------------------------

@pytest.fixture(scope="module")
def tls_pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca, client_ca, rogue_ca = CA(directory, "test-ca"), CA(directory, "client-ca"), CA(directory, "rogue-ca")
    return {"ca": str(ca.path), "client_ca": str(client_ca.path),
            "server": str(ca.issue("server", "lb.test", ("lb.test",))),
            "other": str(ca.issue("other", "other.test", ("other.test",))),
            "alice": str(client_ca.issue("alice", "alice", client=True, organization="Payments, Inc")),
            "mallory": str(rogue_ca.issue("mallory", "mallory", client=True))}


def tls_connector(pki, cert=None, server_name="lb.test", maximum=None):
    """connect(port) for exchange(): a TLS client verifying the balancer, offering `cert` if given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki["ca"])
    if cert is not None:
        context.load_cert_chain(pki[cert])
    if maximum is not None:
        context.maximum_version = maximum
    return lambda port: TLSClient(port, context, server_name)


def tls_bind(pki, verify="optional"):
    return f"ssl,cert={pki['server']},cert={pki['other']},ca={pki['client_ca']},verify={verify}"


@pytest.fixture(scope="module")
def tls_paired(tls_pki):
    processes = Processes()
    try:
        c_admin = free_port()
        c_port, c_backend, c_lb = start(processes, "--response-timeout", "2s", "--max-body-size", "1000",
                                        "--admin", str(c_admin), bind_options=tls_bind(tls_pki))
        assert engine_line(c_lb) == "c"
        py_port, py_backend, py_lb = start(processes, "--response-timeout", "2s", "--max-body-size", "1000",
                                           engine="python", bind_options=tls_bind(tls_pki))
        assert engine_line(py_lb) == "python (FASTLB_HTTP_ENGINE=python)"
        yield (c_port, c_backend, c_admin), (py_port, py_backend)
    finally:
        processes.cleanup()


@pytest.mark.parametrize("cert", [None, "alice"], ids=["no client certificate", "client certificate"])
@pytest.mark.parametrize("name,data,count,head", EXCHANGES, ids=[e[0] for e in EXCHANGES])
def test_engine_and_python_path_answer_alike_over_tls(tls_paired, tls_pki, cert, name, data, count, head):
    """The differential test on an mTLS bind (verify=optional): what the engine serves in C and what it
    hands to the Python path over its tunnel, with and without a client certificate (the backends see
    the same X-Client-Subject and X-Forwarded-Proto: https)."""
    (c_port, c_backend, c_admin), (py_port, py_backend) = tls_paired
    connect = tls_connector(tls_pki, cert)
    c_start, py_start = len(c_backend.lines), len(py_backend.lines)
    with_engine, served, handed = engine_work(c_admin, lambda: exchange(c_port, data, count, head, connect))
    python_only = exchange(py_port, data, count, head, connect)
    assert with_engine == python_only
    assert (served, handed) == expected_engine_work(name, with_engine)
    c_view = backend_view(c_backend, c_start, c_port, connect)
    assert c_view == backend_view(py_backend, py_start, py_port, connect)
    subjects = [value for _, _, _, _, headers in c_view for key, value in headers if key == "X-Client-Subject"]
    assert subjects == ([r"CN=alice,O=Payments\, Inc"] * len(c_view) if cert else [])


def test_engine_serves_tls_binds_with_sni_alpn_and_resumption_on_any_worker(procs, tls_pki):
    port, _, lb = start(procs, "--workers", "2", bind_options=tls_bind(tls_pki))
    wait_until(lambda: len([l for l in lb.lines if "HTTP engine c" in l]) == 2, what="both workers' engines")
    for server_name, expected in (("lb.test", "lb.test"), ("other.test", "other.test")):
        with tls_connector(tls_pki, server_name=server_name)(port) as client:
            assert dict(client.sock.getpeercert()["subject"][-1])["commonName"] == expected
            assert client.request("GET", "/x").status == 200
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(tls_pki["ca"])
    context.set_alpn_protocols(["http/1.1"])
    context.maximum_version = ssl.TLSVersion.TLSv1_2      # the session is usable right after the handshake
    with TLSClient(port, context, "lb.test") as client:
        assert client.sock.selected_alpn_protocol() == "http/1.1"
        assert client.request("GET", "/first").status == 200
        session = client.sock.session
    unknown = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    unknown.load_verify_locations(tls_pki["ca"])
    unknown.set_alpn_protocols(["spdy/3.1"])
    with TLSClient(port, unknown, "lb.test") as client:      # nothing in common: no ALPN, not a failure
        assert client.sock.selected_alpn_protocol() is None
        assert client.request("GET", "/no-alpn").status == 200
    # Each connection lands on either worker: 12 resumptions in a row would fail with probability
    # 1 - 2^-12 if only the worker that issued the ticket could read it.
    for _ in range(12):
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with context.wrap_socket(raw, server_hostname="lb.test", session=session) as sock:
            assert sock.session_reused
            sock.sendall(b"GET /again HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("engine", ["c", "python"])
def test_failed_and_silent_tls_handshakes_are_closed_and_the_bind_serves_on(procs, tls_pki, engine):
    admin = free_port()
    port, _, lb = start(procs, "--connect-timeout", "1s", "--admin", str(admin), engine=engine,
                        bind_options=tls_bind(tls_pki, "required"))
    assert engine_line(lb) == ("c" if engine == "c" else "python (FASTLB_HTTP_ENGINE=python)")
    before = engine_counts(admin)
    # A certificate from another CA, and none where one is required: refused within the handshake (TLS
    # 1.2, where the client learns it then; a TLS 1.3 client learns it at its first read).
    for cert in ("mallory", None):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with tls_connector(tls_pki, cert, maximum=ssl.TLSVersion.TLSv1_2)(port) as client:
                client.request("GET", "/refused")
    # Not a word: closed once the handshake timeout (the connect timeout) is over.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        assert raw.recv(1) == b""
    # Plain HTTP on the TLS port: a handshake failure, closed.
    with Client(port) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert client.closed()
    with tls_connector(tls_pki, "alice")(port) as client:
        response = client.request("GET", "/served")
        assert response.status == 200 and response.body == b"a GET /served\n"
    if engine == "c":                   # the four above, counted (/stats.json, fastlb_http_engine_*)
        after = engine_counts(admin)
        assert after["tls_handshake_failures"] - before["tls_handshake_failures"] == 4
        assert after["requests"] - before["requests"] == 1


HSTS_EXCHANGES = SERVED_IN_C + [
    ("backend's own", b"GET /hsts HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
    ("chunked", b"GET /chunked?n=2 HTTP/1.1\r\nHost: test\r\n\r\n", 1, False),
]


def test_engine_serves_hsts_on_tls_binds_as_the_python_path(procs, tls_pki):
    """--hsts on a TLS bind: the engine adds the pool's Strict-Transport-Security line (replacing a
    backend's own) on what it serves, and the answers are the Python path's, byte for byte."""
    admin = free_port()
    c_port, _, c_lb = start(procs, "--hsts", "60", "--admin", str(admin), bind_options=tls_bind(tls_pki))
    assert engine_line(c_lb) == "c"
    py_port, _, py_lb = start(procs, "--hsts", "60", engine="python", bind_options=tls_bind(tls_pki))
    assert engine_line(py_lb) == "python (FASTLB_HTTP_ENGINE=python)"
    connect = tls_connector(tls_pki)
    for name, data, count, head in HSTS_EXCHANGES:
        with_engine, served, handed = engine_work(admin, lambda: exchange(c_port, data, count, head, connect))
        assert with_engine == exchange(py_port, data, count, head, connect), name
        answers = [item for item in with_engine if isinstance(item, tuple)]
        assert all([value for key, value in headers if key == "Strict-Transport-Security"] == ["max-age=60"]
                   for _, headers, _ in answers), name
        if name == "chunked":             # not plain: the Python path's from there on, HSTS and all
            assert (served, handed) == (0, {"response": 1})
        else:
            assert (served, handed) == (len(answers), {}), name


def test_tls_connections_the_python_path_serves_go_through_the_engines_tunnel(procs, tls_pki):
    """An upgrade and a large body over TLS: the engine hands them over and relays the decrypted bytes
    both ways (more than a socket buffer each way, so the tunnel's waits on either side are crossed)."""
    port, _, lb = start(procs, bind_options=tls_bind(tls_pki))
    assert engine_line(lb) == "c"
    connect = tls_connector(tls_pki, "alice")
    body = bytes(range(256)) * 1024                       # 256 KiB
    with connect(port) as client:
        response = client.request("POST", "/echo", body=body)
        assert response.status == 200 and response.body == body
        assert client.request("GET", "/after").body == b"a GET /after\n"
    with connect(port) as client:
        client.send(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nearly")
        response = client.read_response()
        assert response.status == 101 and response.header("Upgrade") == "websocket"
        received = client.leftover
        client.send(body)
        while len(received) < len(b"early") + len(body):
            chunk = client.sock.recv(65536)
            assert chunk, "closed mid-echo"
            received += chunk
        assert received == b"early" + body


@pytest.mark.parametrize("h2_engine", ["1", "0"])
def test_h2_clients_of_a_tls_bind_are_served_by_the_engine_or_the_http2_path(procs, tls_pki, monkeypatch,
                                                                             h2_engine):
    """The engine's TLS binds offer h2 first (config h2 = true): a client choosing it is served by the
    engine's HTTP/2 (fastlb/http/_eh2.pxi), or with FASTLB_H2_ENGINE=0 handed, right after its handshake,
    to fastlb/http2 over the engine's TLS tunnel; either way its streams are balanced per request with
    the client-subject and X-Forwarded-* lines of HTTP/1.1; HTTP/1.1 clients stay the engine's."""
    pytest.importorskip("fastlb.http2._nghttp2", reason="fastlb built without libnghttp2 (libnghttp2-dev)")
    from h2_client import H2Client
    monkeypatch.setenv("FASTLB_H2_ENGINE", h2_engine)
    admin = free_port()
    port, backend, lb = start(procs, "--admin", str(admin), names=("a", "b"), bind_options=tls_bind(tls_pki))
    assert engine_line(lb) == "c"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(tls_pki["ca"])
    context.load_cert_chain(tls_pki["alice"])
    context.set_alpn_protocols(["h2", "http/1.1"])
    start_line = len(backend.lines)

    def over_h2():
        with H2Client(port, context, "lb.test") as client:       # (asserts ALPN chose h2)
            streams = [client.request("GET", f"/h2/{n}") for n in range(8)]
            streams.append(client.request("POST", "/echo", body=b"over h2 via the tunnel"))
            return client.wait(streams), streams
    (responses, streams), served, handed = engine_work(admin, over_h2)
    assert (served, handed) == ((9, {}) if h2_engine == "1" else (0, {"h2": 1}))
    assert [responses[s].status for s in streams] == [200] * 9
    assert responses[streams[-1]].body == b"over h2 via the tunnel"
    assert {responses[s].header("x-backend") for s in streams[:8]} == {"a", "b"}
    seen = requests_seen(backend, start_line, at_least=9)
    for request in seen:
        headers = dict((name.lower(), value) for name, value in request["headers"])
        assert headers["x-client-subject"] == r"CN=alice,O=Payments\, Inc"
        assert headers["x-forwarded-proto"] == "https" and headers["x-forwarded-for"] == "127.0.0.1"
    # HTTP/1.1 on the same bind: served in C.
    def over_http11():
        with tls_connector(tls_pki, "alice")(port) as client:
            return client.request("GET", "/h1")
    response, served, handed = engine_work(admin, over_http11)
    assert response.status == 200 and (served, handed) == (1, {})
    metrics = admin_get(admin, "/metrics")[1].decode()
    if h2_engine == "1":
        assert "fastlb_http_engine_h2_connections_total 1.0" in metrics
    else:
        assert 'fastlb_http_engine_handed_over_total{reason="h2"} 1.0' in metrics
    assert re.search(r"^fastlb_http_engine_requests_total [1-9]", metrics, re.M)
    # The port probe procs.fastlb made closed without a handshake: counted as a failed one.
    failures = re.search(r"^fastlb_http_engine_tls_handshake_failures_total (\S+)$", metrics, re.M).group(1)
    assert float(failures) == engine_counts(admin)["tls_handshake_failures"] >= 1


@pytest.mark.parametrize("engine", ["c", "python"])
def test_connections_per_source_are_checked_after_the_tls_handshake(procs, tls_pki, engine):
    """As on the Python path (admission in connection_made, after uvloop's handshake): a connection over
    the per-source limit completes its handshake and reads its 429 over TLS."""
    port, _, lb = start(procs, "--max-conn-per-source", "2", engine=engine, bind_options=tls_bind(tls_pki))
    assert engine_line(lb) == ("c" if engine == "c" else "python (FASTLB_HTTP_ENGINE=python)")
    connect = tls_connector(tls_pki)
    held = [connect(port) for _ in range(2)]
    try:
        assert [client.request("GET", "/held").status for client in held] == [200, 200]
        with connect(port) as third:
            third.send(build("GET", "/third"))
            response = third.read_response()
            assert response.status == 429 and response.header("Connection") == "close" and third.closed()
        held.pop().close()

        def one_more_served():
            with connect(port) as client:
                client.send(build("GET", "/again"))
                try:
                    return client.read_response().status == 200
                except ConnectionError:
                    return False
        wait_until(one_more_served, what="a connection after one closed")
    finally:
        for client in held:
            client.close()


# ---- sticky sessions: the same pins, cookies and requests at the backends on both paths ---------------

NamedBackend = collections.namedtuple("NamedBackend", "address")      # all Sticky reads of a backend


def insert_cookie(port: int, name: str, first: int, last: int, backend: str = "a") -> str:
    """A signed insert cookie (fastlb/sticky.py's own) naming test backend `backend` of the default
    pool, with the session's first and last seen times."""
    from fastlb.sticky import Sticky, SessionStore
    from fastlb.config import parse_sticky
    pool = types.SimpleNamespace(backends=[NamedBackend(f"127.0.0.1:{port}")])
    sticky = Sticky(parse_sticky(f"cookie:{name}"), "default", pool, SessionStore(None, 60.0, 10),
                    COOKIE_SECRET.encode(), clock=lambda: last)
    return sticky.make_cookie(pool.backends[0], first).decode()


def learned_store_key(session: bytes) -> bytes:
    from fastlb.sticky import SessionStore
    return SessionStore.store_key(b"default:learn:JSESSIONID", session)


def sticky_steps(ports: dict) -> list:
    """(request bytes, client source) exchanges; a step may be a callable run before the next one."""
    now = int(time.time())
    good = insert_cookie(ports["b"], "SRV", now - 60, now - 30)
    idle = insert_cookie(ports["b"], "SRV", now - 7200, now - 3600)              # maxidle=30m passed
    old = insert_cookie(ports["b"], "SRV", now - 10 * 3600, now - 60)            # maxlife=8h passed
    forged = good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB")
    other_pool = insert_cookie(ports["b"] + 1, "SRV", now - 60, now - 30)       # not a backend of ours

    def get(path, cookie=None, source="127.0.0.1", extra=""):
        head = f"GET {path} HTTP/1.1\r\nHost: test\r\n"
        if cookie is not None:
            head += f"Cookie: {cookie}\r\n"
        return (head + extra + "\r\n").encode(), source
    return [
        get("/s1"), get("/s2"), get("/s3"),
        get("/good", f"SRV={good}"), get("/good-among", f"a=1; SRV={good}; b=2"), get("/good", f"SRV={good}"),
        get("/idle", f"SRV={idle}"), get("/old", f"SRV={old}"), get("/forged", f"SRV={forged}"),
        get("/garbage", "SRV=x.y"), get("/unknown-backend", f"SRV={other_pool}"), get("/empty", ""),
        get("/two-cookie-headers", f"SRV={good}", extra="Cookie: z=1\r\n"),
        get("/prefix", f"JSESSIONID={good.split('.')[0]}~app-1; x=2"), get("/prefix-bad", "JSESSIONID=nope~1"),
        get("/setcookie?name=JSESSIONID&value=learned-1"), get("/learned", "JSESSIONID=learned-1"),
        get("/learned", "a=b; JSESSIONID=learned-1"), get("/in-store", "JSESSIONID=stored-1"),
        get("/unknown-id", "JSESSIONID=nobody-knows"), get("/unknown-id", "JSESSIONID=nobody-knows"),
        get("/setcookie?name=SRV&value=from-backend"),
        get("/hdr", extra="X-Session: h-1\r\n"), get("/hdr-empty", extra="X-Session: \r\n"),
        get("/src", source="127.0.0.2"), get("/src", source="127.0.0.3"), get("/src", source="127.0.0.2"),
        get("/src", source="127.0.0.4"), get("/src", source="127.0.0.3"),
    ]


def comparable_response(seen: list) -> list:
    """An exchange's answers less the times inside insert cookies (first and last seen, signature)."""
    out = []
    for item in seen:
        if isinstance(item, tuple):
            status, headers, body = item
            headers = [(name, re.sub(r"^(SRV=[^.;]+)\.[0-9a-f]+\.[0-9a-f]+\.[^;]+", r"\1.TIMES", value)
                        if name.lower() == "set-cookie" else value) for name, value in headers]
            item = (status, headers, body)
        out.append(item)
    return out


STICKY_RULES = {
    "insert": ("--sticky", "cookie:SRV,indirect,nocache,maxidle=30m,maxlife=8h"),
    "insert-resent": ("--sticky", "cookie:SRV,httponly,maxidle=30m,maxlife=8h"),
    "prefix": ("--sticky", "prefix:JSESSIONID"),
    "source": ("--sticky", "source"),
    "learn-redis": ("--sticky", "learn:JSESSIONID", "--store", "redis://{redis}"),
    "learn-store-down": ("--sticky", "learn:JSESSIONID", "--store", "redis://{down}"),
    "learn-header": ("--sticky", "learn:header:X-Session"),
    "source-redis": ("--sticky", "source", "--store", "redis://{redis}"),
}


def expected_sticky_work(rule: str, steps: list) -> list:
    """(requests the engine served, its hand-overs by reason) for each of sticky_steps' exchanges (a
    request, then another on the same connection): all in C but what the start log's "HTTP engine hands
    to the Python path" names for the rule, and a backend's response the engine never forwards."""
    reads_cookie = rule.startswith(("insert", "prefix", "learn-redis", "learn-store-down"))
    reads_set_cookie = reads_cookie and rule != "insert-resent"       # (insert without indirect does not)
    expected = []
    for data, _ in steps:
        path = data.split(b" ")[1]
        if path == b"/garbage":                                      # the backend's bad framing
            expected.append((0, {"response": 1}))
        elif path == b"/two-cookie-headers" and reads_cookie:        # a repeated header the rule reads
            expected.append((0, {"request": 1}))
        elif path.startswith(b"/setcookie") and reads_set_cookie:    # a backend Set-Cookie the rule reads
            expected.append((0, {"response": 1}))
        else:
            expected.append((2, {}))
    return expected


@pytest.mark.parametrize("rule", list(STICKY_RULES))
def test_sticky_sessions_served_alike(procs, tmp_path, rule):
    """Each sticky rule, engine on and off in front of the same backends (so the same backend ids):
    the same answers (less cookie times), the same requests at the backends, the same access-log
    lines, for good, idle, old, forged and foreign cookies, learned ids in the local table, in the
    store, in neither, and a store that is down; and the engine served each in C but what the rule
    hands over by design (its counters, exchange by exchange)."""
    backend, ports = procs.http_backends("a", "b", "c")
    redis_port = None
    if "{redis}" in " ".join(STICKY_RULES[rule]):
        _, redis_port = start_redis(procs, str(tmp_path))
    down_port = free_port()                                      # nothing listens there
    (tmp_path / "secret").write_text(COOKIE_SECRET)
    flags = [flag.format(redis=f"127.0.0.1:{redis_port}", down=f"127.0.0.1:{down_port}")
             for flag in STICKY_RULES[rule]]
    results = []
    steps = sticky_steps(ports)
    admin = free_port()
    for engine in ("c", "python"):
        port = free_port()
        log = tmp_path / f"{engine}.log"
        args = ["--bind", f"127.0.0.1:{port}", "--cookie-secret-file", str(tmp_path / "secret"),
                "--access-log", str(log), "--admin", str(admin), *flags]
        for name in ("a", "b", "c"):
            args += ["--backend", f"127.0.0.1:{ports[name]}"]
        if redis_port is not None:
            # The store as another balancer left it: one session it learned, nothing of the other run.
            import redis
            from fastlb.sticky import backend_id
            with redis.Redis(host="127.0.0.1", port=redis_port) as client:
                client.flushall()
                client.set(learned_store_key(b"stored-1"),
                           backend_id(COOKIE_SECRET.encode(), "default", f"127.0.0.1:{ports['c']}"))
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("FASTLB_HTTP_ENGINE", engine)
            lb = procs.fastlb(*args)
        assert engine_line(lb) == ("c" if engine == "c" else "python (FASTLB_HTTP_ENGINE=python)")
        start_line = len(backend.lines)
        work = [engine_work(admin, lambda data=data, source=source: exchange(
                    port, data, 1, False, lambda p: Client(p, source=source))) for data, source in steps]
        answers = [comparable_response(seen) for seen, _, _ in work]
        if engine == "c":
            engine_did = [(served, handed) for _, served, handed in work]
        at_backends = backend_view(backend, start_line, port)
        logged = [comparable(line, "text") for line in log_lines(log, 0)]
        results.append((answers, at_backends, logged))
        lb.kill()
    for (c_part, py_part, what) in zip(results[0], results[1], ("answers", "backend requests", "log")):
        assert c_part == py_part, what
    backends = [dict(answer[0][1]).get("X-Backend") for answer in results[0][0]]
    # Round robin without a pin; source: the first pick of 127.0.0.1 holds.
    assert len(set(backends[:3])) == (1 if rule.startswith("source") else 3)
    if rule.startswith("insert"):
        assert backends[3:6] == ["b", "b", "b"]              # the cookie pins b
    if rule == "prefix":
        assert backends[13] == "b"                           # b~app-1
    if rule == "learn-redis":
        assert backends[18] == "c"                           # the store's mapping, fetched on a miss
    if rule.startswith("learn") and rule != "learn-header":
        assert backends[16] == backends[17] == backends[15]  # the id learned from the backend's Set-Cookie
    assert engine_did == expected_sticky_work(rule, steps)


RETRIED = [
    b"GET /status?code=503 HTTP/1.1\r\nHost: test\r\n\r\n",                       # sent again, then answered
    b"POST /status?code=503 HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\nab",  # never sent twice
    b"DELETE /status?code=503 HTTP/1.1\r\nHost: test\r\n\r\n",
    b"GET /status?code=500 HTTP/1.1\r\nHost: test\r\n\r\n",                       # not a --retry-on status
    b"GET /status?code=502 HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
]


@pytest.mark.parametrize("retries", ["1", "0"])
def test_retried_statuses_alike(procs, tmp_path, retries):
    """--retry-on statuses, engine on and off in front of the same backends: the same answers, the same
    requests at the backends (how many times each was sent), the same access-log lines."""
    backend, ports = procs.http_backends("a", "b", "c")
    results = []
    admin = free_port()
    for engine in ("c", "python"):
        port = free_port()
        log = tmp_path / f"{engine}.log"
        args = ["--bind", f"127.0.0.1:{port}", "--retry-on", "503,502", "--retries", retries,
                "--access-log", str(log), "--admin", str(admin)]
        for name in ("a", "b", "c"):
            args += ["--backend", f"127.0.0.1:{ports[name]}"]
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("FASTLB_HTTP_ENGINE", engine)
            lb = procs.fastlb(*args)
        assert engine_line(lb) == ("c" if engine == "c" else "python (FASTLB_HTTP_ENGINE=python)")
        start_line = len(backend.lines)
        work = [engine_work(admin, lambda data=data: exchange(port, data, 1, False)) for data in RETRIED]
        answers = [seen for seen, _, _ in work]
        if engine == "c":
            engine_did = [(served, handed) for _, served, handed in work]
        results.append((answers, backend_view(backend, start_line, port),
                        [comparable(line, "text") for line in log_lines(log, 0)]))
        lb.kill()
    for (c_part, py_part, what) in zip(results[0], results[1], ("answers", "backend requests", "log")):
        assert c_part == py_part, what
    sent = [request[:2] for request in results[0][1]]
    assert sent.count(("GET", "/status?code=503")) == int(retries) + 1
    assert sent.count(("POST", "/status?code=503")) == 1
    # The engine served each answer (and the request after it) itself, but for a --retry-on status with a
    # retry left for a request that may be sent again: that response went to the Python path, which
    # retried (the connection then stayed the Python path's).
    retried = {"retry_status": 1}
    after_each = [2, 2, 2, 2, 1]                          # the last asked to close
    assert engine_did == ([(0, retried), (2, {}), (0, retried), (2, {}), (0, retried)] if retries == "1"
                          else [(n, {}) for n in after_each])
