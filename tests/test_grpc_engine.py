"""gRPC through the C engine's HTTP/2 to backends (fastlb/http/_eh2b.pxi): many concurrent calls spread
over two proto=h2 backends on few backend connections, a backend's SETTINGS_MAX_CONCURRENT_STREAMS
honoured (a new connection when one is full), a client's streams bounded by --h2-max-concurrent-streams,
a backend stream that never answers ended by --response-timeout, a stream the backend refused sent to
another, one it may have processed never sent again. Each asserts by the engine's counter
(h2_backend_streams) that the engine, not the Python path, sent the calls."""
import socket
import threading

import pytest

from h2_client import H2Client, headers_frame, raw_connection, read_frames, request_block
from procs import Processes, free_port, wait_until
from test_grpc import (CALL_TIMEOUT, assert_deadline_exceeded_by_fastlb, backend_streams, grpc_frame,
                       start_grpc_backend)

grpc = pytest.importorskip("grpc", reason="grpcio not installed (the test extras)")
pytest.importorskip("fastlb.http2._nghttp2", reason="fastlb built without libnghttp2 (libnghttp2-dev)")
import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.errors  # noqa: E402
import h2.events  # noqa: E402
from hpack import Encoder  # noqa: E402
from hyperframe.frame import PingFrame, RstStreamFrame  # noqa: E402

CONCURRENT_CALLS = 200
ESTABLISHED = "01"                    # /proc/net/tcp's state of an established connection


