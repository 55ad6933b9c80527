# cython: language_level=3, boundscheck=False, wraparound=False
"""A one-pass scanner for the common backend response: the fast path of `BackendConnection`.

`scan_response(data)` looks at a read that starts a response and answers only for the plain case:
`HTTP/1.1 2xx-5xx` (not 204/304), every header line well formed (token name, no obs-fold, no control
bytes, CRLF endings), exactly one Content-Length made of digits, no Transfer-Encoding or Upgrade, a
Connection header holding only `keep-alive` / `close`, and the whole body in this read with nothing
after it, and none of the `watched` header names (lower-case bytes: the ones a sticky rule must read or
rewrite, e.g. set-cookie); the lines named in `dropped` (the operator's response header rules) are left
out. It returns the head to forward (status line and header lines minus the hop-by-hop ones,
without the final CRLF), where the body starts, and whether the backend asked to close. For anything
else it returns None, and the caller hands the read to httptools as if this had never run: nothing
is consumed, so the fallback is exact.
"""
from cpython.pyport cimport PY_SSIZE_T_MAX

include "_scan.pxi"


def scan_response(bytes data, tuple watched=(), tuple dropped=(), Py_ssize_t max_head=PY_SSIZE_T_MAX):
    """(status, head, body_start, backend_close) for a plain complete response in `data`, else None
    (also when a header named in `watched` is present: the slow path shows it to the sticky rule; and
    when the head is over max_head bytes: the slow path refuses it). Header lines named in `dropped`
    (lower-case) are left out of head."""
    cdef PlainResponse found
    cdef int i
    if not scan_plain(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), watched,
                      dropped, &found) or found.body_left:
        return None                   # (a body still to come: httptools follows it)
    if found.body_start > max_head:
        return None
    if found.nspans == 1:
        head = data[found.spans[0].start:found.spans[0].end]
    else:
        head = b"".join([data[found.spans[i].start:found.spans[i].end] for i in range(found.nspans)])
    return found.status, head, found.body_start, found.backend_close
