"""HTTP/2 client connections (h2 by ALPN on TLS binds, h2c with prior knowledge on plain ones), served by
the HTTP data path: each stream is one request of fastlb/http/protocol.py's kind, sent to HTTP/1.1
backends through the same pools and idle connections.

The seam: `H2Stream` is a `ClientConnection` with one request. libnghttp2 (fastlb/http2/_nghttp2.pyx)
decodes and checks the stream's header list; `H2Connection.request` writes it as an HTTP/1.1 request head
(the checks below on top of the library's), and the stream parses it as if a client had sent it, so
routing, per-request balancing, sticky sessions, header rules, X-Forwarded-*, limits, admission, retries
(fastlb/http/reuse.py), timeouts, the access log and metrics are the HTTP/1.1 path's, unchanged. A
`BackendConnection` serves the stream as it serves any client; what it writes to the stream's transport
(`ResponseSink`) is an HTTP/1.1 response, turned into a response head (connection-specific fields out) and
DATA frames. The H2Connection is the one entry in the runtime's connections (the data path's live count
and sweep); its streams' deadlines are looked at when the sweep visits it.

Memory per connection is bounded: streams by SETTINGS_MAX_CONCURRENT_STREAMS (_nghttp2 refuses more),
a header list by max_header_list_size (fields beyond it are not kept: 431), a request body by the stream
window (WINDOW_UPDATE only for what went on to the backend, see ResponseSink.pause_reading), a response
body by STREAM_BUFFER_HIGH (the backend is not read further until the client takes it), and the frames
queued for a client that does not read by the transport's high-water mark (reading from that client
stops too).
"""
from __future__ import annotations

import logging
import re

import httptools

from fastlb.constants import WAIT_NONE, WAIT_STREAMS
from fastlb.http.protocol import ClientConnection
from fastlb.http2 import _nghttp2
from fastlb.http2.common import CONNECTION_SPECIFIC, STREAM_BUFFER_HIGH, STREAM_BUFFER_LOW

log = logging.getLogger("fastlb")

ALPN_H2 = "h2"

# A :path or :method byte that could not stay inside an HTTP/1.1 request line (white space, controls).
LINE_BREAKER = re.compile(rb"[\x00-\x20\x7f]")


# gRPC's grpc-timeout (PROTOCOL-HTTP2.md): at most 8 digits and a unit.
GRPC_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
GRPC_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
GRPC_DEADLINE_EXCEEDED = b"4"        # grpc-status DEADLINE_EXCEEDED


def grpc_timeout(value: bytes) -> float | None:
    """A grpc-timeout value in seconds; None when it is not one (the field then goes on, unheeded)."""
    match = GRPC_TIMEOUT.fullmatch(value)
    if match is None:
        return None
    return int(match.group(1)) * GRPC_TIMEOUT_UNITS[match.group(2)]


class H2Settings:
    """The HTTP/2 limits (config fields h2_*), read once per worker, and the switch to HTTP/2 (the
    runtime's `h2`: fastlb/http/protocol.py calls `switch` without importing this module)."""

    __slots__ = ("max_concurrent_streams", "max_header_list_size", "initial_window_size",
                 "connection_window_size", "max_control_frames")

    def __init__(self, config) -> None:
        self.max_concurrent_streams = config.h2_max_concurrent_streams
        self.max_header_list_size = config.h2_max_header_list_size
        self.initial_window_size = config.h2_initial_window_size
        # The connection's window: every stream's at once, up to 16 of them.
        self.connection_window_size = min(2 ** 31 - 1, self.initial_window_size * 16)
        self.max_control_frames = config.h2_max_control_frames

    def switch(self, origin: ClientConnection, data: bytes) -> None:
        """The connection speaks HTTP/2 (the preface read, or ALPN h2): its protocol becomes an
        H2Connection, fed `data` (what was read, preface included)."""
        connection = H2Connection(origin, self)
        origin.transport.set_protocol(connection)
        if data:
            connection.data_received(data)
        else:
            connection.flush()                                 # the server's SETTINGS go first


