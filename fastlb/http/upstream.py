# cython: annotation_typing=False
"""The backend side: one `BackendConnection` per connection to a backend, reused across requests.

While serving a request it parses the response with httptools, rewrites the head (hop-by-hop headers
out, the framing fastlb forwards, `Connection: close` when the client connection ends after it) and
queues head and body pieces in `out`; they are written to the client in one `write` after each
`feed_data`, so a small response is a single syscall. Whether the connection then goes back to its
backend's idle pool (`Backend.idle`, HttpRuntime.park; bounded with the engine's) or closes is `fastlb.http.reuse.may_reuse`'s decision, the one
rule both HTTP data paths follow (request written whole, response read whole by its framing, backend
keeps alive, not draining).

HEAD responses: httptools does not know the request method, so a HEAD response is finished at the end
of its head, and the connection gets a fresh parser before its next request.
"""
from __future__ import annotations

import asyncio
import logging
from time import monotonic

import httptools

from fastlb.constants import PAUSE_BACKEND_FULL, STICKY_COOKIE_INSERT, STICKY_LEARN_HEADER, WAIT_BACKEND
from fastlb.http.headers import (R_CONNECTION, R_FRAMING, R_HSTS, R_SET_COOKIE, R_STICKY_HEADER, R_UPGRADE,
                                 scan_response)
from fastlb.http.reuse import may_reuse, may_send_again

log = logging.getLogger("fastlb")

HttpParserError = httptools.HttpParserError
HttpParserUpgrade = httptools.HttpParserUpgrade
HEAD_TOO_LARGE = "response head larger than max_response_header_size"


class HeadTooLarge(Exception):
    """Raised in a parser callback: httptools turns it into an HttpParserError (a bad response)."""


