"""gRPC through fastlb: grpcio clients on an h2c bind, grpcio servers (tests/grpc_backend.py) as proto=h2
backends (h2c, and TLS with ALPN h2); HTTP/1.1 clients to h2 backends; trailers, grpc-status,
streaming both ways, grpc-timeout, failover after a killed backend; the proto= option's config errors."""
import socket
import struct
import sys
import threading
from pathlib import Path

import pytest

from fastlb.cli import config_from_args
from fastlb.config import ConfigError
from h2_client import H2Client
from pki import CA
from procs import Processes, free_port, replace_file, wait_until
from test_http_engine import engine_counts

grpc = pytest.importorskip("grpc", reason="grpcio not installed (the test extras)")
pytest.importorskip("fastlb.http2._nghttp2", reason="fastlb built without libnghttp2 (libnghttp2-dev)")

GRPC_BACKEND = str(Path(__file__).with_name("grpc_backend.py"))
CALL_TIMEOUT = 10.0


def start_grpc_backend(processes: Processes, name: str, *extra: str) -> tuple[object, int]:
    port = free_port()
    proc = processes.start([sys.executable, GRPC_BACKEND, f"{name}:{port}", *extra], f"grpc-{name}")
    proc.wait_for_line(r"^ready$")
    return proc, port


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    return struct.pack(">BI", 0, len(message)) + message


@pytest.fixture(scope="module", autouse=True)
def on_each_path(http_engine):
    """Every test here runs with the C engine serving the HTTP/2 connections (fastlb/http/_eh2.pxi),
    then with the Python path alone."""
    return http_engine