class _StreamBind:
    """What ClientConnection reads of a bind; the stream's TLS details are copied from its connection."""

    __slots__ = ("ssl", "ca", "redirect_https")

    def __init__(self, ssl: bool) -> None:
        self.ssl = ssl
        self.ca = None
        self.redirect_https = None


class ResponseSink:
    """A stream's transport, as BackendConnection and ClientConnection see it: the HTTP/1.1 response
    written to it becomes the stream's response; close and abort end the stream."""

    __slots__ = ("stream", "parser", "fields", "status", "submitted", "ended", "interim", "skip_body")

    def __init__(self, stream: "H2Stream") -> None:
        self.stream = stream
        self.parser = httptools.HttpResponseParser(self)
        self.fields: list = []
        self.status = 0
        self.submitted = False          # the response head went to libnghttp2
        self.ended = False              # nothing more will be written
        self.interim = False
        self.skip_body = False

    # ---- transport ------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        stream = self.stream
        if self.ended or stream.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self.skip_body:      # after a head that has no body, the rest is none of ours
                self.abort()
                return
        stream.conn.flush_soon()

    def close(self) -> None:
        """The response is over (ClientConnection.finished): a body read until its backend closed ends
        here; a stream that got no response at all is cancelled."""
        if self.ended:
            return
        self.ended = True
        stream = self.stream
        if stream.closed:
            return
        if not self.submitted:
            stream.conn.session.reset(stream.stream_id, _nghttp2.CANCEL)
        elif not stream.out_eof:
            stream.out_eof = True
            stream.conn.session.resume(stream.stream_id)
        stream.conn.flush_soon()

    def abort(self) -> None:
        """A response cut short (a backend that failed mid-body, a timeout): the client sees a reset."""
        if self.ended:
            return
        self.ended = True
        stream = self.stream
        if not stream.closed:
            stream.conn.session.reset(stream.stream_id, _nghttp2.INTERNAL_ERROR)
            stream.conn.flush_soon()

    def is_closing(self) -> bool:
        return self.ended

    def pause_reading(self) -> None:
        self.stream.read_paused = True

    def resume_reading(self) -> None:
        stream = self.stream
        stream.read_paused = False
        if stream.unconsumed and not stream.closed:
            stream.conn.session.consume(stream.stream_id, stream.unconsumed)
            stream.unconsumed = 0
            stream.conn.flush_soon()

    def get_extra_info(self, name: str, default=None):
        return self.stream.conn.transport.get_extra_info(name, default)

    # ---- httptools callbacks: the backend's response, already checked by BackendConnection ---------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in CONNECTION_SPECIFIC:
            return
        if self.status:                  # trailers of a chunked response (gRPC's grpc-status): sent after the body
            stream = self.stream
            if stream.trailers is None:
                stream.trailers = []
            stream.trailers.append((name, value))
        else:
            self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        stream = self.stream
        if status < 200:
            # An interim response (103 Early Hints, fastlb's own 100 Continue): a HEADERS frame before the
            # final one. What reaches this sink is what the HTTP/1.1 path forwards (not a backend's 100).
            self.interim = True
            stream.conn.session.inform(stream.stream_id, b"%d" % status, self.fields)
            self.fields = []
            return
        self.status = status
        req = stream.queue[0] if stream.queue else None
        has_body = not (status == 204 or status == 304 or req is not None and req.is_head)
        self.submitted = True
        stream.conn.session.respond(stream.stream_id, b"%d" % status, self.fields, has_body)
        self.fields = []
        if not has_body:
            self.ended = True
            self.skip_body = True
            raise _HeadOnly()            # stops the parser: a HEAD response's length announces no bytes

    def on_body(self, body: bytes) -> None:
        if self.interim:
            return
        stream = self.stream
        stream.out += body
        if len(stream.out) > STREAM_BUFFER_HIGH and not stream.write_paused:
            stream.write_paused = True
            stream.pause_writing()       # ClientConnection's: the backend connection stops being read
        stream.conn.session.resume(stream.stream_id)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        stream = self.stream
        stream.out_eof = True
        self.ended = True
        stream.conn.session.resume(stream.stream_id)


class _HeadOnly(Exception):
    """Raised in on_headers_complete to stop parsing a response that has no body."""


