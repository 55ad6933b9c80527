"""Answers fastlb writes itself: short plain-text error responses, preformatted once at import.

Each status has two forms: one that keeps the client connection open (the request was fully read, so
the next one can follow) and one with `Connection: close` (the request could not be read to its end, or
its framing cannot be trusted: the connection must not be reused).
"""
from __future__ import annotations

REASONS = {
    301: "Moved Permanently",
    308: "Permanent Redirect",
    400: "Bad Request",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _build(status: int, close: bool) -> bytes:
    body = f"{status} {REASONS[status]}\n".encode()
    head = (f"HTTP/1.1 {status} {REASONS[status]}\r\n"
            f"Content-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Cache-Control: no-store\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n").encode()
    return head + body


KEEP = {status: _build(status, False) for status in REASONS}
CLOSE = {status: _build(status, True) for status in REASONS}


def without_body(data: bytes) -> bytes:
    """An answer of fastlb's own as sent to a HEAD request: the head alone (RFC 9110 9.3.2). A body there
    would be read by the client as the start of the next response."""
    return data[:data.index(b"\r\n\r\n") + 4]


HEAD_KEEP = {status: without_body(data) for status, data in KEEP.items()}
HEAD_CLOSE = {status: without_body(data) for status, data in CLOSE.items()}

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


def response(status: int, close: bool, head: bool = False) -> bytes:
    if head:
        return (HEAD_CLOSE if close else HEAD_KEEP)[status]
    return (CLOSE if close else KEEP)[status]


def redirect(status: int, location: bytes, close: bool) -> bytes:
    """301/308 to location (a plain-HTTP bind redirecting to HTTPS), with an empty body."""
    return (b"HTTP/1.1 %d %s\r\nLocation: %s\r\nContent-Length: 0\r\n%s\r\n"
            % (status, REASONS[status].encode(), location, b"Connection: close\r\n" if close else b""))


class RequestError(Exception):
    """A request fastlb refuses: answered with `status`, then the connection is closed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
