"""HTTP/2 to backends (`--backend HOST:PORT,proto=h2`): each request is a stream on a connection shared by
many requests (cleartext h2c with prior knowledge, or TLS with ALPN h2 when the backend has `ssl`).

The seam is the one fastlb/http2/connection.py uses on the client side, the other way round: a request
is served by an ordinary `BackendConnection` (fastlb/http/upstream.py), whose transport is a
`BackendStream`. What the BackendConnection writes (the HTTP/1.1 request head the client side built,
its body) is parsed by the stream and submitted to libnghttp2 (fastlb/http2/_nghttp2.pyx's
ClientSession) as a request stream; the backend's response comes back to the BackendConnection as an
HTTP/1.1 response (chunked, its trailers in the chunked trailer section, when it has no content-length,
is gRPC's, or goes to an HTTP/2 client: see BackendStream.header_block).
So the slot accounting (BackendPool select, connect, response_done: one slot per request, not per
connection), the passive health checks, the retry decision (fastlb/http/reuse.py), response rewriting,
timeouts and the access log are those of every other request, unchanged.

`H2Backend` (one per proto=h2 backend, Backend.h2) holds the backend's connections: a request takes the
newest one that has not been sent GOAWAY and has a stream to spare (the backend's
SETTINGS_MAX_CONCURRENT_STREAMS), else a new connection is made (concurrent requests wait for the same
one). A stream the backend refused (REFUSED_STREAM, or past a GOAWAY's last stream) was not processed:
it fails as a keep-alive race does on HTTP/1.1 (not counted against the backend; sent again when the
retry rule allows).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import ssl

import httptools

from fastlb.http2 import _nghttp2
from fastlb.http2.common import CONNECTION_SPECIFIC, STREAM_BUFFER_HIGH, STREAM_BUFFER_LOW
from fastlb.tls import backend_context

log = logging.getLogger("fastlb")

ALPN_H2 = "h2"
# Request fields not sent as HTTP/2 fields: Host becomes :authority; TE is sent as "trailers" (gRPC needs it).
NOT_FORWARDED = CONNECTION_SPECIFIC | {b"host", b"te"}


@functools.cache
def h2_context(verify: str | None) -> ssl.SSLContext:
    """The TLS context of HTTP/2 connections to ssl backends with this `verify=` (requests and gRPC checks),
    offering h2 only (the shared HTTP/1.1 contexts must not offer it); one per setting, kept (loading CAs at
    every health check would cost more than the check)."""
    context = backend_context(verify)
    context.set_alpn_protocols([ALPN_H2])
    return context


class BackendRefused(ConnectionError):
    """The backend did not agree to HTTP/2 (ALPN), or its connection ended before a stream could open."""


class H2Backend:
    """A proto=h2 backend's connections (see the module docstring)."""

    __slots__ = ("backend", "loop", "connect_timeout", "ssl_context", "connections", "connecting")

    def __init__(self, backend, loop: asyncio.AbstractEventLoop, connect_timeout: float) -> None:
        self.backend = backend
        self.loop = loop
        self.connect_timeout = connect_timeout     # the shared connect's own bound (each waiter has its own)
        self.ssl_context = None
        if backend.spec.ssl:
            self.ssl_context = h2_context(backend.spec.verify)
        self.connections: list[H2BackendConnection] = []
        self.connecting: asyncio.Future | None = None

    async def open_stream(self, protocol_factory):
        """(transport, protocol) for one request, as loop.create_connection gives them: the protocol a new
        BackendConnection, its transport a BackendStream on a shared connection. Raises OSError when no
        connection can be made (a failed connect, like any other: BackendPool.connect's loop)."""
        conn = self._usable()
        while conn is None:
            if self.connecting is None:
                self.connecting = self.loop.create_task(self._connect())
                self.connecting.add_done_callback(self._connected)
            conn = await asyncio.shield(self.connecting)
            if conn.closed or conn.goaway:
                conn = self._usable()
                if conn is None:
                    raise BackendRefused("HTTP/2 connection ended before the stream opened")
        upstream = protocol_factory()
        transport = BackendStream(conn, upstream)
        conn.reserved += 1
        upstream.connection_made(transport)
        return transport, upstream

    def _usable(self):
        for conn in reversed(self.connections):
            if not conn.closed and not conn.goaway and \
                    len(conn.session.streams) + conn.reserved < conn.session.max_streams:
                return conn
        return None

    def _connected(self, task: asyncio.Future) -> None:
        self.connecting = None
        if not task.cancelled() and task.exception() is None:
            self.connections.append(task.result())
        elif not task.cancelled():
            task.exception()          # (retrieved: each waiter re-raises it)

    async def _connect(self):
        backend = self.backend
        async with asyncio.timeout(self.connect_timeout):
            if self.ssl_context is None:
                transport, conn = await self.loop.create_connection(
                    lambda: H2BackendConnection(self), backend.host, backend.port)
            else:
                transport, conn = await self.loop.create_connection(
                    lambda: H2BackendConnection(self), backend.host, backend.port, ssl=self.ssl_context,
                    server_hostname=backend.server_hostname, ssl_handshake_timeout=self.connect_timeout)
        if self.ssl_context is not None:
            if transport.get_extra_info("ssl_object").selected_alpn_protocol() != ALPN_H2:
                transport.abort()
                raise BackendRefused(f"backend {backend.address} did not agree to h2 by ALPN")
        return conn

    def forget(self, conn: "H2BackendConnection") -> None:
        try:
            self.connections.remove(conn)
        except ValueError:
            pass


