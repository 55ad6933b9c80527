"""An HTTP/1.1 test backend: `python tests/http_backend.py NAME:PORT[@CERT] [NAME:PORT[@CERT] ...]`.
PORT 0: the kernel picks a free port, printed as `port NAME PORT` (no race with other processes).

With @CERT (a PEM file holding certificate and key) that port speaks HTTPS.

Prints `ready` once every port listens, then one line per request it receives:
`REQ NAME CONN METHOD URL BODYLEN SHA256-PREFIX HEADERS-JSON` (CONN numbers the backend's connections,
so tests see keep-alive reuse). Tests assert on these lines: what reached a backend, and what did not.

Paths (the query string is ignored unless said):
  /...             200, body `NAME METHOD URL\\n`, header X-Backend: NAME
  /echo            200, the request body back (Content-Length), X-Body-Sha256
  /chunked?n=N     200, chunked, N chunks of 1000 bytes
  /trailers        200, chunked body `hello` and the trailers X-Checksum: NAME-sum, grpc-status: 0
  /early-hints     103 (Link: </style.css>; rel=preload), then 200 `hinted\n`
  /big?n=N         200, N bytes (Content-Length), streamed in 64 KiB writes
  /close           200 with Connection: close, then closes
  /eof             200 without Content-Length: the body ends at close
  /slow?ms=N       waits N ms, then 200
  /hang            never answers
  /drop            closes the connection without answering
  /dropif?name=N   closes without answering on backend N, 200 on the others
  /failif?name=N   500 on backend N, 200 on the others
  /garbage         a response with two Content-Lengths (invalid framing)
  /status?code=N   N with a short body (or none for 204/304)
  /ws              101 Switching Protocols (Upgrade: websocket), then echoes raw bytes
  /headers         200 with Connection: X-Hop, X-Hop: 1, Keep-Alive: timeout=5, X-Keep: 1
  /hsts            200 with the backend's own Strict-Transport-Security: max-age=1
  .../setcookie?name=N&value=V   200 with Set-Cookie: N=V; Path=/ (any path prefix: sticky tests)
  .../setheader?name=N&value=V   200 with header N: V
"""
import asyncio
import hashlib
import json
import ssl
import sys
from urllib.parse import parse_qs, urlsplit

import httptools


class Handler(asyncio.Protocol):
    connections = 0

    def __init__(self, name: str) -> None:
        self.name = name
        Handler.connections += 1
        self.conn = Handler.connections
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.tunnel = False
        self.queue: list = []
        self.busy = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            self.transport.write(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        method = self.parser.get_method().decode()
        url = self.url.decode("latin-1")
        print(f"REQ {self.name} {self.conn} {method} {url} {len(body)} "
              f"{hashlib.sha256(body).hexdigest()[:16]} {json.dumps(self.headers)}", flush=True)
        self.queue.append((method, url, body, dict((k.lower(), v) for k, v in self.headers)))
        if not self.busy:
            asyncio.get_running_loop().create_task(self.serve())

    async def serve(self) -> None:
        self.busy = True
        try:
            while self.queue and not self.transport.is_closing():
                await self.respond(*self.queue.pop(0))
        finally:
            self.busy = False

    def send(self, status: int, body: bytes = b"", extra: str = "", reason: str = "OK") -> None:
        head = (f"HTTP/1.1 {status} {reason}\r\nX-Backend: {self.name}\r\n{extra}"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.transport.write(head + (b"" if self.head_request else body))

    async def respond(self, method: str, url: str, body: bytes, headers: dict) -> None:
        self.head_request = method == "HEAD"
        parts = urlsplit(url)
        path = parts.path
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if path == "/echo":
            self.send(200, body, f"X-Body-Sha256: {hashlib.sha256(body).hexdigest()}\r\n")
        elif path == "/chunked":
            n = int(query.get("n", 3))
            self.transport.write(f"HTTP/1.1 200 OK\r\nX-Backend: {self.name}\r\n"
                                 f"Transfer-Encoding: chunked\r\n\r\n".encode())
            for i in range(n):
                self.transport.write(b"3e8\r\n" + bytes([97 + i % 26]) * 1000 + b"\r\n")
                await asyncio.sleep(0)
            self.transport.write(b"0\r\n\r\n")
        elif path == "/trailers":
            self.transport.write(f"HTTP/1.1 200 OK\r\nX-Backend: {self.name}\r\nTrailer: X-Checksum\r\n"
                                 f"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
                                 f"X-Checksum: {self.name}-sum\r\ngrpc-status: 0\r\n\r\n".encode())
        elif path == "/early-hints":
            self.transport.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
            await asyncio.sleep(0)
            self.send(200, b"hinted\n")
        elif path == "/big":
            n = int(query.get("n", 1 << 20))
            self.transport.write(f"HTTP/1.1 200 OK\r\nX-Backend: {self.name}\r\nContent-Length: {n}\r\n\r\n"
                                 .encode())
            block = bytes(range(256)) * 256
            sent = 0
            while sent < n:
                piece = block[:min(len(block), n - sent)]
                self.transport.write(piece)
                sent += len(piece)
                await asyncio.sleep(0)
        elif path == "/close":
            self.send(200, b"closing\n", "Connection: close\r\n")
            self.transport.close()
        elif path == "/eof":
            self.transport.write(f"HTTP/1.1 200 OK\r\nX-Backend: {self.name}\r\nConnection: close\r\n\r\n"
                                 f"body until close\n".encode())
            self.transport.close()
        elif path == "/slow":
            await asyncio.sleep(int(query.get("ms", 100)) / 1000)
            self.send(200, b"slow\n")
        elif path == "/hang":
            await asyncio.sleep(3600)
        elif path == "/drop":
            self.transport.abort()
        elif path == "/dropif":
            if query.get("name") == self.name:
                self.transport.abort()
            else:
                self.send(200, f"{self.name}\n".encode())
        elif path == "/failif":
            self.send(500 if query.get("name") == self.name else 200, f"{self.name}\n".encode())
        elif path == "/garbage":
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")
        elif path == "/status":
            code = int(query.get("code", 200))
            if code in (204, 304):
                self.transport.write(f"HTTP/1.1 {code} X\r\nX-Backend: {self.name}\r\n\r\n".encode())
            else:
                self.send(code, f"status {code}\n".encode(), reason="X")
        elif path == "/ws":
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\n\r\n")
            self.tunnel = True
        elif path == "/hsts":
            self.send(200, b"hsts\n", "Strict-Transport-Security: max-age=1\r\n")
        elif path == "/headers":
            self.send(200, b"h\n", "Connection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-Keep: 1\r\n")
        elif path.endswith("/setcookie"):
            self.send(200, f"{self.name}\n".encode(), f"Set-Cookie: {query['name']}={query['value']}; Path=/\r\n")
        elif path.endswith("/setheader"):
            self.send(200, f"{self.name}\n".encode(), f"{query['name']}: {query['value']}\r\n")
        else:
            self.send(200, f"{self.name} {method} {url}\n".encode())


async def main(specs: list[str]) -> None:
    loop = asyncio.get_running_loop()
    for spec in specs:
        spec, _, cert = spec.partition("@")
        name, _, port = spec.rpartition(":")
        context = None
        if cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert)
        server = await loop.create_server(lambda name=name: Handler(name), "127.0.0.1", int(port),
                                          reuse_address=True, ssl=context)
        if int(port) == 0:               # the kernel picks: said before `ready` (`port NAME PORT`)
            print(f"port {name} {server.sockets[0].getsockname()[1]}")
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1:]))
    except KeyboardInterrupt:
        pass