class BackendConnection:     # an asyncio protocol (duck-typed: compiled, it is an extension type)
    __slots__ = (
        # shared
        "runtime", "settings",
        # per connection
        "transport", "parser", "lost", "backend", "idle_since", "fresh_parser",
        # per request / response
        "client", "request", "out", "parts", "status", "reason", "keep_alive", "chunked_in",
        "chunked_out", "close_delimited", "no_body", "done", "interim", "reusable", "upgrade",
        "te_value", "cl_value", "client_close", "conn_tokens", "seen",
        # a response retry_on names (a 5xx) being dropped: the request goes to another backend
        "retrying",
        # bytes of the current response read from the backend (the access log's and metrics' bytes out)
        "received",
        # response bytes the C engine read before handing the connection over (fastlb/http/fast.py)
        "pending_input",
        # it served a response before (it was idle in between): closed before a byte of the next one
        # is the keep-alive race, not the backend's failure (connection_lost)
        "reused",
        # header bytes of this response (counted like a request's): over max_response_header_size, 502
        "head_size",
        # trailer fields of a chunked response, passed on in its chunked end (None: none)
        "trailer_parts",
    )

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.backend = None
        self.idle_since = 0.0
        self.fresh_parser = False
        self.client = None
        self.request = None
        self.out = []
        self.pending_input = None
        self.reused = False
        self._reset()

    def _reset(self) -> None:
        self.parts = []
        self.status = 0
        self.reason = b""
        self.keep_alive = False
        self.chunked_in = False
        self.chunked_out = False
        self.close_delimited = False
        self.no_body = False
        self.done = False
        self.interim = False
        self.reusable = True
        self.upgrade = None
        self.te_value = None
        self.cl_value = None
        self.client_close = False
        self.conn_tokens = None
        self.seen = False          # a byte of this response has been read
        self.retrying = False
        self.received = 0
        self.head_size = 0
        self.trailer_parts = None

    # ---- attach / detach -------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        pending = self.pending_input
        if pending is not None:
            self.pending_input = None
            if pending:
                self.data_received(pending)

    def attach(self, client, req, backend) -> None:
        if self.fresh_parser:
            self.parser = httptools.HttpResponseParser(self)
            self.fresh_parser = False
        self.client = client
        self.request = req
        self.backend = backend
        req.upstream = self
        req.backend = backend
        self._reset()

    def release(self, ok: bool, detail: str = "") -> None:
        """Gives back the slot taken for the request and reports the outcome to the core and to the
        passive health checks (a 5xx, a bad response or a timeout counts against the backend)."""
        backend = self.backend
        req = self.request
        if backend is None or req is None:
            return
        req.route.pool.response_done(backend, self.runtime.now - req.sent_at, ok, self.status, detail)
        self.request = None

    def abandon(self) -> None:
        """The client side is gone or broken mid-request: this connection is not reusable."""
        self.client = None
        if self.request is not None:
            self.release(ok=True)
        if self.transport is not None:
            self.transport.abort()

    def may_retry(self, req) -> bool:
        """Whether req may be re-sent after this backend failed it with a condition retry_on names (the
        caller checks that its condition is asked for): reuse.may_send_again, this attempt counted."""
        return may_send_again(req, len(req.tried) + 1)

    def timed_out(self) -> None:
        self._failed(504, self.settings.retry_timeout and self.may_retry(self.request), "response timeout")

    # ---- reading the response --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            # Bytes on an idle connection: nothing was asked, so the connection is out of step.
            self.transport.close()
            return
        if client.tunnel:
            client.transport.write(data)
            client.tunnel_active = True
            return
        self.runtime.now = client.loop.time()        # the one clock read for these bytes
        self.received += len(data)
        if not self.seen:
            self.seen = True
            req = self.request
            # Where fastlb adds HSTS (a TLS bind, a pool with HSTS) the fast path drops the backend's
            # own line too, and _plain_response adds fastlb's (the C engine does the same).
            if self.settings.fast_responses and not req.is_head:
                found = scan_response(data, self.settings.response_watch,
                                      self.settings.hsts_dropped if client.tls and req.route.hsts_block
                                      else self.settings.response_dropped,
                                      self.settings.max_response_header_size)
                if found is not None:
                    self._plain_response(client, found, data)
                    return
        started = self.request.response_started       # the client has seen this response's head
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            rest = data[exc.args[0]:] if exc.args else b""
            self._switch(rest)
            return
        except HttpParserError as exc:
            if self.retrying:                       # the rest of a response we drop anyway
                self._drop_and_retry()
                return
            self._bad_response(started, str(exc.__context__ or exc))    # (a callback's own error: its text)
            return
        if not self.status and self.received > self.settings.max_response_header_size:
            # Still no end of the head (llhttp buffers a header value whole): a hostile or broken backend.
            self._bad_response(started, HEAD_TOO_LARGE)
            return
        if self.retrying:
            self._drop_and_retry()
            return
        out = self.out
        if out:
            client.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self.done:
            self._finish()
        elif client.deadline_kind == WAIT_BACKEND:     # the backend is alive: wait again
            client.deadline = self.runtime.now + self.settings.response_timeout

    def _bad_response(self, started: bool, detail: str, retry: bool = True) -> None:
        """An unparsable response (or a head over the limit, or a 101 nobody asked for): 502 when nothing
        of it has reached the client (what this read queued is dropped), else the client connection is
        cut; the backend's is closed. retry: False for a 101 nobody asked for (`_switch`): the backend took
        the request and answered it, the request goes to no other."""
        log.debug("bad response from %s: %s", self.backend.address, detail)
        self.out.clear()
        self.reusable = False
        if not started:
            self.request.response_started = False   # the head parsed in this read was never written
        self._failed(502, retry and self.settings.retry_junk and self.may_retry(self.request),
                     f"bad response: {detail}")

    def _plain_response(self, client, found, data: bytes) -> None:
        """The fast path: a whole plain response in one read (see _head.scan_response), forwarded in
        one write without httptools, with fastlb's own header lines (and the insert cookie) appended;
        the parser, untouched, is still at a message start."""
        status, head, body_start, backend_close = found
        req = self.request
        self.status = status
        if status in self.settings.retry_statuses and self.may_retry(req):
            self._drop_and_retry()
            return
        req.response_started = True
        if req.sent_mono:                           # only with an observer (metrics, access log)
            req.response_seconds = monotonic() - req.sent_mono
        close = self._client_must_close(req, client)
        self.client_close = close
        self.keep_alive = not backend_close
        sticky = req.route.sticky
        cookie_line = (sticky.response_block(req.sticky_cookie, self.backend)
                       if sticky is not None and sticky.kind == STICKY_COOKIE_INSERT else b"")
        client.transport.write(b"".join((
            head, b"Connection: close\r\n" if close else b"Connection: keep-alive\r\n" if req.http10 else b"",
            self.settings.response_block, req.route.hsts_block if client.tls else b"", req.extra_response_headers,
            cookie_line, b"\r\n",
            data[body_start:])))
        self.done = True
        self._finish()

    def _client_must_close(self, req, client) -> bool:
        """The client connection ends after this response: it asked, a refused request follows, the
        request was not read to its end, or the worker is draining."""
        return (not req.keep_alive or req.close_after or client.closing and len(client.queue) <= 1
                or not req.complete or client.runtime.draining)

    def on_message_begin(self) -> None:
        if self.done:
            self.reusable = False                   # more bytes after a complete response

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.settings.max_response_header_size:
            raise HeadTooLarge(HEAD_TOO_LARGE)          # (trailers count too)
        if self.status:                             # trailers after a chunked body (gRPC's grpc-status)
            if self.chunked_out and self.settings.response_actions.get(name.lower()) is None:
                if self.trailer_parts is None:
                    self.trailer_parts = []
                self.trailer_parts += (name, b": ", value, b"\r\n")     # (fields fastlb acts on: dropped)
            return
        action = self.settings.response_actions.get(name.lower())
        if action is None:
            self.parts += (name, b": ", value, b"\r\n")
        elif action == R_FRAMING:
            if len(name) == 17:                     # transfer-encoding
                self.te_value = value
            else:                                   # content-length (llhttp checked it)
                self.cl_value = value
        elif action == R_CONNECTION:
            tokens = [t.strip().lower() for t in value.split(b",")]
            self.conn_tokens = tokens if self.conn_tokens is None else self.conn_tokens + tokens
        elif action == R_UPGRADE:
            self.upgrade = value
        elif action == R_HSTS:
            # fastlb's HSTS replaces the backend's where it applies (a TLS bind, a pool with HSTS).
            if not (self.client.tls and self.request.route.hsts_block):
                self.parts += (name, b": ", value, b"\r\n")
        elif action == R_SET_COOKIE:
            sticky = self.request.route.sticky
            if sticky is not None and sticky.watches_set_cookie:
                value = sticky.on_set_cookie(value, self.backend)
                if value is None:
                    return                          # insert + indirect: our cookie is fastlb's to set
            self.parts += (name, b": ", value, b"\r\n")
        elif action == R_STICKY_HEADER:
            sticky = self.request.route.sticky
            if sticky is not None and sticky.kind == STICKY_LEARN_HEADER and name.lower() == sticky.lname:
                sticky.on_response_header(value, self.backend)
            self.parts += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        self.status = status
        req = self.request
        client = self.client
        if status < 200 and status != 101:
            # An interim response (103 Early Hints...): forwarded, except 100 (fastlb answers
            # Expect itself) and to HTTP/1.0 clients, which do not know them.
            self.interim = True
            if status != 100 and not req.http10:
                self.out += (b"HTTP/1.1 %d " % status, self.reason, b"\r\n", *self.parts, b"\r\n")
            return
        if status in self.settings.retry_statuses and self.may_retry(req):
            self.retrying = True                    # dropped: data_received re-sends the request
            return
        req.response_started = True
        if req.sent_mono:                           # only with an observer (metrics, access log)
            req.response_seconds = monotonic() - req.sent_mono
        self.keep_alive = parser.should_keep_alive()
        out = self.out
        out += (b"HTTP/1.1 %d " % status, self.reason, b"\r\n")
        parts = self.parts
        if self.conn_tokens is not None:
            named = {t for t in self.conn_tokens if t not in (b"close", b"keep-alive", b"upgrade")}
            if named:
                parts = [p for i in range(0, len(parts), 4) if parts[i].lower() not in named
                         for p in parts[i:i + 4]]
        out += parts
        close = self._client_must_close(req, client)
        if status == 101:
            out += (b"Connection: upgrade\r\nUpgrade: ", self.upgrade or b"", b"\r\n")
            close = False
        elif req.is_head or status == 204 or status == 304:
            self.no_body = True
            if self.cl_value is not None and status != 204:
                out += (b"Content-Length: ", self.cl_value, b"\r\n")
        else:
            te = self.te_value
            if te is not None:
                if te.strip().lower().endswith(b"chunked"):
                    self.chunked_in = True
                    if req.http10:
                        self.close_delimited = True
                        close = True
                    else:
                        self.chunked_out = True
                        out.append(b"Transfer-Encoding: chunked\r\n")
                else:
                    out += (b"Transfer-Encoding: ", te, b"\r\n")
                    self.close_delimited = True
                    close = True
            else:
                if self.cl_value is not None:
                    out += (b"Content-Length: ", self.cl_value, b"\r\n")
                else:
                    self.close_delimited = True
                    close = True
        if close:
            out.append(b"Connection: close\r\n")
            self.client_close = True
        elif req.http10:
            out.append(b"Connection: keep-alive\r\n")
        out.append(self.settings.response_block)
        if client.tls:
            hsts = req.route.hsts_block
            if hsts:
                out.append(hsts)
        if req.extra_response_headers:
            out.append(req.extra_response_headers)
        sticky = req.route.sticky
        if sticky is not None and sticky.kind == STICKY_COOKIE_INSERT:     # name the backend
            block = sticky.response_block(req.sticky_cookie, self.backend)
            if block:
                out.append(block)
        out.append(b"\r\n")
        if self.no_body:
            self.done = True
            if req.is_head:
                self.fresh_parser = True            # the parser may wait for a body that never comes

    def on_body(self, body: bytes) -> None:
        if self.retrying:
            return
        if self.no_body:
            self.reusable = False                   # a body where none may be: out of step
            return
        if self.chunked_out:
            self.out += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self.retrying:
            return
        if self.interim:
            self.interim = False
            self.status = 0
            self.reason = b""
            self.parts = []
            self.te_value = None
            self.cl_value = None
            self.conn_tokens = None
            return
        if self.chunked_out:
            if self.trailer_parts is None:
                self.out.append(b"0\r\n\r\n")
            else:
                self.out += (b"0\r\n", *self.trailer_parts, b"\r\n")
        self.done = True

    # ---- ends ------------------------------------------------------------------------------------

    def _finish(self) -> None:
        """The response has been read and written to the client."""
        client = self.client
        req = self.request
        backend = self.backend
        self.client = None
        self.release(ok=self.status < 500)
        req.upstream = None
        req.status = self.status
        req.bytes_out = self.received
        if may_reuse(req.written_whole(),
                     self.done and self.reusable and not self.close_delimited and not self.lost,
                     self.keep_alive, self.runtime.draining):
            self.reused = True
            self.runtime.park(self, backend)
        else:
            self.transport.close()
        client.finished(req, self.client_close)

    def _switch(self, rest: bytes) -> None:
        """101 Switching Protocols: the head goes to the client, then both sides become a tunnel. Only
        for a request that asked to upgrade and was written whole: a 101 to anything else would turn
        the client's next bytes into a tunnel fastlb never parses (502, both connections closed)."""
        client = self.client
        req = self.request
        if self.status != 101 or req.upgrade is None or not req.written_whole():
            self._bad_response(False, "switching protocols unasked or before the request was sent", retry=False)
            return
        out = self.out
        if rest:
            out.append(rest)
        if out:
            client.transport.write(b"".join(out))
            out.clear()
        self.release(ok=True)
        client.queue.clear()
        req.upstream = None
        if client.runtime.observer is not None:     # the request ends here; the tunnel is not counted
            req.status = 101
            req.bytes_out = self.received
            client.report(req)
        client.start_tunnel(self.transport)

    def _drop_and_retry(self) -> None:
        """A response retry_on names (a 5xx), for a request may_retry allows: the client never sees it;
        the connection closes (the rest of the response stays unread) and the request goes to another
        backend. The 5xx counts against this backend's passive health like a forwarded one."""
        self._failed(self.status, True, f"status {self.status}")

    def _failed(self, status: int, retry: bool, detail: str, stale: bool = False) -> None:
        """The request failed on this connection: closed, reported, and retried or answered `status`.
        stale: the keep-alive race (see connection_lost), neither the backend's failure nor an attempt."""
        client = self.client
        req = self.request
        self.client = None
        self.release(stale, detail)
        if self.transport is not None:
            self.transport.abort()
        if req is not None and client is not None:
            req.upstream = None
            if not stale:
                req.tried.append(self.backend)
            client.backend_failed(req, status, retry, f"backend {self.backend.address}: {detail}")

    def pause_writing(self) -> None:
        # The backend reads slower than the client sends: stop reading the client.
        client = self.client
        if client is not None:
            if client.tunnel:
                client.transport.pause_reading()
            else:
                client.pause(PAUSE_BACKEND_FULL)

    def resume_writing(self) -> None:
        client = self.client
        if client is not None:
            if client.tunnel:
                client.transport.resume_reading()
            else:
                client.resume(PAUSE_BACKEND_FULL)

    def eof_received(self) -> bool:
        client = self.client
        if client is not None and client.tunnel:
            if not client.transport.is_closing():
                client.transport.write_eof()
            return True
        return False

    def connection_lost(self, exc) -> None:
        self.lost = True
        client = self.client
        if client is None:
            self.runtime.unpark(self)
            return
        if client.tunnel:
            self.client = None
            client.transport.close()
            return
        if self.request is None:
            return
        if self.close_delimited and self.status and not self.done:
            # The end of a body read until close.
            self.done = True
            self.reusable = False
            self._finish()
            return
        # Closed before the response ended: retry when the rules allow (nothing reached the client):
        # always when nothing of the request was written, else with retry_on's empty-response. A reused
        # connection closed before a byte of its response: the backend closed it as idle while the
        # request was on its way (the keep-alive race), so it goes again on another connection, not
        # counted as an attempt nor against the backend (nginx does the same), if idempotent or unsent.
        stale = self.reused and not self.seen
        self._failed(502, stale or self.settings.retry_empty or not self.request.written,
                     "closed before a complete response" if self.seen else "closed without a response",
                     stale)
