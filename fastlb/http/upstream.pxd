# Declarations that make BackendConnection an extension type when upstream.py is compiled.
from fastlb.http.protocol cimport ClientConnection, Request
from fastlb.http.runtime cimport HttpRuntime, HttpSettings


cdef class BackendConnection:
    cdef public HttpRuntime runtime
    cdef public HttpSettings settings
    cdef public object transport, parser, backend, conn_tokens, pending_input
    cdef public bytes upgrade, te_value, cl_value, reason
    cdef public bint lost, fresh_parser, keep_alive, chunked_in, chunked_out, close_delimited, no_body
    cdef public bint done, interim, reusable, client_close, seen, retrying, reused
    cdef public double idle_since
    cdef public ClientConnection client
    cdef public Request request
    cdef public list out, parts, trailer_parts
    cdef public int status
    cdef public Py_ssize_t received, head_size

    cpdef _reset(self)
    cpdef attach(self, ClientConnection client, Request req, backend)
    cpdef release(self, bint ok, str detail=*)
    cpdef _plain_response(self, ClientConnection client, tuple found, bytes data)
    cpdef bint _client_must_close(self, Request req, ClientConnection client)
    cpdef _finish(self)
