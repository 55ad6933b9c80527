"""A raw HTTP/1.1 test client: send exact bytes, read responses with httptools, bounded in time."""
from __future__ import annotations

import json
import socket
import time

import httptools

from procs import LoadLoop


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.complete = False
        self.chunked = False

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True

    def on_chunk_header(self) -> None:
        self.chunked = True


class Client:
    """One client connection; `leftover` keeps bytes read past a response (pipelining)."""

    def __init__(self, port: int, timeout: float = 5.0, source: str | None = None) -> None:
        """source: the address (in 127.0.0.0/8) the connection comes from."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.leftover = b""
        self.timeout = timeout

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str = "GET", path: str = "/", headers: dict | None = None,
                body: bytes | None = None) -> Response:
        self.send(build(method, path, headers, body))
        return self.read_response(head=method == "HEAD")

    def read_response(self, head: bool = False) -> Response:
        """Reads one final response (1xx are skipped and kept in .interim). Raises on a close first."""
        interim = []
        while True:
            response = Response()
            headers_done = [False]
            response.on_headers_complete = lambda: headers_done.__setitem__(0, True)
            parser = httptools.HttpResponseParser(response)     # binds the callbacks present now
            data, self.leftover = self.leftover, b""
            deadline = time.monotonic() + self.timeout
            while True:
                if data:
                    try:
                        # Only this response's bytes: httptools would parse a following one into it.
                        used = _feed_one(parser, response, headers_done, data, head)
                    except httptools.HttpParserUpgrade as exc:
                        self.leftover = data[exc.args[0]:]
                        response.status = parser.get_status_code()
                        response.complete = True
                        return response
                    self.leftover = data[used:]
                if response.complete or (head and headers_done[0]):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("no complete response")
                chunk = self.sock.recv(65536)
                data, self.leftover = self.leftover + chunk, b""
                if not chunk:
                    if data:
                        parser.feed_data(data)           # bytes held back by _feed_one
                        if response.complete:
                            break
                    if headers_done[0] and not response.complete:
                        # A body delimited by the close.
                        response.status = parser.get_status_code()
                        response.complete = True
                        response.closed = True
                        return response
                    raise ConnectionError("closed before a complete response")
            response.status = parser.get_status_code()
            if 100 <= response.status < 200 and response.status != 101:
                interim.append(response)
                continue
            response.interim = interim
            return response

    def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection (EOF or reset) within timeout."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TLSClient(Client):
    """A Client over TLS: `context` an ssl client context (its certificate, if any, is offered)."""

    def __init__(self, port: int, context, server_name: str | None = None, timeout: float = 5.0) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        try:
            self.sock = context.wrap_socket(raw, server_hostname=server_name)
        except BaseException:
            raw.close()
            raise
        self.leftover = b""
        self.timeout = timeout


def _feed_one(parser, response: Response, headers_done: list, data: bytes, head: bool) -> int:
    """Feeds data to parser up to the end of the response being read; returns the bytes used (the rest
    belongs to the next response, e.g. pipelined answers arriving in one read).

    httptools cannot stop after a message, so the data is cut where the message can end: a head, a
    chunked body and every bodiless response end just after an empty line (CRLF CRLF), a Content-Length
    body after that many bytes, a close-delimited body at the close. Up to 3 bytes that may start an
    empty line are held back (not used) until more data shows whether they do."""
    used = 0
    size = len(data)
    while used < size and not response.complete and not (head and headers_done[0]):
        if headers_done[0]:
            status = parser.get_status_code()
            length = response.header("content-length")
            bodiless = head or status in (204, 304) or 100 <= status < 200
            if not bodiless and response.header("transfer-encoding") is None:
                if length is None:
                    parser.feed_data(data[used:])          # delimited by the close
                    return size
                end = min(size, used + int(length) - len(response.body))
                parser.feed_data(data[used:end])
                used = end
                continue
        # The next place an empty line ends (occurrences may overlap: try each end in turn).
        start = data.find(b"\r\n\r\n", max(0, used - 3))
        while start != -1 and start + 4 <= used:
            start = data.find(b"\r\n\r\n", start + 1)
        if start == -1:
            end = max(used, size - 3)
            if end > used:
                parser.feed_data(data[used:end])
            return end
        parser.feed_data(data[used:start + 4])
        used = start + 4
    return used


def build(method: str = "GET", path: str = "/", headers: dict | None = None, body: bytes | None = None,
          host: str = "test") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None and not any(k.lower() in ("content-length", "transfer-encoding")
                                    for k in (headers or {})):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def requests_seen(proc, start: int = 0, at_least: int = 0) -> list[dict]:
    """The requests an http_backend process logged (from output line `start` on). The backend logs a
    request before answering it, but a thread reads its output: wait for `at_least` of them."""
    if at_least:
        deadline = time.monotonic() + 10
        while sum(line.startswith("REQ ") for line in list(proc.lines[start:])) < at_least:
            if time.monotonic() > deadline:
                raise AssertionError(f"backend logged fewer than {at_least} requests")
            time.sleep(0.01)
    seen = []
    with proc.changed:
        lines = list(proc.lines[start:])
    for line in lines:
        if line.startswith("REQ "):
            _, name, conn, method, url, length, digest, headers = line.split(" ", 7)
            seen.append({"backend": name, "conn": int(conn), "method": method, "url": url,
                         "length": int(length), "sha": digest, "headers": json.loads(headers)})
    return seen


class KeepAliveLoad(LoadLoop):
    """A client loop in a thread: GET after GET on one keep-alive connection through `port` (a new
    connection only after the server closed the previous one at a response's end). Records who answered
    (the first word of the body, which every test backend starts with its name) and every failure: a
    status other than 200, a reset or a timeout. Bounded: it stops at `stop()`, after `max_seconds`, or
    after `max_requests`.

    Unlike ConnectionLoad (tcp), nothing is held between requests: a request in flight on a backend
    that dies must be re-sent elsewhere by the balancer, so every request counts."""

    def __init__(self, port: int, path: str = "/", max_seconds: float = 60.0, max_requests: int = 200_000,
                 timeout: float = 5.0) -> None:
        super().__init__(port, max_seconds, join_timeout=timeout + 5)
        self.path = path
        self.timeout = timeout
        self.max_requests = max_requests
        self.connections = 0

    def _run(self) -> None:
        client = None
        request = build("GET", self.path)
        while (not self.stopping.is_set() and time.monotonic() < self.deadline
               and len(self.answers) + len(self.failures) < self.max_requests):
            try:
                if client is None:
                    client = Client(self.port, timeout=self.timeout)
                    self.connections += 1
                client.send(request)
                response = client.read_response()
                if response.status != 200:
                    raise ConnectionError(f"HTTP {response.status}: {response.body[:80]!r}")
                self.answers.append((time.monotonic(), response.body.split(b" ", 1)[0].strip().decode()))
                if (response.header("Connection") or "").lower() == "close":
                    client.close()
                    client = None
            except (OSError, ConnectionError) as exc:
                self.failures.append((time.monotonic(), f"{exc.__class__.__name__}: {exc}"))
                if client is not None:
                    client.close()
                client = None
        if client is not None:
            client.close()
