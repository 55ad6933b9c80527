"""The persistence hook (`HttpRuntime.request_hook`) that sticky sessions will use: a pinned backend
is used when it can serve, requests are balanced as usual when it cannot, and the hook's header lines
reach the response. In-process, through the (compiled or plain) protocols with fake transports."""
import asyncio

import pytest

from fastlb.config import BackendSpec, BindSpec, Config
from fastlb.http.runtime import HttpRuntime, build_router

REQUEST = b"GET / HTTP/1.1\r\nHost: t\r\nCookie: srv=1\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class FakeTransport:
    def __init__(self) -> None:
        self.written = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 5555) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    abort = close


@pytest.fixture
def runtime():
    loop = asyncio.new_event_loop()
    config = Config(binds=[BindSpec("127.0.0.1", 1)],
                    backends=[BackendSpec("127.0.0.1", 2), BackendSpec("127.0.0.1", 3),
                              BackendSpec("127.0.0.1", 4)])
    rt = HttpRuntime(config, loop, build_router(config, loop, 1000), set())
    for backend in rt.router.default.pool.backends:          # one idle connection parked per backend
        upstream = rt.backend_factory()
        upstream.connection_made(FakeTransport())
        upstream.backend = backend
        rt.park(upstream, backend)
    yield rt
    loop.close()


def serve(rt, count: int) -> tuple[list, bytes]:
    """count requests on one client connection; returns the backends that served them and the output."""
    client = rt.protocol_factory(None)()
    transport = FakeTransport()
    client.connection_made(transport)
    served = []
    for _ in range(count):
        client.data_received(REQUEST)
        upstream = client.queue[0].upstream
        served.append(upstream.backend)
        upstream.data_received(RESPONSE)
    return served, b"".join(transport.written)


def test_pinned_backend_serves_and_hook_headers_reach_the_response(runtime):
    pool = runtime.router.default.pool
    target = pool.backends[2]

    def hook(req, client):
        req.pinned = target
        req.extra_response_headers = b"Set-Cookie: srv=2\r\n"

    runtime.request_hook = hook
    served, output = serve(runtime, 5)
    assert served == [target] * 5
    assert output.count(b"Set-Cookie: srv=2\r\n") == 5 and output.count(b"HTTP/1.1 200 OK") == 5


def test_pinned_backend_that_cannot_serve_is_redispatched(runtime):
    pool = runtime.router.default.pool
    target = pool.backends[1]
    target.set_state("drain")
    runtime.request_hook = lambda req, client: setattr(req, "pinned", target)
    served, _ = serve(runtime, 4)
    assert target not in served and len(set(served)) == 2
