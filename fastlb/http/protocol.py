# cython: annotation_typing=False
"""The HTTP/1.1 client side: parse requests, route them, hand them to backends, answer in order.

One `ClientConnection` per accepted socket. httptools (llhttp, strict mode) parses the requests; the few
things it lets through that RFC 9112 forbids (HTTP/0.9 and 2.0 request lines, Transfer-Encoding in an
HTTP/1.0 request, a missing or repeated Host, an invalid Host value) are checked here. A refused request
is answered with a short error and the connection is closed: after a framing error, nothing that
follows on the connection can be trusted.

Per request, the head for the backend is built once as a list of byte pieces (request line, the
client's headers minus hop-by-hop ones, X-Forwarded-*, the framing) and joined with the first part of
the body, so a small request is one `write` to the backend. Bodies stream: Content-Length bodies as
they come, chunked bodies re-framed chunk by chunk (trailers dropped), never buffered whole. Pipelined
requests queue behind the one in flight (`queue[0]`) and are answered in order; reading pauses while
the queue or the bytes held for it are over their limits.

Timeouts cost nothing per request beyond storing a deadline: a periodic sweep (`HttpRuntime.sweep`)
looks at each connection's `deadline` and `deadline_kind` (waiting for a request head, idle between
requests, waiting for a backend, tunnel idle). Retries follow the issue's rules: a failed connect goes
to the next candidate inside `BackendPool.connect`; a request whose connection failed afterwards is
sent again only if no byte of the response reached the client, we still hold its bytes, and it is
idempotent or nothing of it was written.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from time import monotonic

import httptools

from fastlb import tls
from fastlb.constants import PAUSE_QUEUE, WAIT_BACKEND, WAIT_HEAD, WAIT_IDLE, WAIT_NONE, WAIT_TUNNEL
from fastlb.http import errors
from fastlb.http.headers import (H_CONNECTION, H_CONTENT_LENGTH, H_COOKIE, H_DROP, H_EXPECT, H_FORWARDED_FOR, H_HOST,
                                 H_REJECT, H_TRANSFER_ENCODING, H_UPGRADE, IDEMPOTENT_METHODS,
                                 connection_tokens, valid_host)
from fastlb.http.reuse import may_send_again
from fastlb.http2 import PREFACE
from fastlb.pool import NoBackendError, QueueError

log = logging.getLogger("fastlb")

HttpParserError = httptools.HttpParserError
HttpParserUpgrade = httptools.HttpParserUpgrade
HttpParserCallbackError = httptools.HttpParserCallbackError
RequestError = errors.RequestError

MAX_PIPELINE = 32              # requests parsed ahead of the one in flight
MAX_HELD_BYTES = 256 * 1024    # request bytes held for a request not yet handed to a backend
REPLAY_LIMIT = 64 * 1024       # bytes of a request kept so it can be re-sent to another backend


class Request:
    """One request: how it was framed, where it goes, and the bytes not yet written to a backend."""

    __slots__ = (
        # parsed
        "method", "url", "host", "http10", "keep_alive", "idempotent", "is_head", "chunked",
        "content_length", "body_received", "complete", "upgrade", "expect_continue", "captured",
        # trailer fields of a chunked body, passed on after it (None: none)
        "trailers",
        # routing; session persistence: the pinned backend, the key to record, the client's valid cookie
        "route", "key", "tried", "pinned", "sticky_key", "sticky_cookie",
        # outgoing bytes: out[flushed:] not yet written; out[:flushed] kept for a replay
        "out", "flushed", "out_size", "replayable", "written",
        # progress
        "error", "upstream", "sent_at", "response_started", "continue_sent", "close_after",
        # hook for later features (sticky cookies): header lines added to the response head
        "extra_response_headers",
        # accounting (fastlb/observe.py): the backend that answered, the status and bytes sent to the
        # client, when the head began (loop clock); sent_mono / response_seconds only with an observer
        "backend", "status", "bytes_out", "started", "sent_mono", "response_seconds",
        # admission control: error 429's Retry-After (seconds until allowed)
        "retry_after",
    )

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.host = None
        self.http10 = False
        self.keep_alive = True
        self.idempotent = True
        self.is_head = False
        self.chunked = False
        self.trailers = None
        self.content_length = None
        self.body_received = 0
        self.complete = False
        self.upgrade = None
        self.expect_continue = False
        self.captured = None
        self.route = None
        self.key = None
        self.tried = []
        self.pinned = None
        self.sticky_key = None
        self.sticky_cookie = None
        self.out = []
        self.flushed = 0
        self.out_size = 0
        self.replayable = True
        self.written = False
        self.error = 0
        self.upstream = None
        self.sent_at = 0.0
        self.response_started = False
        self.continue_sent = False
        self.close_after = False
        self.extra_response_headers = b""
        self.backend = None
        self.status = 0
        self.bytes_out = 0
        self.started = 0.0
        self.sent_mono = 0.0
        self.response_seconds = -1.0
        self.retry_after = 0.0

    def written_whole(self) -> bool:
        """The request went to its backend whole: read to its end and every byte of it written (what a
        backend connection's reuse and a 101's acceptance both need)."""
        return self.complete and self.flushed == len(self.out)


class ClientConnection:      # an asyncio protocol (duck-typed: compiled, it is an extension type)
    __slots__ = (
        # shared
        "runtime", "settings", "loop",
        # per connection
        "transport", "parser", "client_ip", "forward_block", "queue", "closed", "closing", "paused",
        "connect_task", "deadline", "deadline_kind", "tunnel", "tunnel_buffer", "tunnel_active",
        "peer",
        # the bind: TLS (scheme, client subject header), or a redirect to HTTPS
        "tls", "mtls", "scheme", "tls_block", "redirect",
        # the request being parsed
        "req", "parts", "url_parts", "url_size", "header_size", "header_count", "head_done",
        "conn_tokens", "head_started", "checked_host",
        # a connection the C engine hands over (fastlb/http/fast.py): bytes it read, and the request
        # in flight with its backend connection (upstream, backend, sent_at)
        "pending_input", "adopting",
        # a TLS connection the C engine hands over because ALPN chose h2 (a socketpair cannot tell)
        "alpn_h2",
        # body bytes of an Upgrade request still to read (llhttp stops at the head: see upgrade_body)
        "upgrade_body_left",
        # counted in the admission table's connections per source (fastlb/admission.py); the rate
        # limits of the first request checked by the C engine before it handed the connection over
        "admitted", "limits_checked",
    )

    def __init__(self, runtime, bind) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.loop = runtime.loop
        self.transport = None
        self.parser = None
        self.client_ip = b""
        self.forward_block = b""
        self.queue: collections.deque[Request] = collections.deque()
        self.closed = False
        self.closing = False           # no further request will be read (Connection: close, errors)
        self.paused = 0
        self.connect_task = None
        self.deadline = 0.0
        self.deadline_kind = WAIT_NONE
        self.tunnel = False
        self.tunnel_buffer = None
        self.tunnel_active = False
        self.peer = None               # the backend transport while tunnelling
        self.req = None
        self.parts = None
        self.url_parts = None
        self.url_size = 0
        self.header_size = 0
        self.header_count = 0
        self.head_done = False
        self.conn_tokens = None
        self.head_started = 0.0
        self.checked_host = b""        # the last Host value found valid on this connection
        self.tls = bind.ssl
        self.mtls = bind.ssl and bind.ca is not None
        self.scheme = b"https" if bind.ssl else b"http"
        self.tls_block = b""           # X-Client-Subject on mTLS binds, set once per connection
        # A plain bind that redirects every request to HTTPS: the port part of the Location (b"": 443).
        port = bind.redirect_https
        self.redirect = None if port is None else (b"" if port == 443 else b":%d" % port)
        self.pending_input = None
        self.adopting = None
        self.alpn_h2 = False
        self.upgrade_body_left = 0
        self.admitted = False
        self.limits_checked = False

    # ---- connection ----------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self.client_ip:          # (set already for a TLS connection the C engine hands over)
            peer = transport.get_extra_info("peername")
            self.client_ip = peer[0].encode() if peer else b""
        admission = self.runtime.admission
        if admission is not None and not self.admitted and not admission.admit_http(self):
            return                       # refused (lists, connections per source): closed
        settings = self.settings
        self.forward_block = settings.forward_block_for(self.client_ip, self.scheme)
        if self.mtls:
            # connection_made comes after the handshake: the peer certificate (verified) is known.
            info = tls.connection_tls_info(transport)
            if info is not None and info.client_subject is not None:
                self.tls_block = client_subject_block(info.client_subject)
        self.parser = httptools.HttpRequestParser(self)
        self.runtime.connections.add(self)
        if self.tls and self.runtime.h2 is not None and (self.alpn_h2 or tls.negotiated_h2(transport)):
            self.runtime.h2.switch(self, b"")      # ALPN chose HTTP/2
            return
        # A new connection must send its first request head within http_request_timeout.
        self.deadline = self.loop.time() + settings.http_request_timeout
        self.deadline_kind = WAIT_HEAD
        pending = self.pending_input
        if pending is not None:
            # From the C engine: parsed before uvloop reads anything more from the socket.
            self.pending_input = None
            if self.adopting is not None:
                self.take_adopted(pending)
            elif pending:
                self.data_received(pending)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.admitted:
            self.admitted = False
            self.runtime.admission.limiter.leave_ip(self.client_ip)
        self.runtime.forget(self)
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        if self.queue:
            upstream = self.queue[0].upstream
            if upstream is not None:
                upstream.abandon()    # mid-request: the backend connection cannot be reused
        self.queue.clear()

    def close(self) -> None:
        """Ends the connection now (timeouts, grace period over)."""
        if self.queue and self.queue[0].upstream is not None:
            self.queue[0].upstream.abandon()
        if self.peer is not None:
            self.peer.abort()
        self.transport.abort()

    def pause_writing(self) -> None:
        # The client reads slower than the backend answers: stop reading the backend.
        if self.tunnel:
            self.peer.pause_reading()
        elif self.queue and self.queue[0].upstream is not None and self.queue[0].upstream.transport is not None:
            self.queue[0].upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.tunnel:
            self.peer.resume_reading()
        elif self.queue and self.queue[0].upstream is not None and self.queue[0].upstream.transport is not None:
            self.queue[0].upstream.transport.resume_reading()

    def pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.transport.resume_reading()

    # ---- reading requests ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            self.peer.write(data)
            self.tunnel_active = True
            return
        if self.head_started == 0.0 and self.runtime.h2 is not None and self.h2_preface(data):
            return                                    # the first bytes of an HTTP/2 connection
        # One clock read per read: every deadline set while handling these bytes uses runtime.now.
        self.runtime.now = self.loop.time()
        parser = self.parser
        if parser is None:
            if self.tunnel_buffer is None:
                return                                # after an error or a final request: ignored
            self.hold_for_tunnel(data)
        else:
            self.feed(parser, data)
        if self.queue:
            req = self.queue[0]
            if req.upstream is not None and req.flushed < len(req.out):
                self.flush_request(req)

    def h2_preface(self, data: bytes) -> bool:
        """Before a connection's first request: HTTP/2 with prior knowledge (RFC 9113 3.3) begins with
        the connection preface; the connection then becomes HTTP/2 (fastlb/http2/connection.py). The start
        of a preface split over reads is held. False: HTTP/1.1, parsed as usual."""
        held = self.pending_input
        if held is not None:
            self.pending_input = None
            data = held + data
        elif data[:1] != b"P":
            return False
        if data.startswith(PREFACE):
            self.runtime.h2.switch(self, data)
            return True
        if len(data) < len(PREFACE) and PREFACE.startswith(data):
            self.pending_input = data
            return True
        if held is not None:
            # Not a preface after all: the held bytes and these go to the request parser (head_started
            # set: not looked at again; on_message_begin sets the real one).
            self.head_started = -1.0
            self.data_received(data)
            return True
        return False

    def feed(self, parser, data: bytes) -> None:
        try:
            parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self.parser = None
            self.tunnel_buffer = []
            if exc.args and exc.args[0] < len(data):
                self.hold_for_tunnel(data[exc.args[0]:])
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            self.refuse(cause.status if isinstance(cause, RequestError) else 400)
            if not isinstance(cause, RequestError):
                raise
        except HttpParserError as exc:
            log.debug("bad request from %s: %s", self.client_ip, exc)
            self.refuse(400)

    def hold_for_tunnel(self, data: bytes) -> None:
        """Bytes after an Upgrade request's head: first the rest of its body, then what belongs to the
        protocol asked for, held until the backend answers 101 (start_tunnel) or not (closed)."""
        if self.upgrade_body_left:
            data = self.upgrade_body(data)
        if data:
            self.tunnel_buffer.append(data)
            self.pause(PAUSE_QUEUE)

    def upgrade_body(self, data: bytes) -> bytes:
        """llhttp does not parse an Upgrade request's body (it stops at the head); RFC 9110 7.8 says the
        request, body included, is complete before any switch. So the body is read here by its
        Content-Length (a chunked one was refused at the head) and forwarded like any other; the
        request is complete after it. Returns the bytes after the body."""
        left = self.upgrade_body_left
        body = data if len(data) <= left else data[:left]
        self.upgrade_body_left = left - len(body)
        try:
            self.on_body(body)
        except RequestError as exc:
            self.refuse(exc.status)
            return b""
        if not self.upgrade_body_left:
            self.complete_request(self.req)
        return data[len(body):]

    def on_message_begin(self) -> None:
        if self.closing:
            raise RequestError(400, "request after Connection: close")
        self.req = Request()
        self.parts = []
        self.url_parts = []
        self.url_size = 0
        self.header_size = 0
        self.header_count = 0
        self.head_done = False
        self.conn_tokens = None
        now = self.runtime.now
        if not self.queue:
            # The head must now arrive within http_request_timeout (slowloris).
            self.deadline = now + self.settings.http_request_timeout
            self.deadline_kind = WAIT_HEAD
        self.head_started = now

    def on_url(self, url: bytes) -> None:
        self.url_size += len(url)
        if self.url_size > self.settings.max_uri_length:
            raise RequestError(414, "URI too long")
        self.url_parts.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        settings = self.settings
        self.header_size += len(name) + len(value) + 4
        self.header_count += 1
        if self.header_size > settings.max_header_size or self.header_count > settings.max_headers:
            raise RequestError(431, "request headers too large")
        lname = name.lower()
        action = settings.request_actions.get(lname)
        if self.head_done:
            # A trailer field (counted against the limits): passed on after a chunked body, but not the
            # fields fastlb acts on (framing, Host...): those are dropped.
            req = self.req
            if action is None and req is not None and req.chunked:
                if req.trailers is None:
                    req.trailers = []
                req.trailers += (name, b": ", value, b"\r\n")
            return
        if action is None:
            self.parts += (name, b": ", value, b"\r\n")
            if settings.capture and lname in settings.capture:
                self._capture(lname, value)
            return
        req = self.req
        if action == H_DROP:
            return
        if action == H_HOST:
            if req.host is not None:
                raise RequestError(400, "more than one Host header")
            # A keep-alive client sends the same Host every time: check it once per connection.
            if value != self.checked_host:
                if not valid_host(value):
                    raise RequestError(400, "invalid Host header")
                self.checked_host = value
            req.host = value
        elif action == H_CONNECTION:
            tokens = connection_tokens(value)
            self.conn_tokens = tokens if self.conn_tokens is None else self.conn_tokens + tokens
        elif action == H_CONTENT_LENGTH:
            # llhttp has refused duplicates, signs, spaces and non-digits; it is only the size left.
            req.content_length = value
        elif action == H_TRANSFER_ENCODING:
            if value.strip().lower() != b"chunked":
                # llhttp lets "gzip, chunked" through; fastlb forwards only plain chunked framing.
                raise RequestError(400, "Transfer-Encoding other than chunked")
            req.chunked = True
        elif action == H_UPGRADE:
            req.upgrade = value
        elif action == H_EXPECT:
            if value.strip().lower() != b"100-continue":
                raise RequestError(417, "unsupported Expect")
            req.expect_continue = True
        elif action == H_REJECT:
            raise RequestError(400, "framing header spelt with '_'")
        elif action == H_COOKIE:
            self._capture(lname, value)            # re-emitted by on_headers_complete, maybe rewritten
        elif action == H_FORWARDED_FOR:
            if settings.forwarded_for:
                req.captured = req.captured or {}
                previous = req.captured.get(b"x-forwarded-for")
                req.captured[b"x-forwarded-for"] = value if previous is None else previous + b", " + value
            else:
                self.parts += (name, b": ", value, b"\r\n")

    def _capture(self, lname: bytes, value: bytes) -> None:
        req = self.req
        if req.captured is None:
            req.captured = {}
        previous = req.captured.get(lname)
        req.captured[lname] = value if previous is None else previous + (b"; " if lname == b"cookie"
                                                                          else b", ") + value

    def on_headers_complete(self) -> None:
        self.head_done = True
        parser = self.parser
        req = self.req
        settings = self.settings
        version = parser.get_http_version()
        if version == "1.1":
            if req.host is None:
                raise RequestError(400, "HTTP/1.1 request without Host")
        elif version == "1.0":
            req.http10 = True
            if req.chunked:
                raise RequestError(400, "Transfer-Encoding in an HTTP/1.0 request")
        else:
            raise RequestError(400, f"HTTP version {version} not served")
        method = parser.get_method()
        if method == b"CONNECT":
            raise RequestError(405, "CONNECT")
        req.method = method
        req.started = self.head_started
        req.is_head = method == b"HEAD"
        req.idempotent = method in IDEMPOTENT_METHODS
        url = self.url_parts[0] if len(self.url_parts) == 1 else b"".join(self.url_parts)
        if not url.startswith(b"/"):
            url = self.origin_form(req, method, url)
        req.url = url
        req.keep_alive = parser.should_keep_alive()
        if req.upgrade is not None:
            if not parser.should_upgrade():
                req.upgrade = None             # Upgrade without "Connection: upgrade": not asked for
            elif b"h2c" in req.upgrade.lower():
                # HTTP/2 by upgrade (dropped by RFC 9113): served as HTTP/1.1, never forwarded, or a backend
                # that switched would carry HTTP/2 fastlb never parses (h2c smuggling). llhttp stops
                # parsing after an upgrade request: the connection ends with this response.
                req.upgrade = None
                req.close_after = True
            elif req.chunked:
                # llhttp stops at an Upgrade request's head; fastlb reads such a body only by its length.
                raise RequestError(400, "Upgrade request with a chunked body")
        router = self.runtime.router
        route = router.single if router.single is not None else router.route(method, url, req.host,
                                                                              req.captured)
        req.route = route
        if req.content_length is not None:
            length = int(req.content_length)
            if route.max_body_size and length > route.max_body_size:
                raise RequestError(413, "body larger than max_body_size")
        req.key = route.key(self.client_ip, url, req.captured) if route.key_kind else None
        admission = self.runtime.admission
        if admission is not None and admission.specs:
            if self.limits_checked:
                self.limits_checked = False       # counted once, by the engine
            else:
                req.retry_after = admission.check_request(self.client_ip, url, req.captured, route.name)
                if req.retry_after:
                    req.error = 429               # answered in turn; nothing goes to a backend
        sticky = route.sticky
        if sticky is not None:
            req.pinned, req.sticky_key, req.sticky_cookie = sticky.pin(self.client_ip, req.captured)

        # The head for the backend, as pieces joined at the first write.
        out = req.out
        out += (method, b" ", url, b" HTTP/1.1\r\nHost: ", req.host or settings.default_host, b"\r\n")
        parts = self.parts
        if self.conn_tokens is not None:
            parts = self._drop_connection_named(parts)
        out += parts
        if settings.cookie_held and req.captured is not None:
            cookies = req.captured.get(b"cookie")
            if cookies is not None:
                if sticky is not None and sticky.rewrites_cookie:
                    cookies = sticky.forward_cookie(cookies)
                if cookies:
                    out += (b"Cookie: ", cookies, b"\r\n")
        if settings.forwarded_for:
            previous = req.captured.get(b"x-forwarded-for") if req.captured else None
            if previous is not None:
                out += (b"X-Forwarded-For: ", previous, b", ", self.client_ip, b"\r\nX-Forwarded-Proto: ",
                        self.scheme, b"\r\n")
            else:
                out.append(self.forward_block)
            if req.host is not None:
                out += (b"X-Forwarded-Host: ", req.host, b"\r\n")
        out.append(settings.request_block)
        if self.tls_block:
            out.append(self.tls_block)
        if req.chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        elif req.content_length is not None:
            out += (b"Content-Length: ", req.content_length, b"\r\n")
        if req.upgrade is not None:
            out += (b"Connection: upgrade\r\nUpgrade: ", req.upgrade, b"\r\n\r\n")
        else:
            out.append(b"\r\n")
        # An upper bound of the head's size (the limits and the replay budget only need that much):
        # the client's header and URL bytes, the method, and what fastlb adds.
        req.out_size = self.header_size + self.url_size + len(method) + len(settings.request_block) + 512

        queue = self.queue
        queue.append(req)
        if len(queue) == 1:
            self.dispatch(req)
        elif len(queue) > MAX_PIPELINE:
            self.pause(PAUSE_QUEUE)

    def origin_form(self, req: Request, method: bytes, url: bytes) -> bytes:
        """A target that is not origin-form (RFC 9112 3.2): absolute-form becomes origin-form and its
        authority replaces the Host header (3.2.2: a server ignores the received Host), so routing,
        hashing, sticky keys, the access log and the backend all see the same host and path; the
        asterisk-form only as `OPTIONS *`; anything else is refused."""
        if url == b"*":
            if method != b"OPTIONS":
                raise RequestError(400, "asterisk-form target with a method other than OPTIONS")
            return url
        scheme, separator, rest = url.partition(b"://")
        if not separator or scheme.lower() not in (b"http", b"https"):
            raise RequestError(400, "request target neither origin-form nor absolute-form")
        end = len(rest)
        for delimiter in (b"/", b"?"):
            at = rest.find(delimiter)
            if 0 <= at < end:
                end = at
        authority = rest[:end]
        if not authority or b"@" in authority or not valid_host(authority):
            raise RequestError(400, "invalid authority in the request target")
        req.host = authority
        path = rest[end:]
        return path if path.startswith(b"/") else b"/" + path

    def _drop_connection_named(self, parts: list) -> list:
        """Removes the headers the Connection header names (RFC 9110 7.6.1)."""
        tokens = self.conn_tokens
        req = self.req
        if b"close" in tokens:
            req.close_after = True
        named = {t for t in tokens if t not in (b"close", b"keep-alive", b"upgrade")}
        if not named:
            return parts
        kept = []
        for i in range(0, len(parts), 4):
            if parts[i].lower() not in named:
                kept += parts[i:i + 4]
        return kept

    def on_body(self, body: bytes) -> None:
        req = self.req
        req.body_received += len(body)
        limit = req.route.max_body_size
        if limit and req.body_received > limit:
            raise RequestError(413, "body larger than max_body_size")
        if self.redirect is not None:
            return                          # a redirect bind: the body goes nowhere
        if req.chunked:
            req.out += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            req.out.append(body)
        req.out_size += len(body)
        if req.upstream is None and req.out_size > MAX_HELD_BYTES:
            self.pause(PAUSE_QUEUE)
        if req.upstream is not None and self.deadline_kind == WAIT_BACKEND:
            self.deadline = self.runtime.now + self.settings.response_timeout

    def on_message_complete(self) -> None:
        req = self.req
        if req is None:
            return
        body_size = int(req.content_length) if req.upgrade is not None and req.content_length is not None else 0
        if body_size:
            # llhttp skipped this Upgrade request's body: upgrade_body reads it, then completes it.
            self.upgrade_body_left = body_size
            return
        self.complete_request(req)

    def complete_request(self, req: Request) -> None:
        """The request has been read to its end (head and body)."""
        if req.chunked:
            if req.trailers is None:
                req.out.append(b"0\r\n\r\n")
            else:
                req.out += (b"0\r\n", *req.trailers, b"\r\n")
        req.complete = True
        self.req = None
        if not req.keep_alive or req.upgrade is not None:
            self.closing = True           # nothing after this request is read as HTTP
        if self.redirect is not None and self.queue and self.queue[0] is req:
            self.redirect_https(req)

    def refuse(self, status: int) -> None:
        """The request being parsed is refused: answered in turn with `status`, then the connection
        closes. If the request in flight is the one that broke (its body's framing), it is cut."""
        self.parser = None
        self.closing = True
        self.tunnel_buffer = None
        self.upgrade_body_left = 0
        req = self.req
        self.req = None
        if req is not None and req in self.queue:
            # The body of a request already queued is malformed.
            if req is self.queue[0] and (req.upstream is not None or req.written):
                if req.upstream is not None:
                    req.upstream.abandon()
                    req.upstream.release(ok=True)
                    req.upstream = None
                if req.response_started:
                    self.transport.close()
                    return
            self.queue.remove(req)
        error = Request()
        error.error = status
        self.queue.append(error)
        if len(self.queue) == 1:
            self.dispatch(error)

    # ---- sending to a backend --------------------------------------------------------------------

    def dispatch(self, req: Request) -> None:
        """Starts serving queue[0]: an idle keep-alive connection if its pool has one, else connect."""
        if req.error:
            self.answer(req, req.error, close=req.error != 429)
            return
        if self.adopting is not None:
            self._adopt_in_flight(req)
            return
        if self.redirect is not None:
            if req.complete:
                self.redirect_https(req)
            else:
                # Answered once the body has been read (and dropped), so the connection stays usable;
                # the body must arrive within http_request_timeout like a head.
                self.deadline = self.runtime.now + self.settings.http_request_timeout
                self.deadline_kind = WAIT_HEAD
            return
        route = req.route
        sticky = route.sticky
        if (sticky is not None and req.pinned is None and req.sticky_key is not None and not req.tried
                and sticky.store.shared and sticky.store.up):
            # Not in the local table: the shared store is asked first (bounded, off the fast path).
            self.deadline = self.loop.time() + self.settings.connect_wait_timeout
            self.deadline_kind = WAIT_BACKEND
            self.connect_task = self.loop.create_task(self._connect(req, None, True))
            return
        backend = route.pool.select_now(req.key, req.tried, req.pinned)
        if backend is not None:
            upstream = backend.take_idle()
            if upstream is not None:
                upstream.attach(self, req, backend)
                self.sent(req)
                return
        self.deadline = self.loop.time() + self.settings.connect_wait_timeout
        self.deadline_kind = WAIT_BACKEND
        self.connect_task = self.loop.create_task(self._connect(req, backend, False))

    def take_adopted(self, data: bytes) -> None:
        """The C engine's client with a request in flight: `data` is that request (the engine serves a
        request only when it is alone and whole in its read), parsed here as if just read. Its bytes went
        to the backend already (all, part or none of them: _adopt_in_flight), so none is written again:
        a second copy of its body would reach the backend as the start of another request."""
        self.runtime.now = self.loop.time()
        self.feed(self.parser, data)
        if self.queue:
            self.mark_sent(self.queue[0])

    def _adopt_in_flight(self, req: Request) -> None:
        """The C engine's request, re-parsed here (take_adopted): the engine sent it on `upstream` (slot
        taken) at sent_at, whole or not; a connection that did not get all of it is never reused, and a
        request none of whose bytes it got may go to another backend whatever its method."""
        upstream, backend, sent_at, sent_whole, sent_any = self.adopting
        self.adopting = None
        upstream.attach(self, req, backend)
        if not sent_whole:
            upstream.reusable = False
        req.written = sent_any
        req.sent_at = sent_at
        self.deadline = sent_at + self.settings.response_timeout
        self.deadline_kind = WAIT_BACKEND

    async def _connect(self, req: Request, selected, fetch: bool) -> None:
        runtime = self.runtime
        try:
            if fetch:
                req.pinned = await req.route.sticky.fetch(req.sticky_key)
            backend, transport, upstream = await req.route.pool.connect(
                req.key, runtime.backend_factory, req.tried, selected, req.pinned)
        except (NoBackendError, QueueError) as exc:
            self.connect_task = None
            if not self.closed:
                # Every candidate failed, the last one on its TLS handshake (a certificate that does not
                # verify): a bad gateway, not an absent one. A retry after a backend failed the request
                # itself (req.status, from backend_failed) that found no other backend: that failure.
                status = 502 if getattr(exc, "tls_failure", False) else req.status or 503
                runtime.refused(self, exc if status == 503 or not req.status else
                                f"backend {req.tried[-1].address} failed the request and no other "
                                f"backend took it ({exc})", status)
                self.answer(req, status, close=not req.complete)
            return
        self.connect_task = None
        if self.closed or upstream.lost or not self.queue or self.queue[0] is not req:
            req.route.pool.release(backend)
            transport.close()
            return
        upstream.attach(self, req, backend)
        self.sent(req)

    def sent(self, req: Request) -> None:
        """req is attached to its backend connection: write what we have and wait for the response."""
        now = self.runtime.now
        req.sent_at = now
        if req.sticky_key is not None and req.route.sticky.sticks(req.pinned, req.upstream.backend):
            # It sticks to this backend from now on (Sticky.sticks says when).
            req.pinned = req.upstream.backend
            req.route.sticky.record(req.sticky_key, req.pinned)
        if self.runtime.observer is not None:
            req.sent_mono = monotonic()       # the loop's clock moves in ms: too coarse for a histogram
        self.deadline = now + self.settings.response_timeout
        self.deadline_kind = WAIT_BACKEND
        self.flush_request(req)
        if req.expect_continue and not req.continue_sent and not req.complete and not req.body_received:
            req.continue_sent = True
            self.transport.write(errors.CONTINUE_100)
        self.resume(PAUSE_QUEUE)

    def flush_request(self, req: Request) -> None:
        out = req.out
        flushed = req.flushed
        data = out[flushed] if len(out) - flushed == 1 else b"".join(out[flushed:])
        req.upstream.transport.write(data)
        req.written = True
        self.mark_sent(req)

    def mark_sent(self, req: Request) -> None:
        """Every piece in req.out has reached the backend connection: kept for a replay while the
        request is small enough (REPLAY_LIMIT), else dropped and the request is no longer replayable."""
        if req.replayable and req.out_size <= REPLAY_LIMIT:
            req.flushed = len(req.out)
        else:
            req.replayable = False
            req.out.clear()
            req.flushed = 0

    # ---- responses -------------------------------------------------------------------------------

    def answer(self, req: Request, status: int, close: bool) -> None:
        """A response of fastlb's own for queue[0] (errors)."""
        close = close or self.closing and not self.req_pending_after(req) or req.close_after
        if status == 429:
            # Over a rate limit: the connection stays only if no body of it is still to come.
            close = close or not req.complete and (req.chunked or req.content_length not in (None, b"0"))
            data = self.runtime.admission.limited_response(req.retry_after, close)
            if req.is_head:
                data = errors.without_body(data)
        else:
            data = errors.response(status, close, req.is_head)
        self.transport.write(data)
        req.status = status
        req.bytes_out = len(data)
        self.finished(req, close)

    def redirect_https(self, req: Request) -> None:
        """A redirect bind's answer: 301 (GET, HEAD) or 308 (other methods keep method and body) to
        https://HOST[:PORT]/target; the Host's own port is dropped. No Host to build it from: 400."""
        url = req.url
        host = req.host                                # absolute-form: its authority (origin_form)
        if url == b"*":                                # OPTIONS *
            url = b"/"
        if not host:
            self.answer(req, 400, close=True)
            return
        name = host[:host.index(b"]") + 1] if host.startswith(b"[") else host.partition(b":")[0]
        if not name:
            self.answer(req, 400, close=True)
            return
        status = 301 if req.method == b"GET" or req.is_head else 308
        close = not req.complete or self.closing and not self.req_pending_after(req) or req.close_after
        data = errors.redirect(status, b"https://" + name + self.redirect + url, close)
        self.transport.write(data)
        req.status = status
        req.bytes_out = len(data)
        self.finished(req, close)

    def req_pending_after(self, req: Request) -> bool:
        return len(self.queue) > 1

    def finished(self, req: Request, close: bool) -> None:
        """queue[0] has been answered in full: next request, or keep-alive wait, or close."""
        if self.runtime.observer is not None:
            self.report(req)
        queue = self.queue
        if queue and queue[0] is req:
            queue.popleft()
        if close or (not queue and self.closing and self.req is None) or self.closed:
            self.closing = True
            self.parser = None
            queue.clear()
            self.deadline_kind = WAIT_NONE
            if not self.closed:
                self.transport.close()
            return
        if queue:
            self.resume(PAUSE_QUEUE)
            self.dispatch(queue[0])
            return
        self.resume(PAUSE_QUEUE)
        if self.req is not None:
            self.deadline = self.head_started + self.settings.http_request_timeout
            self.deadline_kind = WAIT_HEAD
        else:
            if self.runtime.draining:
                self.closing = True
                self.transport.close()
                return
            self.deadline = self.runtime.now + self.settings.keepalive_timeout
            self.deadline_kind = WAIT_IDLE

    def report(self, req: Request) -> None:
        """Metrics and access log for a request answered in full (called only with an observer)."""
        route = req.route
        sent = req.sent_mono
        self.runtime.observer.http_request(
            req.backend, self.client_ip.decode("latin-1"), req.method.decode("latin-1"),
            req.url.decode("latin-1"), req.status, req.out_size, req.bytes_out, req.started,
            max(0.0, sent - req.started) if sent else 0.0,
            req.response_seconds if req.response_seconds >= 0.0 else None,
            route.name if route is not None else None)

    def backend_failed(self, req: Request, status: int, retry: bool, detail: str = "") -> None:
        """The backend connection serving req broke (or timed out) before the response ended."""
        if self.closed:
            return
        if req.response_started:
            self.transport.close()              # a truncated response: the client sees the cut
            self.closing = True
            return
        if retry and may_send_again(req, len(req.tried)):
            req.flushed = 0
            req.written = False
            req.status = status                 # the answer if no other backend can be tried (_connect)
            self.dispatch(req)
            return
        self.runtime.refused(self, detail, status)
        self.answer(req, status, close=not req.complete)

    def start_tunnel(self, upstream_transport) -> None:
        """The backend switched protocols (101): bytes flow both ways untouched from now on."""
        self.tunnel = True
        self.peer = upstream_transport
        self.deadline = self.loop.time() + self.settings.tunnel_timeout
        self.deadline_kind = WAIT_TUNNEL
        if self.tunnel_buffer:
            upstream_transport.write(b"".join(self.tunnel_buffer))
        self.tunnel_buffer = None
        self.paused = 0
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        if self.tunnel:
            if not self.peer.is_closing():
                self.peer.write_eof()
            return True
        if self.queue:
            # Half-closed after sending its request(s): still answer them, then close.
            self.closing = True
            self.parser = None
            return True
        return False

    # ---- timeouts (called by the sweep) ----------------------------------------------------------

    def on_deadline(self, now: float) -> None:
        kind = self.deadline_kind
        self.deadline_kind = WAIT_NONE
        if kind == WAIT_IDLE:
            self.transport.close()
        elif kind == WAIT_HEAD:
            if self.queue and (self.redirect is None or self.queue[0].complete):
                return                    # a request in flight: its own deadline kind follows
            self.closing = True
            self.parser = None
            self.transport.write(errors.response(408, True))
            self.transport.close()
        elif kind == WAIT_BACKEND:
            req = self.queue[0] if self.queue else None
            if req is None:
                return
            if not req.complete and req.upstream is not None and not req.response_started:
                # The client stopped sending its body.
                req.upstream.abandon()
                req.upstream.release(ok=True)
                req.upstream = None
                self.queue.clear()
                self.transport.write(errors.response(408, True))
                self.transport.close()
                return
            if self.connect_task is not None:
                self.connect_task.cancel()
                self.connect_task = None
                self.answer(req, 503, close=not req.complete)
                return
            upstream = req.upstream
            if upstream is not None:
                upstream.timed_out()
        elif kind == WAIT_TUNNEL:
            if self.tunnel_active:
                self.tunnel_active = False
                self.deadline = now + self.settings.tunnel_timeout
                self.deadline_kind = WAIT_TUNNEL
            else:
                self.close()


def client_subject_block(subject: str) -> bytes:
    """The header line naming a verified client certificate's subject (RFC 4514, tls.format_subject)."""
    return tls.CLIENT_SUBJECT_HEADER.encode() + b": " + subject_header_value(subject) + b"\r\n"


def subject_header_value(subject: str) -> bytes:
    """An RFC 4514 subject as a header value: tls.format_subject has escaped the specials and control
    characters; non-ASCII characters become RFC 4514 hex pairs of their UTF-8 bytes, so the value is
    printable ASCII and cannot break the head."""
    if subject.isascii():
        return subject.encode("ascii")
    return "".join(c if c.isascii() else "".join(f"\\{b:02x}" for b in c.encode()) for c in subject
                   ).encode("ascii")


__all__ = ["ClientConnection", "Request", "client_subject_block"]