@pytest.fixture(scope="module")
def balancer(http_engine):
    """fastlb (an h2c-capable plain bind) over two gRPC backends g0, g1 (proto=h2, cleartext)."""
    processes = Processes()
    try:
        backends = dict(start_grpc_backend(processes, name) for name in ("g0", "g1"))
        port, admin = free_port(), free_port()
        args = ["--mode", "http", "--bind", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"]
        for backend_port in backends.values():
            args += ["--backend", f"127.0.0.1:{backend_port},proto=h2"]
        proc = processes.fastlb(*args)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        yield {"port": port, "channel": channel, "proc": proc, "admin": admin, "engine": http_engine}
        channel.close()
    finally:
        processes.cleanup()


def backend_streams(admin: int) -> int | None:
    """Streams the C engine sent to h2 backends itself (fastlb/http/_eh2b.pxi); None: no engine."""
    counts = engine_counts(admin)
    return None if counts is None else counts["h2_backend_streams"]


@pytest.fixture
def served_in_c(balancer):
    """The test's calls reached the h2 backends through the C engine (its counter grew), or, on the
    Python path, no engine ran at all."""
    before = backend_streams(balancer["admin"])
    yield
    after = backend_streams(balancer["admin"])
    if balancer["engine"] == "c":
        assert after > before
    else:
        assert before is None and after is None


def test_unary_calls_spread_over_the_backends_with_metadata_and_trailers(balancer, served_in_c):
    unary = balancer["channel"].unary_unary("/test.Echo/Unary")
    seen = set()
    for i in range(6):
        response, call = unary.with_call(b"m%d" % i, timeout=CALL_TIMEOUT, metadata=(("x-echo", f"e{i}"),))
        backend = dict(call.initial_metadata())["x-backend"]
        assert response == backend.encode() + b":m%d" % i
        assert call.code() == grpc.StatusCode.OK
        trailers = dict(call.trailing_metadata())
        assert trailers["x-trailer"] == backend and trailers["x-echo"] == f"e{i}"
        seen.add(backend)
    assert seen == {"g0", "g1"}                   # balanced per call, not per connection


def test_server_streaming(balancer, served_in_c):
    stream = balancer["channel"].unary_stream("/test.Echo/ServerStream")
    responses = list(stream(b"50", timeout=CALL_TIMEOUT))
    backend = responses[0].split(b":")[0]
    assert responses == [backend + b":%d" % i for i in range(50)]


def test_bidi_streaming_answers_each_message_before_the_next_is_sent(balancer, served_in_c):
    bidi = balancer["channel"].stream_stream("/test.Echo/Bidi")
    sent = []
    answered = threading.Semaphore(0)

    def requests():
        for i in range(5):
            sent.append(i)
            yield b"b%d" % i
            # The next message goes only once this one's answer came back through fastlb: both
            # directions are streamed, neither side's body is held until its end.
            assert answered.acquire(timeout=CALL_TIMEOUT)

    responses = []
    for response in bidi(requests(), timeout=CALL_TIMEOUT):
        responses.append(response)
        answered.release()
    assert [r.split(b":")[1] for r in responses] == [b"b%d" % i for i in range(5)]
    assert sent == list(range(5))


def test_grpc_status_message_and_trailers_of_a_failed_call_arrive_intact(balancer, served_in_c):
    fail = balancer["channel"].unary_unary("/test.Echo/Fail")
    with pytest.raises(grpc.RpcError) as info:
        fail(b"nope", timeout=CALL_TIMEOUT)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "bad: nope"
    assert dict(error.trailing_metadata())["x-why"] == "refused"


def test_grpc_timeout_is_passed_on_and_enforced_by_fastlb(balancer, served_in_c):
    deadline = balancer["channel"].unary_unary("/test.Echo/Deadline")
    remaining = float(deadline(b"", timeout=5.0))
    assert 0 < remaining <= 5.1                 # the backend saw the call's deadline (grpc rounds it up)
    assert float(deadline(b"")) > 1e6           # and none (infinite) without one
    # The backend honours it too: its DEADLINE_EXCEEDED comes back as trailers.
    with pytest.raises(grpc.RpcError) as info:
        balancer["channel"].unary_unary("/test.Echo/Sleep")(b"30", timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def assert_deadline_exceeded_by_fastlb(client, path: str) -> None:
    """A gRPC call on `client` (tests/h2_client.py) with a grpc-timeout of 300 ms that neither side ends:
    fastlb answers DEADLINE_EXCEEDED, Trailers-Only, with its own message."""
    stream_id = client.request("POST", path, headers=[
        ("content-type", "application/grpc"), ("te", "trailers"), ("grpc-timeout", "300m")],
        body=grpc_frame(b"x"))
    response = client.wait([stream_id], timeout=15)[stream_id]
    assert response.status == 200 and response.ended
    assert response.header("grpc-status") == "4"          # DEADLINE_EXCEEDED, Trailers-Only
    assert response.header("grpc-message") == "deadline exceeded in fastlb"


def test_grpc_timeout_is_enforced_by_fastlb():
    """A client that does not enforce its own deadline (a raw HTTP/2 client) and a backend that ignores
    it (HTTP/1.1, answering after 30 s): fastlb ends the call at its grpc-timeout, DEADLINE_EXCEEDED, and
    lets the backend request go."""
    processes = Processes()
    try:
        _, ports = processes.http_backends("slow")
        port = free_port()
        processes.fastlb("--mode", "http", "--bind", f"127.0.0.1:{port}", "--backend",
                         f"127.0.0.1:{ports['slow']}", "--response-timeout", "60s")
        with H2Client(port, timeout=20) as client:
            assert_deadline_exceeded_by_fastlb(client, "/slow?ms=30000")
            assert client.get("/after").status == 200             # the connection still serves
    finally:
        processes.cleanup()


def test_http1_client_reaches_an_h2_backend_and_gets_the_trailers(balancer):
    """An HTTP/1.1 request to a proto=h2 backend goes as a stream; the response's trailers (grpc-status)
    come back in the chunked trailer section."""
    with socket.create_connection(("127.0.0.1", balancer["port"]), timeout=CALL_TIMEOUT) as sock:
        body = grpc_frame(b"h1")
        sock.sendall(b"POST /test.Echo/Unary HTTP/1.1\r\nHost: t\r\nContent-Type: application/grpc\r\n"
                     b"TE: trailers\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        data = b""
        while not data.endswith(b"\r\n\r\n") or b"\r\n0\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    assert b"h1" in rest
    trailer_section = rest[rest.rindex(b"\r\n0\r\n") + 5:]
    assert b"grpc-status: 0\r\n" in trailer_section and b"x-trailer: g" in trailer_section


def test_tls_backend_by_alpn_h2(tmp_path):
    ca = CA(tmp_path, "grpc-ca")
    pem = ca.issue("backend", "grpc.test", ("grpc.test",))
    processes = Processes()
    try:
        _, backend_port = start_grpc_backend(processes, "tls0", "--tls", str(pem.with_suffix(".crt")),
                                             str(pem.with_suffix(".key")))
        port = free_port()
        processes.fastlb("--mode", "http", "--bind", f"127.0.0.1:{port}", "--backend",
                         f"127.0.0.1:{backend_port},proto=h2,ssl,verify={ca.path},sni=grpc.test")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            response, call = channel.unary_unary("/test.Echo/Unary").with_call(b"x", timeout=CALL_TIMEOUT)
        assert response == b"tls0:x" and dict(call.trailing_metadata())["x-trailer"] == "tls0"
    finally:
        processes.cleanup()


def test_a_killed_backend_is_failed_over():
    processes = Processes()
    try:
        backends = {name: start_grpc_backend(processes, name) for name in ("k0", "k1")}
        port = free_port()
        args = ["--mode", "http", "--bind", f"127.0.0.1:{port}"]
        for _, backend_port in backends.values():
            args += ["--backend", f"127.0.0.1:{backend_port},proto=h2"]
        processes.fastlb(*args)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = channel.unary_unary("/test.Echo/Unary")
            assert {unary(b"x", timeout=CALL_TIMEOUT).split(b":")[0] for _ in range(4)} == {b"k0", b"k1"}
            backends["k0"][0].kill()
            wait_until(lambda: _refused(backends["k0"][1]), what="k0 gone")
            # Every next call succeeds, on k1: k0's shared connection is gone, a new one is refused, and
            # the request goes to the other backend (BackendPool.connect's loop).
            answers = [unary(b"y", timeout=CALL_TIMEOUT) for _ in range(10)]
        assert answers == [b"k1:y"] * 10
    finally:
        processes.cleanup()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


# ---- config ----------------------------------------------------------------------------------------

def test_backend_proto_option_is_parsed():
    config = config_from_args(["--mode", "http", "--bind", "127.0.0.1:8", "--backend", "127.0.0.1:9,proto=h2",
                               "--backend", "127.0.0.1:10"])[1]
    assert [b.proto for b in config.backends] == ["h2", "h1"]


def test_a_bad_proto_names_the_field(capsys):
    with pytest.raises(SystemExit):
        config_from_args(["--mode", "http", "--bind", "127.0.0.1:8", "--backend", "127.0.0.1:9,proto=h3"])
    assert "argument --backend: proto: expected h1 or h2 (got 'h3')" in capsys.readouterr().err


def test_proto_in_a_backend_table_names_file_line_and_field(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text('mode = "http"\nbind = "127.0.0.1:8"\n\n[[backend]]\naddress = "127.0.0.1:9"\nproto = "h3"\n')
    with pytest.raises(ConfigError) as info:
        config_from_args(["--config", str(path)])
    assert str(info.value).startswith(f"{path}:6: backend[1].proto: expected h1 or h2")


def test_proto_h2_needs_mode_http():
    with pytest.raises(ConfigError) as info:
        config_from_args(["--mode", "tcp", "--bind", "127.0.0.1:8", "--backend", "127.0.0.1:9,proto=h2"])
    assert "proto=h2" in str(info.value) and "mode 'http'" in str(info.value)


# ---- the gRPC health check -----------------------------------------------------------------------

def test_grpc_health_check_takes_a_not_serving_backend_out_and_back(tmp_path):
    health = tmp_path / "h1-health"
    health.write_text("SERVING")
    processes = Processes()
    try:
        _, serving_port = start_grpc_backend(processes, "h0")
        _, flipping_port = start_grpc_backend(processes, "h1", "--health-file", str(health))
        port = free_port()
        fastlb = processes.fastlb(
            "--mode", "http", "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{serving_port},proto=h2",
            "--backend", f"127.0.0.1:{flipping_port},proto=h2", "--check", "grpc", "--check-interval", "0.2s",
            "--check-timeout", "1s", "--rise", "2", "--fall", "2")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = channel.unary_unary("/test.Echo/Unary")
            assert {unary(b"x", timeout=CALL_TIMEOUT).split(b":")[0] for _ in range(4)} == {b"h0", b"h1"}
            replace_file(health, "NOT_SERVING")
            # "first check failed" when the flip beats the backend's first check (a loaded box).
            fastlb.wait_for_line(rf"backend 127.0.0.1:{flipping_port} DOWN: (2 consecutive check failures|first "
                                 rf"check failed) \(not SERVING\)")
            assert [unary(b"y", timeout=CALL_TIMEOUT) for _ in range(6)] == [b"h0:y"] * 6
            replace_file(health, "SERVING")
            fastlb.wait_for_line(rf"backend 127.0.0.1:{flipping_port} UP: 2 consecutive checks passed")
            assert b"h1:z" in {unary(b"z", timeout=CALL_TIMEOUT) for _ in range(4)}
        assert f"backend 127.0.0.1:{serving_port} DOWN" not in fastlb.output
    finally:
        processes.cleanup()


def test_grpc_health_check_fails_on_a_server_without_the_service(tmp_path):
    """An HTTP/1.1 server (no HTTP/2, no health service) is never taken for a healthy gRPC one."""
    processes = Processes()
    try:
        _, ports = processes.http_backends("plain")
        port = free_port()
        fastlb = processes.fastlb("--mode", "http", "--bind", f"127.0.0.1:{port}", "--backend",
                                  f"127.0.0.1:{ports['plain']}", "--check", "grpc", "--check-interval", "0.2s",
                                  "--check-timeout", "1s")
        fastlb.wait_for_line(rf"backend 127.0.0.1:{ports['plain']} DOWN")
    finally:
        processes.cleanup()


# ---- request trailers --------------------------------------------------------------------------------

def test_request_trailers_of_an_h2_client_reach_an_http1_backend_in_the_chunked_end():
    """An HTTP/2 request with trailers (and no content-length) reaches an HTTP/1.1 backend chunked, its
    trailer fields after the last chunk; fields fastlb acts on (X-Forwarded-For) are not passed on."""
    received = []
    listener = socket.create_server(("127.0.0.1", 0))
    backend_port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n0\r\n" not in data or not data.endswith(b"\r\n\r\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            received.append(data)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    processes = Processes()
    try:
        port = free_port()
        processes.fastlb("--mode", "http", "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{backend_port}")
        with H2Client(port) as client:
            stream_id = client.request("POST", "/upload", body=b"payload", end=False)
            client.conn.send_headers(stream_id, [("x-checksum", "abc123"), ("x-forwarded-for", "6.6.6.6")],
                                     end_stream=True)
            client.flush()
            response = client.wait([stream_id])[stream_id]
        assert response.status == 200 and response.body == b"ok"
        thread.join(10)
        request = received[0]
        head, _, body = request.partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        assert body == b"7\r\npayload\r\n0\r\nx-checksum: abc123\r\n\r\n"
    finally:
        processes.cleanup()
        listener.close()
