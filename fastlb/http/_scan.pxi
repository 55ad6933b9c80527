# The one-pass scanner for plain backend responses, shared by fastlb/http/_head.pyx (the Python path's
# fast response) and fastlb/http/_fast.pyx (the C engine). Included, not imported: both call it per
# response, and a cdef function across modules would go through a capsule pointer for nothing.
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



cdef enum:
    MAX_SPANS = 32          # runs of forwarded header lines; more (many dropped lines between kept ones): slow path


cdef struct HeadSpan:
    Py_ssize_t start
    Py_ssize_t end


cdef struct PlainResponse:
    int status
    Py_ssize_t body_start
    Py_ssize_t body_left       # Content-Length bytes not in this read yet (0: the response is whole)
    bint backend_close
    int nspans
    HeadSpan spans[MAX_SPANS]


cdef bint scan_plain(const unsigned char* buf, Py_ssize_t size, tuple watched, tuple dropped,
                     PlainResponse* out):
    """True when buf[:size] starts a plain response (see the module docstring of _head.pyx): then
    `out` holds the status, the spans of the head to forward (without the header lines named in
    `dropped`: the operator's response rules), where the body starts, how many of its Content-Length
    bytes are still to come (body_left; 0: whole in this read), and whether the backend asked to
    close. False for anything else (bytes after the body included), having consumed nothing."""
    cdef Py_ssize_t pos, line_start, line_end, name_end, value_start, value_end, i
    cdef Py_ssize_t content_length = -1, body_start
    cdef int status, kind
    cdef bint backend_close = False
    cdef unsigned char c
    cdef Py_ssize_t run_start, run_end
    cdef int nspans = 0

    if size < 17 or memcmp(buf, b"HTTP/1.1 ", 9) != 0:
        return False
    if not (49 <= buf[9] <= 53 and 48 <= buf[10] <= 57 and 48 <= buf[11] <= 57) or buf[12] != 32:
        return False                   # status 100-599 as three digits then SP; 1xx below
    status = (buf[9] - 48) * 100 + (buf[10] - 48) * 10 + (buf[11] - 48)
    if status < 200 or status == 204 or status == 304:
        return False
    # Reason phrase
    pos = 13
    while pos < size and buf[pos] != 13:
        if not CLASS[buf[pos]] & 2:
            return False
        pos += 1
    if pos + 1 >= size or buf[pos + 1] != 10:
        return False
    run_start = 0
    run_end = pos + 2                  # status line with its CRLF
    pos += 2
    # Header lines
    while True:
        if pos + 1 >= size:
            return False               # the head is not complete in this read
        if buf[pos] == 13:
            if buf[pos + 1] != 10:
                return False
            body_start = pos + 2
            break
        line_start = pos
        while pos < size and CLASS[buf[pos]] & 1:
            pos += 1
        name_end = pos
        if name_end == line_start or pos >= size or buf[pos] != 58:     # ':'
            return False               # empty or invalid name, space before ':', obs-fold
        pos += 1
        while pos < size and (buf[pos] == 32 or buf[pos] == 9):
            pos += 1
        value_start = pos
        while pos < size and buf[pos] != 13:
            if not CLASS[buf[pos]] & 2:
                return False           # control bytes, bare LF, NUL
            pos += 1
        if pos + 1 >= size or buf[pos + 1] != 10:
            return False
        value_end = pos
        while value_end > value_start and (buf[value_end - 1] == 32 or buf[value_end - 1] == 9):
            value_end -= 1
        line_end = pos + 2
        pos = line_end
        kind = classify(buf + line_start, name_end - line_start)
        if watched and kind == KEEP and is_watched(buf + line_start, name_end - line_start, watched):
            return False
        if dropped and kind == KEEP and is_watched(buf + line_start, name_end - line_start, dropped):
            kind = DROP
        if kind == KEEP or kind == CLEN:
            if kind == CLEN:
                if content_length >= 0 or value_end == value_start or value_end - value_start > 15:
                    return False
                content_length = 0
                for i in range(value_start, value_end):
                    c = buf[i]
                    if not 48 <= c <= 57:
                        return False
                    content_length = content_length * 10 + (c - 48)
            if line_start == run_end:
                run_end = line_end
            else:
                if nspans == MAX_SPANS - 1:
                    return False
                out.spans[nspans].start = run_start
                out.spans[nspans].end = run_end
                nspans += 1
                run_start, run_end = line_start, line_end
            continue
        if kind == GIVE_UP:
            return False
        if kind == CONN:
            if value_is(buf + value_start, value_end - value_start, b"close", 5):
                backend_close = True
            elif not value_is(buf + value_start, value_end - value_start, b"keep-alive", 10):
                return False           # a list, or names of headers to drop: httptools' job
        # DROP and CONN lines are not forwarded: the current run ends before them.
    if content_length < 0 or size - body_start > content_length:
        return False                   # no length, or bytes after the body
    out.spans[nspans].start = run_start
    out.spans[nspans].end = run_end
    out.nspans = nspans + 1
    out.status = status
    out.body_start = body_start
    out.body_left = content_length - (size - body_start)
    out.backend_close = backend_close
    return True
