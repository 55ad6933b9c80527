"""The response fast path (fastlb/http/_head.pyx): it answers only for plain complete responses, with
the head minus hop-by-hop lines, and gives up (None) on everything else so httptools decides."""
import pytest

_head = pytest.importorskip("fastlb.http._head", reason="compiled by setup.py build_ext")
scan = _head.scan_response


def test_plain_response_is_forwarded_without_hop_by_hop_lines():
    data = (b"HTTP/1.1 200 OK\r\nServer: x\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
            b"Content-Length: 5\r\nX-A: 1\r\nTE: trailers\r\n\r\nhello")
    status, head, start, close = scan(data)
    assert status == 200 and not close and data[start:] == b"hello"
    assert head == b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 5\r\nX-A: 1\r\n"


def test_connection_close_is_reported():
    status, head, start, close = scan(b"HTTP/1.1 503 Busy\r\nconnection: Close\r\ncontent-length: 0\r\n\r\n")
    assert (status, close, head) == (503, True, b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n")


@pytest.mark.parametrize("data", [
    b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx",                        # HTTP/1.0 backend
    b"HTTP/1.1 100 Continue\r\n\r\n",                                        # interim
    b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel",                       # body still to come
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhello",                     # bytes after the body
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",  # duplicate length
    b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nhi",
    b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nuntil close",                                   # no length
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX: a\r\n b\r\n\r\n",          # obs-fold
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX : a\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX: a\x00\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX: a\rb\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: X-Hop\r\nX-Hop: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive, close\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 600 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n",                             # head not complete
    b"HTTP/1.1 200 OK\x01\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
])
def test_anything_unusual_is_left_to_httptools(data):
    assert scan(data) is None


def test_watched_headers_are_left_to_the_slow_path():
    # A sticky rule that must read or rewrite a backend's Set-Cookie (or a learned header) names it:
    # such a response goes to httptools, any other stays on the fast path.
    cookie = b"HTTP/1.1 200 OK\r\nSET-COOKIE: SRV=1\r\nContent-Length: 0\r\n\r\n"
    other = b"HTTP/1.1 200 OK\r\nX-Set-Cookie: 1\r\nSet-Cookies: 1\r\nContent-Length: 0\r\n\r\n"
    assert scan(cookie) is not None
    assert scan(cookie, (b"x-session", b"set-cookie")) is None
    assert scan(other, (b"set-cookie",)) is not None


def test_dropped_headers_are_left_out_of_the_head():
    # The operator's response rules (--response-header-delete / -set / --via): those lines are left
    # out, in any case, wherever they are; a name both watched and dropped goes to the slow path.
    data = (b"HTTP/1.1 200 OK\r\nVia: 1.1 backend\r\nServer: x\r\nX-Powered-By: php\r\nX-Keep: 1\r\n"
            b"x-powered-by: again\r\nX-Powered-By-Not: 1\r\nContent-Length: 2\r\n\r\nhi")
    status, head, start, close = scan(data, (), (b"x-powered-by", b"via"))
    assert head == (b"HTTP/1.1 200 OK\r\nServer: x\r\nX-Keep: 1\r\nX-Powered-By-Not: 1\r\n"
                    b"Content-Length: 2\r\n")
    assert data[start:] == b"hi"
    assert scan(data, (b"via",), (b"via",)) is None
