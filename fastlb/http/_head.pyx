# cython: language_level=3, boundscheck=False, wraparound=False
"""A one-pass scanner for the common backend response: the fast path of `BackendConnection`.

`scan_response(data)` looks at a read that starts a response and answers only for the plain case:
`HTTP/1.1 2xx-5xx` (not 204/304), every header line well formed (token name, no obs-fold, no control
bytes, CRLF endings), exactly one Content-Length made of digits, no Transfer-Encoding or Upgrade, a
Connection header holding only `keep-alive` / `close`, and the whole body in this read with nothing
after it, and none of the `watched` header names (lower-case bytes: the ones a sticky rule must read or
rewrite, e.g. set-cookie). It returns the head to forward (status line and header lines minus the hop-by-hop ones,
without the final CRLF), where the body starts, and whether the backend asked to close. For anything
else it returns None, and the caller hands the read to httptools as if this had never run: nothing
is consumed, so the fallback is exact.
"""
from libc.string cimport memcmp

cdef extern from "Python.h":
    char* PyBytes_AS_STRING(object)
    Py_ssize_t PyBytes_GET_SIZE(object)

# Per byte: 1 = tchar (RFC 9110 token), 2 = allowed in a field value (VCHAR, SP, HTAB, obs-text).
cdef unsigned char CLASS[256]


cdef void _init_classes():
    cdef int c
    for c in range(256):
        CLASS[c] = 0
        if c == 9 or (32 <= c < 127) or c >= 128:
            CLASS[c] |= 2
    for c in b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz":
        CLASS[c] |= 1


_init_classes()

# What a header name means to the fast path.
cdef enum:
    KEEP = 0
    DROP = 1           # hop-by-hop: not forwarded
    CONN = 2           # Connection: read (keep-alive / close), not forwarded
    CLEN = 3           # Content-Length: read, forwarded
    GIVE_UP = 4        # Transfer-Encoding, Upgrade, a Connection naming headers: httptools' job


cdef inline unsigned char lower(unsigned char c):
    return c + 32 if 65 <= c <= 90 else c


cdef bint name_is(const unsigned char* p, Py_ssize_t n, const char* name, Py_ssize_t name_len):
    cdef Py_ssize_t i
    if n != name_len:
        return False
    for i in range(n):
        if lower(p[i]) != <unsigned char>name[i]:
            return False
    return True


cdef int classify(const unsigned char* p, Py_ssize_t n):
    if n == 2 and name_is(p, n, b"te", 2):
        return DROP
    if n == 7:
        if name_is(p, n, b"trailer", 7):
            return DROP
        if name_is(p, n, b"upgrade", 7):
            return GIVE_UP
    elif n == 10:
        if name_is(p, n, b"connection", 10):
            return CONN
        if name_is(p, n, b"keep-alive", 10):
            return DROP
    elif n == 14 and name_is(p, n, b"content-length", 14):
        return CLEN
    elif n == 16 and name_is(p, n, b"proxy-connection", 16):
        return DROP
    elif n == 17 and name_is(p, n, b"transfer-encoding", 17):
        return GIVE_UP
    elif n == 18 and name_is(p, n, b"proxy-authenticate", 18):
        return DROP
    return KEEP


cdef bint is_watched(const unsigned char* p, Py_ssize_t n, tuple watched):
    """A header line named in `watched` (a handful of names: compared by length first)."""
    cdef bytes name
    for name in watched:
        if PyBytes_GET_SIZE(name) == n and name_is(p, n, PyBytes_AS_STRING(name), n):
            return True
    return False


cdef bint value_is(const unsigned char* p, Py_ssize_t n, const char* word, Py_ssize_t word_len):
    return name_is(p, n, word, word_len)


def scan_response(bytes data, tuple watched=()):
    """(status, head, body_start, backend_close) for a plain complete response in `data`, else None
    (also when a header named in `watched` is present: the slow path shows it to the sticky rule)."""
    cdef const unsigned char* buf = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t pos, line_start, line_end, name_end, value_start, value_end, i
    cdef Py_ssize_t content_length = -1, body_start
    cdef int status, kind
    cdef bint backend_close = False
    cdef unsigned char c
    # Pieces of the head to forward: (start, end) spans of `data`, contiguous runs merged.
    cdef list spans = []
    cdef Py_ssize_t run_start, run_end

    if size < 17 or memcmp(buf, b"HTTP/1.1 ", 9) != 0:
        return None
    if not (49 <= buf[9] <= 53 and 48 <= buf[10] <= 57 and 48 <= buf[11] <= 57) or buf[12] != 32:
        return None                    # status 100-599 as three digits then SP; 1xx below
    status = (buf[9] - 48) * 100 + (buf[10] - 48) * 10 + (buf[11] - 48)
    if status < 200 or status == 204 or status == 304:
        return None
    # Reason phrase
    pos = 13
    while pos < size and buf[pos] != 13:
        if not CLASS[buf[pos]] & 2:
            return None
        pos += 1
    if pos + 1 >= size or buf[pos + 1] != 10:
        return None
    run_start = 0
    run_end = pos + 2                  # status line with its CRLF
    pos += 2
    # Header lines
    while True:
        if pos + 1 >= size:
            return None                # the head is not complete in this read
        if buf[pos] == 13:
            if buf[pos + 1] != 10:
                return None
            body_start = pos + 2
            break
        line_start = pos
        while pos < size and CLASS[buf[pos]] & 1:
            pos += 1
        name_end = pos
        if name_end == line_start or pos >= size or buf[pos] != 58:     # ':'
            return None                # empty or invalid name, space before ':', obs-fold
        pos += 1
        while pos < size and (buf[pos] == 32 or buf[pos] == 9):
            pos += 1
        value_start = pos
        while pos < size and buf[pos] != 13:
            if not CLASS[buf[pos]] & 2:
                return None            # control bytes, bare LF, NUL
            pos += 1
        if pos + 1 >= size or buf[pos + 1] != 10:
            return None
        value_end = pos
        while value_end > value_start and (buf[value_end - 1] == 32 or buf[value_end - 1] == 9):
            value_end -= 1
        line_end = pos + 2
        pos = line_end
        kind = classify(buf + line_start, name_end - line_start)
        if watched and kind == KEEP and is_watched(buf + line_start, name_end - line_start, watched):
            return None
        if kind == KEEP or kind == CLEN:
            if kind == CLEN:
                if content_length >= 0 or value_end == value_start or value_end - value_start > 15:
                    return None
                content_length = 0
                for i in range(value_start, value_end):
                    c = buf[i]
                    if not 48 <= c <= 57:
                        return None
                    content_length = content_length * 10 + (c - 48)
            if line_start == run_end:
                run_end = line_end
            else:
                spans.append((run_start, run_end))
                run_start, run_end = line_start, line_end
            continue
        if kind == GIVE_UP:
            return None
        if kind == CONN:
            if value_is(buf + value_start, value_end - value_start, b"close", 5):
                backend_close = True
            elif not value_is(buf + value_start, value_end - value_start, b"keep-alive", 10):
                return None            # a list, or names of headers to drop: httptools' job
        # DROP and CONN lines are not forwarded: the current run ends before them.
    if content_length < 0 or size - body_start != content_length:
        return None                    # no length, a body still to come, or bytes after it
    spans.append((run_start, run_end))
    if len(spans) == 1:
        head = data[run_start:run_end]
    else:
        head = b"".join([data[s:e] for s, e in spans])
    return status, head, body_start, backend_close
