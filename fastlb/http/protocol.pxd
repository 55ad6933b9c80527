# Declarations that make Request / ClientConnection extension types when protocol.py is compiled:
# attributes become C struct fields. protocol.py runs unchanged as plain Python (the reference).
from fastlb.http.runtime cimport HttpRuntime, HttpSettings


cdef class Request:
    cdef public bytes method, url, host, upgrade, content_length, extra_response_headers
    cdef public bint http10, keep_alive, idempotent, is_head, chunked, complete, expect_continue
    cdef public bint replayable, written, response_started, continue_sent, close_after
    cdef public Py_ssize_t body_received, flushed, out_size, error
    cdef public dict captured
    cdef public object route, key, upstream, pinned, sticky_key, sticky_cookie
    cdef public list tried, out, trailers
    cdef public double sent_at, started, sent_mono, response_seconds, retry_after
    cdef public object backend
    cdef public int status
    cdef public Py_ssize_t bytes_out

    cpdef bint written_whole(self)


cdef class ClientConnection:
    cdef public HttpRuntime runtime
    cdef public HttpSettings settings
    cdef public object loop, transport, parser, queue, connect_task, tunnel_buffer, peer, conn_tokens
    cdef public bytes client_ip, forward_block, checked_host, scheme, tls_block
    cdef public bint closed, closing, tunnel, tunnel_active, head_done, tls, mtls, admitted, limits_checked
    cdef public bint alpn_h2
    cdef public object redirect, pending_input, adopting
    cdef public int paused, deadline_kind
    cdef public Py_ssize_t upgrade_body_left
    cdef public double deadline, head_started
    cdef public Request req
    cdef public list parts, url_parts
    cdef public Py_ssize_t url_size, header_size, header_count

    cpdef pause(self, int reason)
    cpdef resume(self, int reason)
    cpdef dispatch(self, Request req)
    cpdef sent(self, Request req)
    cpdef flush_request(self, Request req)
    cpdef mark_sent(self, Request req)
    cpdef answer(self, Request req, int status, bint close)
    cpdef finished(self, Request req, bint close)
