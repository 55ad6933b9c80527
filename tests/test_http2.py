"""HTTP/2 clients through fastlb (fastlb/http2/): h2c with prior knowledge on a plain bind, h2 by ALPN on a
TLS bind, each stream a request to the HTTP/1.1 backends (tests/http_backend.py), which log what reached
them."""
import hashlib
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess

import pytest
import re
from hpack import Encoder
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame

from fastlb.http.fast import ENGINE_ENV
from h2_client import H2Client, headers_frame, raw_connection, read_frames, request_block
from http_client import Client, requests_seen
from pki import CA
from procs import Processes, free_port, wait_until

pytest.importorskip("fastlb.http2._nghttp2", reason="fastlb built without libnghttp2 (libnghttp2-dev)")
CURL = shutil.which("curl")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = CA(directory, "test-ca")
    return {"ca": str(ca.path), "cert": str(ca.issue("default", "default.test", ("default.test",)))}


@pytest.fixture(scope="module", autouse=True)
def on_each_path(http_engine):
    """Every test here runs with the C engine serving the HTTP/2 connections (fastlb/http/_eh2.pxi, the
    streams it does not serve handed to the Python path one by one), then with the Python path alone."""
    return http_engine


@pytest.fixture(scope="module")
def balancer(pki, http_engine):
    """fastlb over backends a, b, c: a plain bind and a TLS bind (and the admin port: its counters)."""
    processes = Processes()
    try:
        backend, ports = processes.http_backends("a", "b", "c")
        plain, secure, admin = free_port(), free_port(), free_port()
        args = ["--bind", f"127.0.0.1:{plain}", "--bind", f"127.0.0.1:{secure},ssl,cert={pki['cert']}",
                "--admin", str(admin)]
        for port in ports.values():
            args += ["--backend", f"127.0.0.1:{port}"]
        proc = processes.fastlb(*args, "--max-body-size", "1m")
        yield {"plain": plain, "tls": secure, "admin": admin, "backend": backend, "proc": proc,
               "engine": http_engine}
    finally:
        processes.cleanup()


def tls_context(pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki["ca"])
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def backend_of(response) -> str:
    return response.header("x-backend")


# ---- curl ----------------------------------------------------------------------------------------

