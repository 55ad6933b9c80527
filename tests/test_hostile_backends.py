"""Hostile or broken backends (issue 20, items 7-9), on both HTTP data paths: the C engine (the default)
and the Python path alone (`FASTLB_HTTP_ENGINE=python`).

The backend is a scripted socket server in this process (`ScriptedBackend`): each connection runs a
script that reads requests and writes exactly the bytes the case needs (an endless header, a bad chunk
size, a 204 with a body, a close after reading the request, a keep-alive connection that closes as the
next request arrives), and records what it read.

- a response head larger than --max-response-header-size: 502, the backend connection is cut at once
  (the backend's endless send fails), and the worker keeps serving;
- a malformed response (bad chunk size, a body after a 204) with nothing forwarded yet: 502, and the
  client connection stays usable; once the head was forwarded, the only honest signal left is to close
  the client connection (the body is cut short);
- a backend that closes or resets after reading the request: 502, logged as a 502, never "503 connect
  failed";
- a reused keep-alive connection that the backend closes as the next request arrives: the request goes
  again on a fresh connection (GET), but a POST the backend may have received is never replayed.
"""
import socket
import struct
import threading

import pytest

from http_client import Client, build
from procs import free_port, wait_until

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
HEADER_STREAM_LIMIT = 32 * 1024 * 1024     # what the endless header sends at most (the test is bounded)


class ScriptedBackend:
    """A listening socket on 127.0.0.1 whose every connection runs script(backend, conn, number)."""

    def __init__(self, script) -> None:
        self.script = script
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.requests: list[tuple[int, bytes]] = []     # (connection number, request head)
        self.errors: list[tuple[int, str]] = []         # (connection number, the socket error seen)
        self.results: list = []                          # whatever a script reports
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return                                  # closed: the test is over
            with self.lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(30)
        try:
            self.script(self, conn, number)
        except OSError as exc:
            self.errors.append((number, exc.__class__.__name__))
        finally:
            conn.close()

    def read_request(self, conn: socket.socket, number: int) -> bytes | None:
        """The next request head on conn (bodies here are small and sent with the head), or None at EOF."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        self.requests.append((number, data))
        return data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def scripted(procs, engine):
    """scripted(script, *flags) -> (fastlb port, backend, fastlb process): one fastlb in front of one
    scripted backend, on the engine under test."""
    backends = []

    def start(script, *flags):
        backend = ScriptedBackend(script)
        backends.append(backend)
        port = free_port()
        lb = procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{backend.port}", *flags)
        lb.wait_for_line(r"HTTP engine " + engine)
        return port, backend, lb

    yield start
    for backend in backends:
        backend.close()


def serve_ok(backend, conn, number):
    while backend.read_request(conn, number) is not None:
        conn.sendall(OK)


# ---- item 7: a response head without end ------------------------------------------------------------

def endless_header(backend, conn, number):
    """`X-Inf: ` and then value bytes until fastlb cuts the connection (at most HEADER_STREAM_LIMIT)."""
    request = backend.read_request(conn, number)
    if b"GET /ok " in request:
        conn.sendall(OK)
        serve_ok(backend, conn, number)
        return
    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Inf: ")
    chunk = b"a" * 65536
    sent = 0
    try:
        while sent < HEADER_STREAM_LIMIT:
            conn.sendall(chunk)
            sent += len(chunk)
    finally:
        backend.results.append(sent)


def test_a_response_head_over_the_limit_is_a_502_and_the_backend_connection_is_cut(scripted):
    port, backend, lb = scripted(endless_header)
    with Client(port, timeout=20) as client:
        response = client.request("GET", "/endless")
        assert response.status == 502
        # The connection stays usable (nothing of the bad response reached it), on a fresh backend
        # connection: the one that sent the endless head was closed.
        assert client.request("GET", "/ok").body == b"ok"
    assert backend.connections == 2
    # fastlb closed the connection long before the backend ran out of header to send.
    assert backend.results and backend.results[0] < HEADER_STREAM_LIMIT // 4, backend.results
    lb.wait_for_line(r"WARNING 502 to 127\.0\.0\.1: backend .*response head larger than "
                     r"max_response_header_size")


def big_head(backend, conn, number):
    """A response whose head holds a header of the size the request path names (/SIZE)."""
    while (request := backend.read_request(conn, number)) is not None:
        size = int(request.split(b" ")[1][1:])
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * size + b"\r\nContent-Length: 2\r\n\r\nok")


def test_the_response_head_limit_is_the_flag_and_heads_under_it_pass(scripted):
    port, _, _ = scripted(big_head, "--max-response-header-size", "16k")
    with Client(port) as client:
        response = client.request("GET", "/12000")
        assert response.status == 200 and response.header("X-Big") == "b" * 12000
        assert client.request("GET", "/40000").status == 502
        assert client.request("GET", "/100").status == 200


def test_a_large_head_under_the_default_limit_is_forwarded(scripted):
    port, _, _ = scripted(big_head)
    with Client(port) as client:
        response = client.request("GET", "/60000")           # default limit: 64k
        assert response.status == 200 and len(response.header("X-Big")) == 60000
        assert client.request("GET", "/70000").status == 502


# ---- item 8: malformed responses and closes, with the status the README gives ----------------------

def bad_chunk(backend, conn, number):
    while (request := backend.read_request(conn, number)) is not None:
        if b"GET /bad " in request:
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
        elif b"GET /204 " in request:
            conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello")
        elif b"GET /late " in request:
            # The head and a first chunk, then (once they were surely forwarded) a bad chunk size. The
            # event is published before the send: the test may see the chunk before this thread runs on.
            forwarded = threading.Event()
            backend.results.append(forwarded)
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            if forwarded.wait(10):                     # the test saw the head and the first chunk
                conn.sendall(b"zz\r\n")
            return
        else:
            conn.sendall(OK)


@pytest.mark.parametrize("path", ["/bad", "/204"])
def test_a_malformed_response_is_a_502_and_the_client_connection_stays(scripted, path):
    port, backend, lb = scripted(bad_chunk)
    with Client(port) as client:
        assert client.request("GET", path).status == 502
        assert client.request("GET", "/ok").body == b"ok"
    assert backend.connections == 2           # the broken backend connection was not reused
    lb.wait_for_line(r"WARNING 502 to 127\.0\.0\.1: backend .*bad response")


def test_a_malformed_body_after_the_head_was_forwarded_closes_the_client_connection(scripted):
    port, backend, _ = scripted(bad_chunk)
    with Client(port) as client:
        client.send(build("GET", "/late"))
        head = b""
        while b"first" not in head:
            chunk = client.sock.recv(65536)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        backend.results[0].set()                             # now the bad chunk size
        # Too late for a 502: the client sees the cut (no last chunk), never a complete response.
        assert client.closed()


def close_after_request(backend, conn, number):
    request = backend.read_request(conn, number)
    if request is not None and b"/reset" in request:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST on close


@pytest.mark.parametrize("path", ["/close", "/reset"])
def test_a_backend_closing_after_reading_the_request_is_a_502_not_a_failed_connect(scripted, path):
    port, backend, lb = scripted(close_after_request)
    with Client(port) as client:
        assert client.request("GET", path).status == 502
    # Read once: with no other backend there is nothing to retry on.
    assert len(backend.requests) == 1
    lb.wait_for_line(rf"WARNING 502 to 127\.0\.0\.1: backend 127\.0\.0\.1:{backend.port} failed the request")
    assert " 503 " not in lb.output


# ---- item 9: the keep-alive race ---------------------------------------------------------------------

def one_answer_then_close_on_the_next_request(backend, conn, number):
    """Answers the first request (keep-alive, no Connection: close); reads the next one and closes
    without a word: what a backend's idle timeout does when it crosses a request on the wire."""
    if backend.read_request(conn, number) is None:
        return
    conn.sendall(OK)
    backend.read_request(conn, number)