def connections_to(port: int) -> int:
    """Established TCP connections to 127.0.0.1:port from any local socket (fastlb's to a backend)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == ESTABLISHED and int(fields[2].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def start_balancer(processes: Processes, backend_ports, *extra: str) -> tuple[int, int]:
    port, admin = free_port(), free_port()
    args = ["--mode", "http", "--bind", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--workers", "1",
            *extra]
    for backend_port in backend_ports:
        args += ["--backend", f"127.0.0.1:{backend_port},proto=h2"]
    processes.fastlb(*args)
    return port, admin


@pytest.fixture
def processes(monkeypatch):
    monkeypatch.setenv("FASTLB_HTTP_ENGINE", "c")
    processes = Processes()
    yield processes
    processes.cleanup()


def test_many_concurrent_calls_spread_over_two_backends_on_few_connections(processes):
    backends = dict(start_grpc_backend(processes, name) for name in ("m0", "m1"))
    port, admin = start_balancer(processes, backends.values())
    before = backend_streams(admin)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        calls = [unary.future(b"c%d" % i, timeout=CALL_TIMEOUT) for i in range(CONCURRENT_CALLS)]
        answers = [call.result() for call in calls]
    assert [answer.split(b":")[1] for answer in answers] == [b"c%d" % i for i in range(CONCURRENT_CALLS)]
    assert {answer.split(b":")[0] for answer in answers} == {b"m0", b"m1"}
    assert backend_streams(admin) - before == CONCURRENT_CALLS
    # Multiplexed: grpcio announces no stream limit, so one connection per backend carries them all.
    assert [connections_to(backend_port) for backend_port in backends.values()] == [1, 1]


def test_a_backend_stream_limit_opens_another_connection(processes):
    """A backend announcing SETTINGS_MAX_CONCURRENT_STREAMS 4: 12 slow calls at once need 3 connections
    to it (a full connection takes no more), and every call is answered."""
    _, backend_port = start_grpc_backend(processes, "s0", "--max-streams", "4")
    port, admin = start_balancer(processes, [backend_port])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        sleep = channel.unary_unary("/test.Echo/Sleep")
        sleep(b"0", timeout=CALL_TIMEOUT)              # the first connection, its SETTINGS read
        calls = [sleep.future(b"1", timeout=CALL_TIMEOUT) for _ in range(12)]
        wait_until(lambda: connections_to(backend_port) >= 3, what="three connections to the backend")
        assert [call.result() for call in calls] == [b"s0:slept"] * 12
    assert backend_streams(admin) == 13


def test_a_clients_streams_are_bounded_by_h2_max_concurrent_streams(processes):
    """A client opening 50 calls at once with --h2-max-concurrent-streams 10 (before it has read the
    SETTINGS that say so): 10 go to the backend, the other 40 are refused (REFUSED_STREAM) unsent."""
    _, backend_port = start_grpc_backend(processes, "b0")
    port, admin = start_balancer(processes, [backend_port], "--h2-max-concurrent-streams", "10")
    encoder = Encoder()
    sock = raw_connection(port)
    try:
        block = [("content-type", "application/grpc"), ("te", "trailers")]
        sock.sendall(b"".join(headers_frame(2 * n + 1, request_block(encoder, "/test.Echo/Sleep", block),
                                            flags=("END_HEADERS",)) for n in range(50)))
        frames = read_frames(sock, lambda frames: sum(isinstance(f, RstStreamFrame) for f in frames) >= 40)
        sock.sendall(PingFrame(0, opaque_data=b"lastping").serialize())
        frames += read_frames(sock, lambda frames: any(isinstance(f, PingFrame) and "ACK" in f.flags
                                                       for f in frames))
        refused = [f for f in frames if isinstance(f, RstStreamFrame)]
        assert len(refused) == 40 and {f.error_code for f in refused} == {h2.errors.ErrorCodes.REFUSED_STREAM}
        wait_until(lambda: backend_streams(admin) == 10, what="the 10 streams sent to the backend")
    finally:
        sock.close()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:     # and fastlb still serves
        assert channel.unary_unary("/test.Echo/Unary")(b"after", timeout=CALL_TIMEOUT) == b"b0:after"


def test_a_backend_stream_that_never_answers_ends_by_the_response_timeout(processes):
    """A call the backend sits on (30 s) with --response-timeout 1s: a gRPC client gets UNAVAILABLE
    (grpc-status 14, Trailers-Only), another one a 504; the connection keeps serving."""
    _, backend_port = start_grpc_backend(processes, "t0")
    port, admin = start_balancer(processes, [backend_port], "--response-timeout", "1s")
    with H2Client(port, timeout=20) as client:
        grpc_call = client.request("POST", "/test.Echo/Sleep", headers=[
            ("content-type", "application/grpc"), ("te", "trailers")], body=grpc_frame(b"30"))
        plain_call = client.request("POST", "/test.Echo/Sleep", headers=[("te", "trailers")],
                                    body=grpc_frame(b"30"))
        responses = client.wait([grpc_call, plain_call], timeout=15)
        assert responses[grpc_call].status == 200 and responses[grpc_call].ended
        assert responses[grpc_call].header("grpc-status") == "14"
        assert responses[plain_call].status == 504 and responses[plain_call].ended
        quick = client.request("POST", "/test.Echo/Unary", headers=[
            ("content-type", "application/grpc"), ("te", "trailers")], body=grpc_frame(b"q"))
        response = client.wait([quick], timeout=10)[quick]
        assert response.status == 200 and b"t0:q" in response.body
        assert dict(response.trailers)["grpc-status"] == "0"
    assert backend_streams(admin) == 3


class FailingBackend:
    """An h2c backend (the `h2` package, a thread of the test) that fails every request it is sent:
    `refuse` resets each stream REFUSED_STREAM, `goaway` says GOAWAY below it and closes (not processed
    either way: it may go to another backend), `drop` closes the connection once a request arrived, and
    `goaway_kept` says GOAWAY at its stream and closes (maybe processed: it must never be sent again), `hang`
    never answers (and counts the streams fastlb resets)."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.requests = 0
        self.resets = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        with sock:
            sock.sendall(conn.data_to_send())
            while data := sock.recv(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        self.requests += 1
                        if self.how == "drop":
                            return
                        if self.how == "refuse":
                            conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                        elif self.how in ("goaway", "goaway_kept"):
                            kept = event.stream_id if self.how == "goaway_kept" else event.stream_id - 2
                            conn.close_connection(last_stream_id=max(0, kept))
                            sock.sendall(conn.data_to_send())
                            return
                    elif isinstance(event, h2.events.StreamReset):
                        self.resets += 1
                sock.sendall(conn.data_to_send())

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("how", ["refuse", "goaway"])
def test_a_refused_stream_goes_to_another_backend(processes, how):
    refuser = FailingBackend(how)
    try:
        _, good_port = start_grpc_backend(processes, "ok")
        port, admin = start_balancer(processes, [refuser.port, good_port])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = channel.unary_unary("/test.Echo/Unary")
            answers = [unary(b"r%d" % i, timeout=CALL_TIMEOUT) for i in range(6)]
        assert answers == [b"ok:r%d" % i for i in range(6)]
        assert refuser.requests >= 1                 # the balancer did send it some, each refused
        assert backend_streams(admin) == 6
    finally:
        refuser.close()


@pytest.mark.parametrize("how", ["drop", "goaway_kept"])
def test_a_stream_maybe_processed_is_never_sent_again(processes, how):
    """The backend's connection closes after a request reached it (with a GOAWAY that keeps its stream,
    or without a word): the call fails UNAVAILABLE, and the request is not sent again (to it or any
    other), whatever --retries allows."""
    dropper = FailingBackend(how)
    try:
        port, admin = start_balancer(processes, [dropper.port], "--retries", "3")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary("/test.Echo/Unary")(b"once", timeout=CALL_TIMEOUT)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dropper.requests == 1
        assert backend_streams(admin) == 1
    finally:
        dropper.close()


def test_grpc_timeout_is_enforced_on_a_stream_to_an_h2_backend(processes):
    """A raw client that does not enforce its own deadline, a backend that ignores it and never answers:
    fastlb answers DEADLINE_EXCEEDED at the call's grpc-timeout (Trailers-Only), cancels the backend
    stream, and the connection keeps serving."""
    hanger = FailingBackend("hang")
    try:
        port, admin = start_balancer(processes, [hanger.port], "--response-timeout", "2s")
        with H2Client(port, timeout=20) as client:
            assert_deadline_exceeded_by_fastlb(client, "/test.Echo/Sleep")
            wait_until(lambda: hanger.resets == 1, what="the backend stream cancelled")
            assert client.get("/again").status == 504     # the connection still serves (its timeout)
        assert hanger.requests == 2 and backend_streams(admin) == 2
    finally:
        hanger.close()
