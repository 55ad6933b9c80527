"""The HTTP protocol classes in one process, no sockets (uvicorn's style): a ClientConnection
(fastlb/http/protocol.py) and the BackendConnections (fastlb/http/upstream.py) it uses, on fake
transports (tests/fakes.py), with the pool connecting through a fake network. The test plays the
client and the backend byte by byte and reads what fastlb wrote to each. This is the Python path (the
C engine is driven by the process tests: test_http.py runs each behaviour on both)."""
import asyncio

import pytest

from fakes import FakeNetwork, FakeTransport
from fastlb.cli import config_from_args
from fastlb.http.datapath import HttpPath
from fastlb.http.runtime import build_router

FORWARDED = b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: x\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


class Proxy:
    """One worker's HTTP runtime over backends on ports 10001.. of a fake network."""

    def __init__(self, *flags, backends=1):
        self.loop = asyncio.new_event_loop()
        argv = ["--mode", "http", "--bind", "127.0.0.1:1"]
        for i in range(backends):
            argv += ["--backend", f"127.0.0.1:{10001 + i}"]
        self.config = config_from_args([*argv, *flags])[1]
        self.network = FakeNetwork(self.loop)
        self.path = HttpPath(self.config, self.loop, build_router(self.config, self.loop, 100))
        self.runtime = self.path.runtime
        self.pool = self.runtime.router.default.pool

    def client(self):
        """A new client connection: (its protocol, its transport)."""
        protocol = self.path.protocol_factory(self.config.binds[0])()
        transport = FakeTransport()
        protocol.connection_made(transport)
        return protocol, transport

    def send(self, data, client=None):
        """Bytes from a client (a new one unless given), then the loop turns: (its protocol, its transport)."""
        protocol, transport = client or self.client()
        protocol.data_received(data)
        self.settle()
        return protocol, transport

    def settle(self):
        """Lets the connect tasks run (a few loop turns: each step of a connect is one)."""
        for _ in range(5):
            self.loop.run_until_complete(asyncio.sleep(0))

    def backend(self, index=-1):
        """(transport, BackendConnection) of a backend connection the pool opened, the latest by default."""
        return self.network.connections[index]

    def close(self):
        self.pool.close()
        self.loop.close()


@pytest.fixture
def proxy():
    proxies = []

    def make(*flags, backends=1):
        proxies.append(Proxy(*flags, backends=backends))
        return proxies[-1]
    yield make
    for made in proxies:
        made.close()