def test_a_reused_connection_closed_as_the_request_arrives_is_retried_on_a_fresh_one(scripted):
    port, backend, lb = scripted(one_answer_then_close_on_the_next_request)
    with Client(port) as client:
        for i in range(5):
            response = client.request("GET", f"/r{i}")
            assert (response.status, response.body) == (200, b"ok"), i
    # Requests 2-5 each went first to the connection the request before used, then to a fresh one.
    assert backend.connections == 5
    assert [head.split(b" ")[1] for _, head in backend.requests] == [
        b"/r0", b"/r1", b"/r1", b"/r2", b"/r2", b"/r3", b"/r3", b"/r4", b"/r4"]
    assert " 503 " not in lb.output and " 502 " not in lb.output


def test_a_post_on_a_reused_connection_that_closes_is_not_replayed(scripted):
    port, backend, _ = scripted(one_answer_then_close_on_the_next_request)
    with Client(port) as client:
        assert client.request("GET", "/first").status == 200
        # The backend may have acted on it: a 502, never a second copy.
        assert client.request("POST", "/pay", body=b"1").status == 502
    assert [head.split(b" ")[:2] for _, head in backend.requests] == [[b"GET", b"/first"], [b"POST", b"/pay"]]


def answer_then_close_soon(backend, conn, number):
    """Answers one request keep-alive, then closes the connection on its own shortly after."""
    if backend.read_request(conn, number) is not None:
        conn.sendall(OK)


def test_a_reused_connection_the_backend_closed_after_answering_is_not_used_again(scripted):
    port, backend, lb = scripted(answer_then_close_soon)
    with Client(port) as client:
        for i in range(5):
            assert client.request("GET", f"/s{i}").body == b"ok"
    assert len(backend.requests) == 5
    assert " 503 " not in lb.output and " 502 " not in lb.output


# ---- a body longer than one read: the engine relays it (relay_body), the Python path streams it -----

LONG_BODY = 64 * 1024 * 1024          # promised by the heads below: more than the kernel buffers hold


def long_head(number: int) -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {LONG_BODY}\r\nX-Connection: {number}\r\n\r\n".encode()