@pytest.mark.skipif(CURL is None, reason="curl not installed")
def test_curl_http2_prior_knowledge_on_a_plain_bind(balancer):
    start = len(balancer["backend"].lines)
    # The plain bind is the C engine's (unless the tests run the Python path alone): it reads the preface
    # and serves the connection.
    engine = "python" if os.environ.get(ENGINE_ENV) == "python" else "c"
    balancer["proc"].wait_for_line(rf"127.0.0.1:{balancer['plain']}: HTTP engine {engine}")
    result = subprocess.run([CURL, "-sS", "--http2-prior-knowledge", "-w", "\\n%{http_version} %{http_code}",
                             "-H", "X-Test: prior", f"http://127.0.0.1:{balancer['plain']}/curl?x=1"],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    body, _, versions = result.stdout.rpartition("\n")
    assert versions == "2 200"
    assert body.endswith("GET /curl?x=1\n")
    seen = requests_seen(balancer["backend"], start, at_least=1)[-1]
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["host"] == f"127.0.0.1:{balancer['plain']}" and headers["x-test"] == "prior"
    assert headers["x-forwarded-for"] == "127.0.0.1" and headers["x-forwarded-proto"] == "http"


@pytest.mark.skipif(CURL is None, reason="curl not installed")
def test_curl_http2_over_tls_negotiates_h2_by_alpn(balancer, pki):
    port = balancer["tls"]
    start = len(balancer["backend"].lines)
    result = subprocess.run([CURL, "-sS", "--http2", "--cacert", pki["ca"], "--resolve",
                             f"default.test:{port}:127.0.0.1", "-w", "\\n%{http_version} %{http_code}",
                             "--data-binary", "hello over h2", f"https://default.test:{port}/echo"],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    body, _, versions = result.stdout.rpartition("\n")
    assert versions == "2 200" and body == "hello over h2"
    seen = requests_seen(balancer["backend"], start, at_least=1)[-1]
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-forwarded-proto"] == "https" and seen["method"] == "POST"


@pytest.mark.skipif(CURL is None, reason="curl not installed")
def test_http11_clients_still_served_on_both_binds(balancer, pki):
    with Client(balancer["plain"]) as client:
        assert client.request("GET", "/still-h1").status == 200
    port = balancer["tls"]
    result = subprocess.run([CURL, "-sS", "--http1.1", "--cacert", pki["ca"], "--resolve",
                             f"default.test:{port}:127.0.0.1", "-w", "\\n%{http_version}",
                             f"https://default.test:{port}/h1"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0 and result.stdout.endswith("\n1.1"), result


# ---- many streams on one connection ---------------------------------------------------------------

@pytest.mark.parametrize("secure", [False, True], ids=["h2c", "h2"])
def test_many_concurrent_streams_spread_over_every_backend(balancer, pki, secure):
    port = balancer["tls" if secure else "plain"]
    with H2Client(port, tls_context(pki) if secure else None, "default.test") as client:
        streams = [client.request("GET", f"/stream/{n}") for n in range(60)]
        responses = client.wait(streams)
    assert all(r.status == 200 and r.ended for r in responses.values())
    for stream_id, response in responses.items():
        n = streams.index(stream_id)
        assert response.body.decode().endswith(f"GET /stream/{n}\n")
    by_backend = {backend_of(r) for r in responses.values()}
    assert by_backend == {"a", "b", "c"}            # balanced per request, not per connection


def test_streams_after_ended_ones_carry_nothing_of_them(balancer, pki):
    """The engine serves new streams with the contexts and buffers of ended ones (_eh2.pxi h2_spare, the
    nghttp2 block pool): each response is exactly its own, larger and smaller than the last in turn, and
    each request reaches a backend with its own fields only, X-Forwarded-Proto of its own connection (h2,
    then h2c, then h2 again)."""
    start = len(balancer["backend"].lines)
    sent = []
    for round_number, secure in enumerate([True, False, True]):
        port = balancer["tls" if secure else "plain"]
        with H2Client(port, tls_context(pki) if secure else None, "default.test") as client:
            expected = {}
            for n in range(40):
                tag = f"{round_number}-{n}"
                payload = (tag.encode() + b".") * (700 if n % 3 == 0 else 1)    # ~4 kB, then a few bytes
                if n % 5 == 4:          # a HEAD: no body for it, and its context's next request has one
                    stream_id = client.request("HEAD", f"/echo?tag={tag}", headers=[(f"x-only-{tag}", tag)])
                    payload = b""
                else:
                    stream_id = client.request("POST", f"/echo?tag={tag}", headers=[(f"x-only-{tag}", tag)],
                                               body=payload)
                expected[stream_id] = payload
                sent.append((tag, "https" if secure else "http"))
            responses = client.wait(list(expected))
        for stream_id, payload in expected.items():
            assert responses[stream_id].status == 200 and responses[stream_id].body == payload
    def tagged() -> dict:
        # (the module's balancer's backend also logs other tests' and health requests: only this test's)
        return {request["url"].split("tag=")[1]: request for request in requests_seen(balancer["backend"], start)
                if "tag=" in request["url"]}

    wait_until(lambda: len(tagged()) >= len(sent), what="every tagged request logged by the backend")
    seen = tagged()
    for tag, proto in sent:
        headers = {k.lower(): v for k, v in seen[tag]["headers"]}
        assert [k for k in headers if k.startswith("x-only-")] == [f"x-only-{tag}"]
        assert headers["x-forwarded-proto"] == proto and headers["x-forwarded-for"] == "127.0.0.1"


def engine_metric(admin: int, name: str) -> float | None:
    """A fastlb_http_engine_* counter from /metrics (None: no engine serves)."""
    connection = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    match = re.search(rf"^fastlb_http_engine_{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


@pytest.mark.parametrize("secure", [False, True], ids=["h2c", "h2"])
def test_streams_are_served_by_the_engine_on_its_path(balancer, pki, secure):
    """On the C engine's path the engine serves the connection and its plain streams itself (its
    counters say so: one more HTTP/2 connection, a request per stream, nothing handed over); on the
    Python path alone there is no engine to count."""
    admin = balancer["admin"]
    before = (engine_metric(admin, "h2_connections_total"), engine_metric(admin, "requests_total"))
    port = balancer["tls" if secure else "plain"]
    with H2Client(port, tls_context(pki) if secure else None, "default.test") as client:
        streams = [client.request("GET", f"/counted/{n}") for n in range(20)]
        responses = client.wait(streams)
    assert [responses[s].status for s in streams] == [200] * 20
    after = (engine_metric(admin, "h2_connections_total"), engine_metric(admin, "requests_total"))
    if balancer["engine"] == "python":
        assert before == after == (None, None)
    else:
        assert after[0] == before[0] + 1 and after[1] >= before[1] + 20


def test_request_bodies_with_and_without_content_length(balancer):
    payload = bytes(range(256)) * 1000              # 256 kB: more than a stream window
    with H2Client(balancer["plain"]) as client:
        sized = client.request("POST", "/echo", headers=[("content-length", str(len(payload)))],
                               body=payload[:16384], end=False)
        unsized = client.request("POST", "/echo", body=payload[:16384], end=False)
        for stream_id in (sized, unsized):
            rest = payload[16384:]
            while rest:                             # as the windows allow
                window = min(client.conn.local_flow_control_window(stream_id), 16384)
                if window <= 0:
                    client.receive_once()
                    continue
                client.conn.send_data(stream_id, rest[:window])
                rest = rest[window:]
                client.flush()
            client.conn.end_stream(stream_id)
            client.flush()
        responses = client.wait([sized, unsized])
    for response in responses.values():
        assert response.status == 200 and response.body == payload
        assert response.header("x-body-sha256") == hashlib.sha256(payload).hexdigest()


def test_head_204_and_large_responses(balancer):
    with H2Client(balancer["plain"]) as client:
        head = client.request("HEAD", "/big?n=5000")
        empty = client.request("GET", "/status?code=204")
        # 12 MB: the client sends a WINDOW_UPDATE per DATA frame, ~1500 of them, more than the control
        # frame budget (400): WINDOW_UPDATE is not counted against it.
        big = client.request("GET", "/big?n=12000000")
        responses = client.wait([head, empty, big], timeout=30)
    assert responses[head].status == 200 and responses[head].body == b""
    assert responses[empty].status == 204 and responses[empty].body == b""
    assert responses[big].status == 200 and len(responses[big].body) == 12000000


def test_response_connection_specific_fields_are_not_forwarded(balancer):
    with H2Client(balancer["plain"]) as client:
        response = client.get("/headers")             # Connection: X-Hop, X-Hop, Keep-Alive, X-Keep
    names = {k for k, _ in response.headers}
    assert response.status == 200 and "x-keep" in names
    assert not names & {"connection", "keep-alive", "x-hop", "transfer-encoding"}


# ---- conversions (RFC 9113 section 8) -------------------------------------------------------------

def test_host_naming_another_origin_than_authority_is_refused(balancer):
    start = len(balancer["backend"].lines)
    with H2Client(balancer["plain"], validate=False) as client:
        refused = client.get("/mismatch", authority="a.example", headers=[("host", "b.example")])
        same = client.get("/same", authority="a.example", headers=[("host", "a.example")])
    assert refused.status == 400 and same.status == 200
    paths = [r["url"] for r in requests_seen(balancer["backend"], start, at_least=1)]
    assert "/mismatch" not in paths and "/same" in paths


@pytest.mark.parametrize("fields", [
    [("connection", "close")],                         # connection-specific (RFC 9113 8.2.2)
    [("transfer-encoding", "chunked")],
    [("x-split", "a\r\nx-injected: 1")],                 # CR/LF in a value
    [("x-nul", "a\x00b")],
    [("Upper", "case")],                                 # upper-case name
    [("te", "gzip")],                                    # TE other than trailers
], ids=["connection", "transfer-encoding", "crlf", "nul", "uppercase", "te"])
def test_malformed_requests_are_reset_and_never_reach_a_backend(balancer, fields):
    start = len(balancer["backend"].lines)
    with H2Client(balancer["plain"], validate=False) as client:
        bad = client.request("GET", "/malformed", headers=fields)
        bad_response = client.wait([bad])[bad]
        good = client.get("/after-malformed")          # the connection still serves
    assert bad_response.status == 0 and bad_response.reset is not None
    assert good.status == 200
    paths = [r["url"] for r in requests_seen(balancer["backend"], start, at_least=1)]
    assert "/malformed" not in paths


def test_content_length_not_matching_the_data_is_reset(balancer):
    start = len(balancer["backend"].lines)
    with H2Client(balancer["plain"], validate=False) as client:
        bad = client.request("POST", "/echo?short", headers=[("content-length", "10")], body=b"12345")
        response = client.wait([bad])[bad]
        good = client.get("/after-short")
    assert response.reset is not None and response.status == 0 and good.status == 200
    completed = [r for r in requests_seen(balancer["backend"], start, at_least=1) if r["url"] == "/echo?short"]
    assert completed == []                             # the backend never got a whole request


def test_path_and_method_must_fit_a_request_line(balancer):
    with H2Client(balancer["plain"], validate=False) as client:
        bad = client.request("GET", "/a b HTTP/1.1\r\nx: y")
        relative = client.request("GET", "relative")
        responses = client.wait([bad, relative])
    for response in responses.values():
        assert response.status == 400 or response.reset is not None


def test_access_log_and_limits_apply_per_stream(tmp_path):
    processes = Processes()
    try:
        backend, ports = processes.http_backends("a")
        port = free_port()
        log_path = tmp_path / "access.log"
        processes.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                         "--access-log", str(log_path), "--access-log-format", "json",
                         "--max-body-size", "1k", "--request-header-set", "X-Via-Rule: yes")
        with H2Client(port) as client:
            ok = client.get("/logged")
            large = client.request("POST", "/echo", headers=[("content-length", "5000")], body=b"x" * 5000)
            too_large = client.wait([large])[large]
        assert ok.status == 200 and too_large.status == 413
        seen = requests_seen(backend, 0, at_least=1)
        assert {k.lower(): v for k, v in seen[0]["headers"]}["x-via-rule"] == "yes"
        from procs import wait_until
        wait_until(lambda: log_path.exists() and "/logged" in log_path.read_text(), what="access log line")
        line = next(json.loads(raw) for raw in log_path.read_text().splitlines() if "/logged" in raw)
        assert line["status"] == 200
    finally:
        processes.cleanup()


def test_sticky_sessions_and_retries_apply_per_stream(tmp_path):
    """Features of the Python path: a sticky cookie pins the streams that carry it; a 500 that
    --retry-on names goes to another backend, the client never seeing it."""
    processes = Processes()
    try:
        backend, ports = processes.http_backends("a", "b", "c")
        secret = tmp_path / "cookie.key"
        secret.write_bytes(b"0123456789abcdef0123456789abcdef")
        port = free_port()
        args = ["--bind", f"127.0.0.1:{port}", "--sticky", "cookie:SRV", "--cookie-secret-file", str(secret),
                "--retry-on", "500"]
        for p in ports.values():
            args += ["--backend", f"127.0.0.1:{p}"]
        processes.fastlb(*args)
        with H2Client(port) as client:
            first = client.get("/pin")
            cookie = first.header("set-cookie").split(";")[0]
            pinned = client.wait([client.request("GET", f"/pinned/{n}", headers=[("cookie", cookie)])
                                  for n in range(12)])
            retried = client.wait([client.request("GET", "/failif?name=a") for _ in range(6)])
        assert first.status == 200 and cookie.startswith("SRV=")
        assert {backend_of(r) for r in pinned.values()} == {backend_of(first)}
        assert all(r.status == 200 and backend_of(r) != "a" for r in retried.values())
        assert any(r["url"] == "/failif?name=a" and r["backend"] == "a" for r in requests_seen(backend, 0))
    finally:
        processes.cleanup()


def test_idle_connection_and_draining_end_with_goaway():
    """An HTTP/2 connection idle for --keepalive-timeout gets GOAWAY and is closed; on SIGTERM a
    connection gets GOAWAY (no new stream) while its stream in flight finishes."""
    processes = Processes()
    try:
        backend, ports = processes.http_backends("a")
        port = free_port()
        proc = processes.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                                "--keepalive-timeout", "1s", "--grace-period", "10s")
        with H2Client(port) as idle:
            assert idle.get("/before-idle").status == 200
            while idle.receive_once():                  # until fastlb closes it (bounded by the timeout)
                pass
            assert idle.goaway == 0
        sock = raw_connection(port)
        try:
            sock.sendall(headers_frame(1, request_block(Encoder(), "/slow?ms=1500")))
            backend.wait_for_line(r" /slow\?ms=1500 ")
            proc.signal(signal.SIGTERM)
            # (the h2 package treats GOAWAY as the end: frames are read raw)
            frames = read_frames(sock, lambda frames: any(
                f.stream_id == 1 and "END_STREAM" in f.flags for f in frames if isinstance(f, DataFrame)))
        finally:
            sock.close()
        goaway = [f for f in frames if isinstance(f, GoAwayFrame)]
        assert goaway and goaway[0].error_code == 0 and goaway[0].last_stream_id == 1
        assert frames.index(goaway[0]) < frames.index(next(f for f in frames if isinstance(f, HeadersFrame)))
        assert proc.wait_exit() == 0
    finally:
        processes.cleanup()


def test_h2c_upgrade_is_not_forwarded(balancer):
    """`Upgrade: h2c` (RFC 7540's cleartext upgrade, dropped by RFC 9113) is served as HTTP/1.1: a
    backend that switched would carry HTTP/2 that fastlb never parses (h2c smuggling past its rules)."""
    start = len(balancer["backend"].lines)
    upgrade = {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c", "HTTP2-Settings": "AAMAAABkAAQAAP__"}
    with Client(balancer["plain"]) as client:
        plain = client.request("GET", "/h2c-upgrade", upgrade)
    with Client(balancer["plain"]) as client:
        switched = client.request("GET", "/ws", upgrade)      # this backend path answers 101 to anything
    assert plain.status == 200 and switched.status == 502
    for seen in requests_seen(balancer["backend"], start, at_least=2):
        names = {k.lower() for k, _ in seen["headers"]}
        assert not names & {"upgrade", "http2-settings", "connection"}, seen


def test_rate_limits_and_connections_per_source_count_streams_and_connections():
    """Admission as for HTTP/1.1: each stream is a request for --rate-limit (429 with Retry-After, nothing
    at the backend), and an HTTP/2 connection is one connection for --max-conn-per-source."""
    processes = Processes()
    try:
        backend, ports = processes.http_backends("a")
        port = free_port()
        processes.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                         "--rate-limit", "header:x-key=5/m,burst=5", "--max-conn-per-source", "2")
        with H2Client(port) as client:
            responses = client.wait([client.request("GET", f"/limited/{n}", headers=[("x-key", "k")])
                                     for n in range(8)])
            statuses = sorted(r.status for r in responses.values())
            assert statuses == [200] * 5 + [429] * 3
            assert all(r.header("retry-after") for r in responses.values() if r.status == 429)
            with H2Client(port) as second:
                assert second.get("/second", headers=[("x-key", "other")]).status == 200
                with Client(port) as third:                  # a third connection from 127.0.0.1
                    assert third.request("GET", "/third").status == 429
        assert len([r for r in requests_seen(backend, 0) if r["url"].startswith("/limited/")]) == 5
    finally:
        processes.cleanup()