class H2Stream(ClientConnection):
    """One HTTP/2 stream: a ClientConnection that is sent one HTTP/1.1 request, made from the stream's
    header list, and whose transport is a ResponseSink."""

    __slots__ = ("conn", "stream_id", "fields", "header_size", "chunked", "out", "out_eof", "low_water",
                 "read_paused", "write_paused", "unconsumed", "opened", "trailers", "trailers_in",
                 "grpc_deadline")

    # An HTTP/2 client has room for trailers after any body: a proto=h2 backend's response goes to it in a
    # form that keeps them (fastlb/http2/backend.py: BackendStream.header_block).
    takes_trailers = True

    def __init__(self, conn: "H2Connection", stream_id: int) -> None:
        super().__init__(conn.runtime, conn.bind)
        origin = conn.origin
        self.conn = conn
        self.stream_id = stream_id
        self.fields = []
        self.header_size = 0
        self.chunked = False
        self.out = bytearray()
        self.out_eof = False
        self.low_water = STREAM_BUFFER_LOW
        self.read_paused = False
        self.write_paused = False
        self.unconsumed = 0
        self.opened = conn.runtime.now              # its header block must be whole within http_request_timeout
        self.trailers = None                        # response trailers, sent after the body (_nghttp2.read_body)
        self.trailers_in = []                       # request trailers, received after the body
        self.grpc_deadline = 0.0                    # a gRPC call's grpc-timeout, as a loop time (0: none)
        self.head_started = -1.0                    # (not 0: a stream's bytes are never a connection preface)
        self.transport = ResponseSink(self)
        self.client_ip = origin.client_ip
        self.forward_block = origin.forward_block
        self.tls_block = origin.tls_block
        self.scheme = origin.scheme
        self.redirect = origin.redirect
        self.parser = httptools.HttpRequestParser(self)


