"""Trailers and interim (1xx) responses across fastlb's HTTP/2 path, for each backend framing: an HTTP/1.1
backend's chunked body with trailers, its content-length body (which has no room for trailers), a proto=h2
backend's content-length body followed by trailers; 103 Early Hints from either kind of backend and
fastlb's own 100 Continue, seen by an `h2` client as HEADERS before the final response."""
import socket

import pytest

from h2_backend import EARLY_HINTS_LINK, H2Backend
from h2_client import H2Client
from procs import Processes, free_port, wait_until

pytest.importorskip("fastlb.http2._nghttp2", reason="fastlb built without libnghttp2 (libnghttp2-dev)")

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def balancers():
    """fastlb over an HTTP/1.1 backend (t1) and fastlb over an HTTP/2 backend (proto=h2), plain binds
    (h2c with prior knowledge and HTTP/1.1 both)."""
    processes = Processes()
    h2_backend = H2Backend()
    try:
        _, ports = processes.http_backends("t1")
        h1_port, h2_port = free_port(), free_port()
        processes.fastlb("--mode", "http", "--bind", f"127.0.0.1:{h1_port}", "--backend", f"127.0.0.1:{ports['t1']}")
        processes.fastlb("--mode", "http", "--bind", f"127.0.0.1:{h2_port}", "--backend",
                         f"127.0.0.1:{h2_backend.port},proto=h2")
        yield {"h1": h1_port, "h2": h2_port, "h2_backend": h2_backend}
    finally:
        processes.cleanup()
        h2_backend.close()


def http11_exchange(port: int, path: str) -> tuple[bytes, bytes]:
    """One HTTP/1.1 GET (Connection: close, TE: trailers): the response's head and the rest as sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET %b HTTP/1.1\r\nHost: t\r\nTE: trailers\r\nConnection: close\r\n\r\n" % path.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


# ---- trailers ------------------------------------------------------------------------------------------

def test_chunked_trailers_of_an_http1_backend_reach_an_h2_client(balancers):
    with H2Client(balancers["h1"]) as client:
        response = client.get("/trailers")
    assert response.status == 200 and response.ended and response.body == b"hello"
    trailers = dict(response.trailers)
    assert trailers["x-checksum"] == "t1-sum" and trailers["grpc-status"] == "0"
    assert response.header("transfer-encoding") is None


def test_chunked_trailers_of_an_http1_backend_reach_an_http1_client(balancers):
    head, rest = http11_exchange(balancers["h1"], "/trailers")
    assert b"transfer-encoding: chunked" in head.lower()
    assert rest == b"5\r\nhello\r\n0\r\nX-Checksum: t1-sum\r\ngrpc-status: 0\r\n\r\n"


def test_a_content_length_body_of_an_http1_backend_keeps_its_length_and_has_no_trailers(balancers):
    """HTTP/1.1 has no room for trailers after a content-length body: there are none to pass, and the
    h2 client gets the length."""
    with H2Client(balancers["h1"]) as client:
        response = client.get("/plain")
    assert response.status == 200 and response.ended and response.trailers == []
    assert int(response.header("content-length")) == len(response.body) > 0


def test_trailers_after_a_content_length_body_of_an_h2_backend_reach_an_h2_client(balancers):
    """HTTP/2 allows trailers after any body: the response reaches the HTTP/2 client with them (its
    content-length is not kept: the body goes through fastlb re-framed, chunked)."""
    with H2Client(balancers["h2"]) as client:
        response = client.get("/trailers")
    assert response.status == 200 and response.ended and response.body == b"hello"
    assert dict(response.trailers) == {"x-checksum": "h2-sum", "grpc-status": "0"}


def test_an_http1_client_gets_an_h2_backend_content_length_body_with_its_length(balancers):
    """The HTTP/1.1 client asked with TE: trailers, but fastlb's HTTP/1.1 path does not pass the TE field
    on, so the body keeps its content-length framing, which has no room for the trailers (as Envoy and
    nginx do)."""
    head, rest = http11_exchange(balancers["h2"], "/trailers")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: 5" in head.lower()
    assert rest == b"hello"


# ---- interim responses -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["h1", "h2"])
def test_103_early_hints_reach_an_h2_client_before_the_response(balancers, backend):
    with H2Client(balancers[backend]) as client:
        response = client.get("/early-hints")
    assert response.status == 200 and response.body.startswith(b"hinted")
    assert response.interim == [[(":status", "103"), ("link", EARLY_HINTS_LINK)]]


def test_103_early_hints_still_reach_an_http1_client(balancers):
    head, rest = http11_exchange(balancers["h1"], "/early-hints")
    assert head.startswith(b"HTTP/1.1 103 ")
    assert b"HTTP/1.1 200 OK" in rest and rest.endswith(b"hinted\n")


def test_100_continue_goes_to_an_h2_client_that_expects_it_before_it_sends_the_body(balancers):
    with H2Client(balancers["h1"]) as client:
        stream_id = client.request("POST", "/echo", headers=[("expect", "100-continue")], end=False)
        response = client.responses[stream_id]
        # No body sent yet: fastlb answers 100 once the request reached a backend.
        wait_until(lambda: response.interim or not client.receive_once(), what="100 Continue")
        assert response.interim == [[(":status", "100")]] and response.status == 0
        client.conn.send_data(stream_id, b"after-continue", end_stream=True)
        client.flush()
        response = client.wait([stream_id])[stream_id]
    assert response.status == 200 and response.body == b"after-continue"