def long_body_then(ending):
    """A script: `/long` gets a head promising LONG_BODY bytes and 256 KiB of them, then ending(backend,
    conn); any other path gets OK."""
    def script(backend, conn, number):
        while (request := backend.read_request(conn, number)) is not None:
            if b"GET /long " not in request:
                conn.sendall(OK)
                continue
            conn.sendall(long_head(number) + b"b" * (256 * 1024))
            ending(backend, conn)
            return
    return script


def read_head_and_some(client, size: int) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or len(data) < size:
        chunk = client.sock.recv(65536)
        assert chunk, data[:200]
        data += chunk
    return data


def test_a_backend_closing_mid_body_cuts_the_client_connection(scripted):
    """The head (and some of the body) was forwarded: the client's connection ends short of the
    promised length, and the next client is served on a fresh backend connection."""
    port, backend, _ = scripted(long_body_then(lambda backend, conn: None))      # returns: closed
    with Client(port) as client:
        client.send(build("GET", "/long"))
        data = read_head_and_some(client, 1024)
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and f"Content-Length: {LONG_BODY}".encode() in data
        assert client.closed()
    with Client(port) as client:
        assert client.request("GET", "/ok").body == b"ok"
    assert backend.connections == 2


def stall_until_closed(backend, conn):
    """Sends nothing more; records whether fastlb closed the connection (a read sees EOF or a reset)."""
    conn.settimeout(60)
    try:
        backend.results.append(conn.recv(1) == b"")
    except OSError:
        backend.results.append(True)


def test_a_body_that_stalls_ends_both_connections_at_the_response_timeout(scripted):
    port, backend, _ = scripted(long_body_then(stall_until_closed), "--response-timeout", "1s")
    with Client(port, timeout=30) as client:
        client.send(build("GET", "/long"))
        read_head_and_some(client, 1024)
        assert client.closed(timeout=30)
    wait_until(lambda: backend.results, what="the backend connection closed by fastlb")
    assert backend.results == [True]


def send_until_refused(backend, conn):
    """Keeps sending the promised body until fastlb closes the connection (bounded by LONG_BODY)."""
    sent = 256 * 1024
    try:
        while sent < LONG_BODY:
            conn.sendall(b"b" * 65536)
            sent += 65536
        backend.results.append("all sent")
    except OSError:
        backend.results.append("refused")


def test_a_client_leaving_mid_body_closes_the_backend_connection(scripted):
    """...and is not the backend's fault: passive health does not count it (one failure would eject)."""
    port, backend, lb = scripted(long_body_then(send_until_refused), "--outlier-failures", "1")
    client = Client(port)
    client.send(build("GET", "/long"))
    read_head_and_some(client, 1024)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST
    client.sock.close()
    wait_until(lambda: backend.results, what="the backend's sending to end")
    assert backend.results == ["refused"]                 # fastlb did not read the rest to keep it
    with Client(port) as client:
        assert client.request("GET", "/ok").body == b"ok"
    assert backend.connections == 2
    assert "eject" not in lb.output


def long_body_with_connection_close(backend, conn, number):
    """A whole long body under `Connection: close`, then the connection left open, answering more."""
    while (request := backend.read_request(conn, number)) is not None:
        if b"GET /long " in request:
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 300000\r\n\r\n" + b"c" * 300000)
        else:
            conn.sendall(OK)


def test_a_long_body_under_connection_close_is_relayed_whole_and_its_connection_not_reused(scripted):
    port, backend, _ = scripted(long_body_with_connection_close)
    with Client(port) as client:
        response = client.request("GET", "/long")
        assert (response.status, response.body) == (200, b"c" * 300000)
        assert client.request("GET", "/ok").body == b"ok"
    assert backend.connections == 2


SLOW_READ_BODY = bytes(range(256)) * (32 * 1024)      # 8 MiB: many times what the kernel buffers hold


def whole_long_body(backend, conn, number):
    while (request := backend.read_request(conn, number)) is not None:
        if b"GET /long " in request:
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(SLOW_READ_BODY)}\r\n\r\n".encode() + SLOW_READ_BODY)
        else:
            conn.sendall(OK)


def test_a_client_reading_slowly_gets_every_byte_in_order_and_keeps_its_connection(scripted):
    """The client's small receive buffer fills over and over: what the relay could not write waits
    (the engine stops reading the backend meanwhile) and goes out in order."""
    port, backend, _ = scripted(whole_long_body)
    with Client(port, timeout=30) as client:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)     # (no autotuning past it)
        client.send(build("GET", "/long"))
        data = b""
        while b"\r\n\r\n" not in data:
            data += client.sock.recv(4096)
        head, first = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 OK")
        body = bytearray(first)
        while len(body) < len(SLOW_READ_BODY):
            chunk = client.sock.recv(65536)
            assert chunk, len(body)
            body += chunk
        assert body == SLOW_READ_BODY
        assert client.request("GET", "/ok").body == b"ok"
    assert backend.connections == 1