def test_a_request_reaches_the_backend_with_forwarded_headers_and_the_response_the_client(proxy):
    lb = proxy()
    client, client_transport = lb.send(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
    backend_transport, upstream = lb.backend()
    # Hop-by-hop Connection is not forwarded; X-Forwarded-* are added.
    assert backend_transport.take() == b"GET /a HTTP/1.1\r\nHost: x\r\n" + FORWARDED + b"\r\n"
    assert lb.pool.active == 1
    upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nhi")
    assert client_transport.take() == OK
    # The response ended: the slot goes back and the backend connection waits for the next request.
    [backend] = lb.pool.backends
    assert lb.pool.active == 0 and list(backend.idle) == [upstream] and not client_transport.closed


def test_keep_alive_reuses_the_idle_backend_connection(proxy):
    lb = proxy()
    for path in (b"/1", b"/2", b"/3"):
        client, client_transport = lb.send(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        backend_transport, upstream = lb.backend()
        assert backend_transport.take().startswith(b"GET " + path + b" ")
        upstream.data_received(OK)
        assert client_transport.take() == OK
    assert lb.network.attempts == [10001]                  # one connect for the three requests


def test_pipelined_requests_go_one_at_a_time_and_are_answered_in_order(proxy):
    lb = proxy()
    client, client_transport = lb.send(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    backend_transport, upstream = lb.backend()
    assert backend_transport.take() == b"GET /1 HTTP/1.1\r\nHost: x\r\n" + FORWARDED + b"\r\n"
    upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
    lb.settle()
    assert client_transport.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none"
    assert backend_transport.take() == b"GET /2 HTTP/1.1\r\nHost: x\r\n" + FORWARDED + b"\r\n"
    upstream.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n")
    assert client_transport.take() == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n"
    assert lb.pool.active == 0 and len(lb.network.connections) == 1


def test_a_response_arriving_a_byte_at_a_time_is_forwarded_whole(proxy):
    lb = proxy()
    client, client_transport = lb.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    _, upstream = lb.backend()
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Extra: yes\r\n\r\nhello world"
    for i in range(len(response)):
        upstream.data_received(response[i:i + 1])
    # A head read in pieces is rebuilt from its parsed headers, the framing header last.
    assert client_transport.take() == b"HTTP/1.1 200 OK\r\nX-Extra: yes\r\nContent-Length: 11\r\n\r\nhello world"
    assert lb.pool.active == 0


def test_a_malformed_request_gets_400_and_close_and_reaches_no_backend(proxy):
    lb = proxy()
    _, client_transport = lb.send(b"GARBAGE\r\n\r\n")
    answer = client_transport.take()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"Connection: close\r\n" in answer
    assert client_transport.closed
    assert lb.network.attempts == [] and lb.pool.active == 0


def test_a_backend_closing_before_its_response_is_a_502_and_a_bad_response(proxy):
    lb = proxy("--outlier-failures", "5")
    client, client_transport = lb.send(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    backend_transport, upstream = lb.backend()
    assert backend_transport.take().endswith(b"Content-Length: 3\r\n\r\nabc")
    upstream.connection_lost(None)
    lb.settle()
    assert client_transport.take().startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    [backend] = lb.pool.backends
    assert lb.network.attempts == [10001]                  # a POST is never sent again
    assert backend.health.bad_responses == 1 and lb.pool.active == 0 and not backend.idle


def test_5xx_responses_count_against_the_backend_and_a_good_one_resets_the_streak(proxy):
    lb = proxy("--outlier-failures", "5")
    [backend] = lb.pool.backends
    client = lb.client()
    for status, streak in ((b"503 Busy", 1), (b"500 Oops", 2), (b"200 OK", 0)):
        _, client_transport = lb.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", client)
        _, upstream = lb.backend()
        upstream.data_received(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
        assert client_transport.take().startswith(b"HTTP/1.1 " + status + b"\r\n")  # forwarded as it is
        assert backend.health.bad_responses == streak


def test_a_client_leaving_mid_response_aborts_the_backend_connection(proxy):
    lb = proxy()
    client, client_transport = lb.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    backend_transport, upstream = lb.backend()
    upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    assert client_transport.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345"
    client.connection_lost(None)
    # The rest of the body would arrive on a connection the next request cannot use.
    [backend] = lb.pool.backends
    assert backend_transport.aborted and not backend.idle and lb.pool.active == 0


def test_a_connect_failure_moves_the_request_to_the_next_backend(proxy):
    lb = proxy("--algorithm", "roundrobin", backends=2)
    lb.network.answers[10001] = ConnectionRefusedError(111, "Connection refused")
    client, client_transport = lb.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert lb.network.attempts == [10001, 10002]
    backend_transport, upstream = lb.backend()
    assert backend_transport.take().startswith(b"GET / HTTP/1.1\r\n")
    upstream.data_received(OK)
    assert client_transport.take() == OK
    refused, served = lb.pool.backends
    assert refused.traffic.connect_errors == 1 and served.traffic.retries == 1


def test_no_backend_up_is_a_503(proxy):
    lb = proxy()
    [backend] = lb.pool.backends
    lb.pool.health.set_admin_state(backend.health, "maint")
    client, client_transport = lb.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert client_transport.take().startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert lb.network.attempts == [] and lb.pool.active == 0


def test_an_idle_backend_connection_that_speaks_is_closed(proxy):
    lb = proxy()
    client, client_transport = lb.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    backend_transport, upstream = lb.backend()
    upstream.data_received(OK)
    assert client_transport.take() == OK and not backend_transport.closed
    upstream.data_received(b"HTTP/1.1 200 OK\r\n")           # nothing was asked: out of step
    assert backend_transport.closed
    assert client_transport.take() == b""                    # nothing of it reaches a client


def test_a_junk_response_is_sent_again_but_an_unasked_101_is_not(proxy):
    """Both are bad responses (502 when nothing reached the client); --retry-on junk-response sends a
    GET to the next backend after junk, never after a 101 to a request that asked for no upgrade."""
    lb = proxy("--algorithm", "roundrobin", "--retry-on", "junk-response", backends=2)
    client, client_transport = lb.send(b"GET /junk HTTP/1.1\r\nHost: x\r\n\r\n")
    _, upstream = lb.backend()
    upstream.data_received(b"NOT HTTP AT ALL\r\n\r\n")
    lb.settle()
    retried_transport, retried = lb.backend()
    assert retried is not upstream and lb.network.attempts == [10001, 10002]
    assert retried_transport.take().startswith(b"GET /junk ")
    retried.data_received(OK)
    assert client_transport.take() == OK
    client, client_transport = lb.send(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
    backend_transport, upstream = lb.backend()
    upstream.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    lb.settle()
    assert client_transport.take().startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert backend_transport.aborted and lb.pool.active == 0
    assert retried_transport.take() == b""                 # (idle, and the next backend in turn)


def test_draining_the_python_path_calls_back_when_its_last_connection_ends(proxy):
    lb = proxy()
    idle = []
    first, _ = lb.client()
    second, _ = lb.client()
    lb.path.start_draining(lambda: idle.append(lb.path.live))
    first.connection_lost(None)
    assert idle == [] and lb.path.live == 1
    second.connection_lost(None)
    assert idle == [0]