class H2BackendConnection:
    """An asyncio protocol: one connection to a proto=h2 backend, its ClientSession, its streams."""

    __slots__ = ("owner", "loop", "transport", "session", "closed", "goaway", "reserved", "flush_due")

    def __init__(self, owner: H2Backend) -> None:
        self.owner = owner
        self.loop = owner.loop
        self.transport = None
        self.session = _nghttp2.ClientSession(self)
        self.closed = False
        self.goaway = False             # the backend said GOAWAY: no new stream on this connection
        self.reserved = 0               # BackendStreams made whose request is not submitted yet
        self.flush_due = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.flush()                    # the connection preface and SETTINGS

    def data_received(self, data: bytes) -> None:
        error = self.session.receive(data)
        if error is not None:
            log.debug("HTTP/2 backend %s: %s", self.owner.backend.address, error)
            self.transport.abort()
            return
        self.flush()

    def flush_soon(self) -> None:
        if not self.flush_due:
            self.flush_due = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Writes what libnghttp2 has ready (never inside its own callbacks: it is not reentrant)."""
        self.flush_due = False
        if self.session.receiving or self.closed or self.transport is None:
            return
        data = self.session.pending()
        if isinstance(data, str):
            log.debug("HTTP/2 backend %s: %s", self.owner.backend.address, data)
            self.transport.abort()
            return
        if data:
            self.transport.write(data)
        if self.goaway and not self.session.streams and not self.reserved:
            self.transport.close()

    def pause_writing(self) -> None:
        pass                            # each stream's body is bounded by its window and STREAM_BUFFER_HIGH

    def resume_writing(self) -> None:
        pass

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.owner.forget(self)
        streams = list(self.session.streams.values())
        self.session.streams.clear()
        for stream in streams:
            stream.lost(refused=False)

    # ---- called by the session ---------------------------------------------------------------------------

    def headers(self, stream: "BackendStream", end: bool) -> None:
        stream.header_block(end)

    def body(self, stream: "BackendStream", data: bytes) -> None:
        stream.body(data)

    def body_end(self, stream: "BackendStream") -> None:
        stream.end()

    def stream_closed(self, stream: "BackendStream", error_code: int) -> None:
        if error_code == _nghttp2.NO_ERROR and stream.ended:
            stream.finished()
        else:
            stream.lost(refused=error_code == _nghttp2.REFUSED_STREAM)

    def drained(self, stream: "BackendStream") -> None:
        """A request body went below its low-water mark: the client is read again."""
        if stream.write_paused:
            stream.write_paused = False
            if stream.upstream is not None:
                stream.upstream.resume_writing()

    def goaway_received(self) -> None:
        self.goaway = True
        self.owner.forget(self)


class BackendStream:
    """One request to a proto=h2 backend: the transport of its BackendConnection (write, close, abort,
    pause_reading...) and the stream libnghttp2 reads the request body from (`out`, `out_eof`,
    `trailers`)."""

    __slots__ = ("conn", "upstream", "parser", "stream_id", "url", "authority", "request_fields",
                 "has_body", "is_head", "out", "out_eof", "trailers", "low_water", "write_paused",
                 "fields", "header_size", "status", "chunked", "ended", "closing", "gone", "read_paused",
                 "unconsumed")

    def __init__(self, conn: H2BackendConnection, upstream) -> None:
        self.conn = conn
        self.upstream = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.stream_id = 0
        self.url = b""
        self.authority = None
        self.request_fields: list = []
        self.has_body = False
        self.is_head = False
        self.out = bytearray()
        self.out_eof = False
        self.trailers = None            # request trailers: sent after the body
        self.low_water = STREAM_BUFFER_LOW
        self.write_paused = False
        self.fields: list = []          # the header block being received
        self.header_size = 0            # of every header block received (_nghttp2 bounds what it keeps)
        self.status = 0                 # the final response status, once its head came
        self.chunked = False            # the response goes to the BackendConnection chunked
        self.ended = False              # the whole response went to the BackendConnection
        self.closing = False
        self.gone = False               # the BackendConnection was told the connection is lost
        self.read_paused = False
        self.unconsumed = 0

    # ---- transport (what BackendConnection and ClientConnection call) ------------------------------------

    def write(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # The client side wrote it, so it parses; an upgrade (WebSocket) has no HTTP/2 form here.
            log.debug("request to HTTP/2 backend %s not sent: %s", self.conn.owner.backend.address,
                      "an upgrade" if self.stream_id == 0 else "unparsable")
            self.abort()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.stream_id == 0:
            self._unreserve()
        elif not self.ended and self.stream_id in self.conn.session.streams:
            self.conn.session.reset(self.stream_id, _nghttp2.CANCEL)     # the client went: so does the stream
            self.conn.flush_soon()
        self._tell_lost()

    abort = close

    def is_closing(self) -> bool:
        return self.closing

    def is_reading(self) -> bool:
        return not self.read_paused

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        self.read_paused = False
        if self.unconsumed and self.stream_id in self.conn.session.streams:
            self.conn.session.consume(self.stream_id, self.unconsumed)
            self.unconsumed = 0
            self.conn.flush_soon()

    def get_extra_info(self, name: str, default=None):
        transport = self.conn.transport
        return transport.get_extra_info(name, default) if transport is not None else default

    def _unreserve(self) -> None:
        if self.stream_id == 0 and self.conn.reserved:
            self.conn.reserved -= 1

    def _tell_lost(self) -> None:
        """The BackendConnection hears connection_lost once, after the callback this runs in."""
        if not self.gone and self.upstream is not None:
            self.gone = True
            self.conn.loop.call_soon(self.upstream.connection_lost, None)

    # ---- the request, as the client side wrote it (httptools callbacks) ----------------------------------

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if self.stream_id:                           # after the head: a trailer field
            if self.trailers is None:
                self.trailers = []
            self.trailers.append((name, value))
        elif name == b"host":
            self.authority = value
        elif name == b"content-length":
            self.has_body = value != b"0"
            self.request_fields.append((name, value))
        elif name == b"transfer-encoding":
            self.has_body = True
        elif name not in NOT_FORWARDED:
            self.request_fields.append((name, value))

    def on_headers_complete(self) -> None:
        conn = self.conn
        method = self.parser.get_method()
        self.is_head = method == b"HEAD"
        fields = [(b":method", method), (b":scheme", b"https" if conn.owner.ssl_context else b"http"),
                  (b":authority", self.authority or conn.owner.backend.address.encode()),
                  (b":path", self.url), (b"te", b"trailers")]
        fields += self.request_fields
        self.request_fields = []
        stream_id = conn.session.request(fields, self, self.has_body)
        self._unreserve()
        if isinstance(stream_id, str):
            log.debug("request to HTTP/2 backend %s not sent: %s", conn.owner.backend.address, stream_id)
            self.stream_id = -1
            self.closing = True
            self._tell_lost()
            raise httptools.HttpParserError(stream_id)
        self.stream_id = stream_id
        conn.flush_soon()

    def on_body(self, body: bytes) -> None:
        self.out += body
        self.conn.session.resume(self.stream_id)
        self.conn.flush_soon()
        if len(self.out) > STREAM_BUFFER_HIGH and not self.write_paused and self.upstream is not None:
            self.write_paused = True
            self.upstream.pause_writing()          # the client is not read until the backend takes some

    def on_message_complete(self) -> None:
        if self.has_body:
            self.out_eof = True
            self.conn.session.resume(self.stream_id)
            self.conn.flush_soon()

    # ---- the response, as the backend sends it (H2BackendConnection) -------------------------------------

    def _deliver(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None and not self.closing:
            upstream.data_received(data)

    def header_block(self, end: bool) -> None:
        fields, self.fields = self.fields, []
        if self.header_size > self.conn.session.max_header_list:
            # Fields past the bound were not kept: the response is not passed on without them (502).
            log.debug("response of HTTP/2 backend %s: header fields over %d bytes", self.conn.owner.backend.address,
                      self.conn.session.max_header_list)
            self.conn.session.reset(self.stream_id, _nghttp2.PROTOCOL_ERROR)
            self.conn.flush_soon()
            return
        if self.status:                              # trailers after the body
            self.ended = True
            if self.chunked:
                self._deliver(b"".join([b"0\r\n", *(b"%s: %s\r\n" % field for field in fields), b"\r\n"]))
            return
        status = 0
        has_length = grpc = has_grpc_status = False
        for name, value in fields:
            if name == b":status":
                status = int(value)
            elif name == b"content-length":
                has_length = True
            elif name == b"content-type":
                grpc = value.startswith(b"application/grpc")
            elif name == b"grpc-status":
                has_grpc_status = True
        no_body = self.is_head or status == 204 or status == 304
        # gRPC's Trailers-Only response (a head that ends the stream, with grpc-status): its fields are the
        # call's trailers, content-type aside; they go in the chunked trailer section.
        trailers_only = end and has_grpc_status
        # A body after which trailers may come goes on chunked, the only HTTP/1.1 form with room for them
        # (its content-length left out): a gRPC response's always (its trailers carry the call's status),
        # and any to an HTTP/2 client, which has room for trailers after every body.
        client = self.upstream.client if self.upstream is not None else None
        chunked = not end and not no_body and (
            grpc or not has_length or getattr(client, "takes_trailers", False))   # (H2Stream's; not h1's)
        lines = []
        trailers = []
        for name, value in fields:
            if name[:1] == b":" or chunked and name == b"content-length":
                continue
            elif trailers_only and name != b"content-type":
                trailers.append(b"%s: %s\r\n" % (name, value))
            else:
                lines.append(b"%s: %s\r\n" % (name, value))
        if status < 200:
            # An interim response (103): passed on as HTTP/1.1 would have it.
            self._deliver(b"".join([b"HTTP/1.1 %d \r\n" % status, *lines, b"\r\n"]))
            return
        self.status = status
        head = [b"HTTP/1.1 %d \r\n" % status, *lines, b"connection: close\r\n"]
        rest = b""
        if end:
            self.ended = True
            if trailers_only:
                head.append(b"transfer-encoding: chunked\r\n")
                rest = b"".join([b"0\r\n", *trailers, b"\r\n"])
            elif not has_length and not no_body:
                head.append(b"content-length: 0\r\n")
        elif chunked:
            self.chunked = True
            head.append(b"transfer-encoding: chunked\r\n")
        head.append(b"\r\n")
        self._deliver(b"".join(head) + rest)

    def body(self, data: bytes) -> None:
        if self.read_paused:
            self.unconsumed += len(data)
        else:
            self.conn.session.consume(self.stream_id, len(data))
        self._deliver(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)

    def end(self) -> None:
        self.ended = True
        if self.chunked:
            self._deliver(b"0\r\n\r\n")

    def finished(self) -> None:
        """The stream closed after its whole response: nothing more from this transport."""
        self.closing = True
        self._tell_lost()

    def lost(self, refused: bool) -> None:
        """The stream or its connection ended before the whole response: the BackendConnection fails the
        request (retry or 502 by the one rule). A refused stream was not processed by the backend."""
        if self.unconsumed and not self.conn.closed:
            self.conn.session.consume(0, self.unconsumed)
        self._unreserve()
        upstream = self.upstream
        if refused and upstream is not None and not self.status:
            # RFC 9113 8.7: a refused stream was not processed, so any request may go again (a POST too), and
            # it is not the backend's failure (the keep-alive race's rule, BackendConnection.connection_lost).
            upstream.reused = True
            if upstream.request is not None:
                upstream.request.written = False
        self.closing = True
        self._tell_lost()


# ---- the gRPC health check (`--check grpc`, fastlb/health.py) ------------------------------------------------

GRPC_HEALTH_PATH = b"/grpc.health.v1.Health/Check"
GRPC_SERVING = b"\x08\x01"                          # HealthCheckResponse{status: SERVING}
GRPC_MESSAGE_PREFIX = 5                               # a message's compressed flag and length
GRPC_CHECK_BODY_LIMIT = 4096                          # of an answer a few bytes long, at most this is kept
PROTOBUF_SERVICE_FIELD = b"\x0a"                      # HealthCheckRequest field 1 (service), length-delimited


def health_check_request(service: str) -> bytes:
    """HealthCheckRequest{service} as one gRPC message (uncompressed); an empty service is the whole
    server, encoded as the empty message."""
    name = service.encode()
    message = b""
    if name:
        length = len(name)
        varint = bytearray()
        while length >= 0x80:
            varint.append(length & 0x7F | 0x80)
            length >>= 7
        varint.append(length)
        message = PROTOBUF_SERVICE_FIELD + bytes(varint) + name
    return b"\x00" + len(message).to_bytes(4, "big") + message


class _CheckStream:
    """The health call's stream: its request body for read_body, what came back."""

    __slots__ = ("out", "out_eof", "trailers", "low_water", "fields", "header_size", "body", "done")

    def __init__(self, loop, message: bytes) -> None:
        self.out = bytearray(message)
        self.out_eof = True
        self.trailers = None
        self.low_water = 0
        self.fields: list = []                        # head and trailers together (Trailers-Only or not)
        self.header_size = 0
        self.body = b""
        self.done = loop.create_future()


