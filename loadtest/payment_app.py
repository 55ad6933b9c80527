"""A small payment service to load-test fastlb with: `python loadtest/payment_app.py NAME:PORT ...`.

Each NAME:PORT is one backend (all in this process, keep-alive HTTP/1.1 on uvloop + httptools).
Sessions live in the backend that created them, as in an application without shared session
storage: a request carrying a session that reached another backend gets 401, so a balancer
that loses stickiness shows up as failures.

  GET  /products, /products/ID   browse: a small JSON answer
  POST /login                    creates a session: Set-Cookie: SESSION=...
  GET  /account                  the session's account (401 without a known session)
  POST /checkout                 body {"order": ID, "amount": N}; 201, or 409 for an order id seen
                                 before: a checkout must never be applied twice
  GET  /stats                    this backend's counters (requests, sessions, orders, duplicates)

Every response carries X-Backend: NAME. Prints `ready` once every port listens.
"""
import asyncio
import json
import secrets
import sys

import httptools
import uvloop

SHARED_ORDERS: set[str] = set()   # across this process's backends: a duplicate is a duplicate anywhere


class Backend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.sessions: dict[str, str] = {}
        self.counters = {"requests": 0, "logins": 0, "checkouts": 0, "duplicates": 0, "unknown_session": 0}


class Connection(asyncio.Protocol):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", {}, bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        status, body, extra = self.handle(self.parser.get_method(), self.url.split(b"?")[0].decode())
        keep_alive = self.parser.should_keep_alive()
        head = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"X-Backend: {self.backend.name}\r\n{extra}"
                f"{'' if keep_alive else 'Connection: close' + chr(13) + chr(10)}\r\n").encode()
        self.transport.write(head + body)
        if not keep_alive:
            self.transport.close()

    def session(self) -> str | None:
        for part in self.headers.get(b"cookie", b"").decode().split(";"):
            name, _, value = part.strip().partition("=")
            if name == "SESSION" and value in self.backend.sessions:
                return value
        return None

    def handle(self, method: bytes, path: str) -> tuple[str, bytes, str]:
        backend = self.backend
        backend.counters["requests"] += 1
        if method == b"GET" and (path == "/products" or path.startswith("/products/")):
            return "200 OK", json.dumps({"path": path, "price": 1999}).encode(), ""
        if method == b"GET" and path == "/stats":
            return "200 OK", json.dumps(backend.counters).encode(), ""
        if method == b"POST" and path == "/login":
            session = secrets.token_hex(16)
            backend.sessions[session] = bytes(self.body).decode(errors="replace")
            backend.counters["logins"] += 1
            return "200 OK", b'{"ok": true}', f"Set-Cookie: SESSION={session}; Path=/; HttpOnly\r\n"
        session = self.session()
        if path in ("/account", "/checkout") and session is None:
            backend.counters["unknown_session"] += 1
            return "401 Unauthorized", b'{"error": "unknown session"}', ""
        if method == b"GET" and path == "/account":
            return "200 OK", json.dumps({"user": backend.sessions[session]}).encode(), ""
        if method == b"POST" and path == "/checkout":
            try:
                order = str(json.loads(self.body)["order"])
            except (ValueError, KeyError, TypeError):
                return "400 Bad Request", b'{"error": "order id required"}', ""
            if order in SHARED_ORDERS:
                backend.counters["duplicates"] += 1
                return "409 Conflict", b'{"error": "duplicate order"}', ""
            SHARED_ORDERS.add(order)
            backend.counters["checkouts"] += 1
            return "201 Created", json.dumps({"order": order}).encode(), ""
        return "404 Not Found", b'{"error": "not found"}', ""


async def main(specs: list[str]) -> None:
    loop = asyncio.get_running_loop()
    for spec in specs:
        name, _, port = spec.rpartition(":")
        backend = Backend(name)
        await loop.create_server(lambda backend=backend: Connection(backend), "127.0.0.1", int(port),
                                 reuse_address=True, backlog=1024)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        uvloop.run(main(sys.argv[1:]))
    except KeyboardInterrupt:
        pass