class H2Connection:
    """An asyncio protocol for one HTTP/2 client connection (it replaces the connection's
    ClientConnection when the preface or ALPN says HTTP/2)."""

    __slots__ = ("runtime", "settings", "loop", "transport", "session", "origin", "bind", "client_ip",
                 "closed", "deadline", "deadline_kind", "admitted", "write_paused",
                 "idle_since", "goaway_sent", "flush_due")

    def __init__(self, origin: ClientConnection, h2: H2Settings) -> None:
        runtime = origin.runtime
        self.runtime = runtime
        self.settings = h2
        self.loop = origin.loop
        self.transport = origin.transport
        self.origin = origin
        self.bind = _StreamBind(origin.tls)
        self.client_ip = origin.client_ip
        self.closed = False
        self.deadline = 0.0
        self.deadline_kind = WAIT_STREAMS
        # The connection's admission count (connections per source) moves here from the ClientConnection.
        self.admitted = origin.admitted
        origin.admitted = False
        origin.parser = None
        origin.closed = True
        origin.deadline_kind = WAIT_NONE
        runtime.connections.discard(origin)
        runtime.connections.add(self)
        self.write_paused = False
        self.idle_since = runtime.now
        self.goaway_sent = False
        self.flush_due = False
        self.session = _nghttp2.Session(self, h2.max_concurrent_streams, h2.max_header_list_size,
                                        h2.initial_window_size, h2.connection_window_size,
                                        h2.max_control_frames)

    # ---- the connection ----------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.runtime.now = self.loop.time()
        error = self.session.receive(data)
        if error is not None:
            log.debug("HTTP/2 connection from %s: %s", self.client_ip.decode(), error)
        self.flush()
        if error is not None:
            self.transport.close()

    def flush_soon(self) -> None:
        """Frames are ready (a backend's response): written at the end of this turn of the event loop, so
        the responses of the streams that came in one turn leave in one write."""
        if not self.flush_due:
            self.flush_due = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Writes the frames libnghttp2 has ready (not while it is reading: it is not reentrant, and the
        read ends with a flush); none while the client does not read."""
        self.flush_due = False
        if self.session.receiving or self.write_paused or self.closed:
            return
        data = self.session.pending()
        if isinstance(data, str):
            log.debug("HTTP/2 connection from %s: %s", self.client_ip.decode(), data)
            self.transport.abort()
            return
        if data:
            self.transport.write(data)
        if self.session.done:
            self.transport.close()

    def pause_writing(self) -> None:
        # A client that does not read what it asked for: nothing more is read from it either.
        self.write_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.closed:
            self.transport.resume_reading()
            self.flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        self.closed = True
        runtime = self.runtime
        runtime.forget(self)
        if self.admitted:
            self.admitted = False
            runtime.admission.limiter.leave_ip(self.client_ip)
        streams = list(self.session.streams.values())
        self.session.streams.clear()
        for stream in streams:
            stream.connection_lost(None)

    def close(self) -> None:
        """Ends the connection now (grace period over)."""
        for stream in list(self.session.streams.values()):
            stream.close()
        self.transport.abort()

    # ---- the sweep ---------------------------------------------------------------------------------------

    def on_deadline(self, now: float) -> None:
        """Visited by every sweep: its streams' deadlines, its own idleness, draining."""
        self.deadline_kind = WAIT_STREAMS
        streams = self.session.streams
        head_deadline = now - self.runtime.settings.http_request_timeout
        for stream in list(streams.values()):
            if stream.fields is not None and stream.opened <= head_deadline:
                # A header block still not whole (slowloris): nothing else may come on the connection
                # until it is (RFC 9113 6.10), so the connection ends.
                self.session.goaway(_nghttp2.PROTOCOL_ERROR)
                self.flush()
                self.transport.close()
                return
            if stream.grpc_deadline and stream.grpc_deadline <= now:
                self.deadline_exceeded(stream)
            elif stream.deadline_kind and stream.deadline <= now:
                stream.on_deadline(now)
        if not streams:
            draining = self.runtime.draining
            if draining or now - self.idle_since >= self.runtime.settings.keepalive_timeout:
                if not self.goaway_sent:
                    self.goaway_sent = True
                    self.session.goaway(_nghttp2.NO_ERROR)
                self.flush()
                self.transport.close()
                return
        elif self.runtime.draining and not self.goaway_sent:
            self.goaway_sent = True
            self.session.goaway(_nghttp2.NO_ERROR)     # the open streams finish; no new one
        self.flush()

    # ---- called by the session ---------------------------------------------------------------------------

    def new_stream(self, stream_id: int) -> H2Stream:
        return H2Stream(self, stream_id)

    def headers(self, stream: H2Stream, end: bool) -> None:
        """A header list is whole. The request's: checked, written as an HTTP/1.1 request head and parsed
        by the stream (its body follows, re-framed, in `body`). Trailers (`fields` is None by then): they
        end the body."""
        if stream.fields is None:
            if end:
                self.body_end(stream)
            return
        if self.goaway_sent:
            stream.fields = None
            self.session.reset(stream.stream_id, _nghttp2.REFUSED_STREAM)
            return
        if stream.header_size > self.settings.max_header_list_size:
            self._refuse(stream, 431)
            return
        method = path = authority = host = content_length = None
        lines = []
        cookies = None
        for name, value in stream.fields:
            if name[0] == 58:                              # ':' (libnghttp2 checked the set)
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
            elif name == b"host":
                host = value
            elif name == b"cookie":
                # RFC 9113 8.2.3: split cookie fields are joined with "; " for HTTP/1.1.
                cookies = value if cookies is None else cookies + b"; " + value
            elif name == b"te":
                continue                                   # "trailers" only (libnghttp2): hop-by-hop
            else:
                if name == b"grpc-timeout":
                    timeout = grpc_timeout(value)
                    if timeout is not None:
                        stream.grpc_deadline = self.runtime.now + timeout
                if name == b"content-length":
                    content_length = value
                lines += (name, b": ", value, b"\r\n")
        stream.fields = None
        if authority is not None and host is not None and host != authority:
            # RFC 9113 8.3.1: a Host naming another origin than :authority.
            self._refuse(stream, 400)
            return
        if method is None or LINE_BREAKER.search(method) or (
                path is not None and (LINE_BREAKER.search(path) or path[:1] not in (b"/", b"*"))):
            self._refuse(stream, 400)
            return
        if path is None:                                   # CONNECT: refused by the request parser (405)
            path = authority or b"/"
        head = [method, b" ", path, b" HTTP/1.1\r\n"]
        target = authority if authority is not None else host
        if target is not None:
            head += (b"Host: ", target, b"\r\n")
        head += lines
        if cookies is not None:
            head += (b"Cookie: ", cookies, b"\r\n")
        # The stream ends with its response: the request parser sees a last request.
        head.append(b"Connection: close\r\n")
        if content_length is None and not end:
            stream.chunked = True                          # a body of unannounced length: re-framed
            head.append(b"Transfer-Encoding: chunked\r\n")
        head.append(b"\r\n")
        self.idle_since = self.runtime.now
        stream.data_received(b"".join(head))

    def deadline_exceeded(self, stream: H2Stream) -> None:
        """A gRPC call past its grpc-timeout: its backend request is let go (its slot back, the backend
        stream or connection closed) and the client gets DEADLINE_EXCEEDED, as a Trailers-Only response
        when nothing of the backend's reached it yet, else a reset (CANCEL)."""
        stream.grpc_deadline = 0.0
        sink = stream.transport
        if stream.queue:
            req = stream.queue[0]
            if req.upstream is not None:
                req.upstream.abandon()
                req.upstream = None
            if stream.connect_task is not None:
                stream.connect_task.cancel()
                stream.connect_task = None
            stream.queue.clear()
        stream.deadline_kind = WAIT_NONE
        stream.parser = None
        if sink.ended:
            return
        sink.ended = True
        if sink.submitted:
            self.session.reset(stream.stream_id, _nghttp2.CANCEL)
        else:
            sink.submitted = True
            stream.out_eof = True
            self.session.respond(stream.stream_id, b"200", [(b"content-type", b"application/grpc"),
                                                            (b"grpc-status", GRPC_DEADLINE_EXCEEDED),
                                                            (b"grpc-message", b"deadline exceeded in fastlb")],
                                 False)
        self.flush_soon()

    def _refuse(self, stream: H2Stream, status: int) -> None:
        """A request refused before it reached the request parser: answered `status` at once."""
        stream.fields = None
        stream.transport.ended = True
        stream.out_eof = True
        stream.parser = None
        self.session.respond(stream.stream_id, b"%d" % status, [(b"content-length", b"0")], False)

    def body(self, stream: H2Stream, data: bytes) -> None:
        if stream.parser is None or stream.closed:
            self.session.consume(stream.stream_id, len(data))
            return
        if stream.chunked:
            stream.data_received(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            stream.data_received(data)
        if stream.read_paused:
            stream.unconsumed += len(data)
        else:
            self.session.consume(stream.stream_id, len(data))

    def body_end(self, stream: H2Stream) -> None:
        if stream.chunked and stream.parser is not None and not stream.closed:
            # Request trailers (libnghttp2 checked them as it checks a header list) end the chunked body.
            stream.data_received(b"".join([b"0\r\n", *(b"%s: %s\r\n" % field for field in stream.trailers_in),
                                           b"\r\n"]))
        stream.trailers_in = []

    def goaway_received(self) -> None:
        """The client opens no new stream; libnghttp2 knows, and the open ones finish."""

    def drained(self, stream: H2Stream) -> None:
        """The client took a response's body below the low-water mark: the backend is read again."""
        if stream.write_paused:
            stream.write_paused = False
            stream.resume_writing()

    def stream_closed(self, stream: H2Stream, error_code: int) -> None:
        """The stream is over (its response sent, or reset by either side)."""
        self.idle_since = self.runtime.now
        if stream.unconsumed:
            self.session.consume(0, stream.unconsumed)     # its share of the connection's window
            stream.unconsumed = 0
        sink = stream.transport
        delivered = sink.submitted and stream.out_eof and error_code == _nghttp2.NO_ERROR
        sink.ended = True                                  # what the backend still sends goes nowhere
        if not delivered and not stream.closed:
            # A request in flight: its backend connection is let go, after the protocol callback this
            # may run in (libnghttp2 closes streams while writing too, inside a backend's data_received).
            self.loop.call_soon(stream.connection_lost, None)