class _HealthCheckConnection(asyncio.Protocol):
    """A connection that makes one gRPC health call: the ClientSession's owner for it."""

    def __init__(self, loop, authority: bytes, scheme: bytes, message: bytes) -> None:
        self.session = _nghttp2.ClientSession(self)
        self.stream = _CheckStream(loop, message)
        self.authority = authority
        self.scheme = scheme
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.session.request([(b":method", b"POST"), (b":scheme", self.scheme), (b":authority", self.authority),
                              (b":path", GRPC_HEALTH_PATH), (b"content-type", b"application/grpc"),
                              (b"te", b"trailers"), (b"user-agent", b"fastlb-health-check")], self.stream, True)
        self.flush()

    def data_received(self, data: bytes) -> None:
        error = self.session.receive(data)
        if error is not None:
            self._end(f"HTTP/2: {error}")
        self.flush()

    def flush(self) -> None:
        if self.session.receiving or self.transport is None:
            return
        data = self.session.pending()
        if isinstance(data, bytes) and data:
            self.transport.write(data)

    def connection_lost(self, exc) -> None:
        self._end("connection closed before the answer")

    def _end(self, problem: str | None) -> None:
        if not self.stream.done.done():
            self.stream.done.set_result(problem)

    # the ClientSession's owner
    def headers(self, stream, end: bool) -> None:
        pass

    def body(self, stream, data: bytes) -> None:
        if len(stream.body) < GRPC_CHECK_BODY_LIMIT:
            stream.body += data
        self.session.consume(0, len(data))

    def body_end(self, stream) -> None:
        pass

    def stream_closed(self, stream, error_code: int) -> None:
        fields = dict(stream.fields)
        if error_code != _nghttp2.NO_ERROR:
            self._end(f"stream reset (HTTP/2 error {error_code})")
        elif fields.get(b":status") != b"200":
            self._end(f"HTTP {fields.get(b':status', b'?').decode()}, expected 200")
        elif fields.get(b"grpc-status") != b"0":
            message = fields.get(b"grpc-message", b"").decode(errors="replace")
            self._end(f"grpc-status {fields.get(b'grpc-status', b'none').decode()}{': ' if message else ''}{message}")
        elif stream.body[GRPC_MESSAGE_PREFIX:] != GRPC_SERVING:
            self._end("not SERVING")
        else:
            self._end(None)

    def drained(self, stream) -> None:
        pass

    def goaway_received(self) -> None:
        pass


async def grpc_health_check(loop, host: str, port: int, authority: str, service: str = "",
                            context: ssl.SSLContext | None = None, server_name: str | None = None) -> str | None:
    """None when the server answers SERVING for `service`, else why not (the caller bounds the time).
    With `context`, over TLS (ALPN h2, `server_name` sent and verified)."""
    message = health_check_request(service)
    factory = functools.partial(_HealthCheckConnection, loop, authority.encode(),
                                b"https" if context else b"http", message)
    if context is None:
        transport, conn = await loop.create_connection(factory, host, port)
    else:
        transport, conn = await loop.create_connection(factory, host, port, ssl=context,
                                                       server_hostname=server_name)
    try:
        if context is not None and transport.get_extra_info("ssl_object").selected_alpn_protocol() != ALPN_H2:
            return "TLS: the backend did not agree to h2 by ALPN"
        return await conn.stream.done
    finally:
        transport.abort()
