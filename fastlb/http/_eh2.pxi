# HTTP/2 clients served by the HTTP engine with libnghttp2 (included by fastlb/http/_fast.pyx after
# _etls.pxi): h2c when a plain connection's first bytes are the preface, h2 when ALPN chose it. With
# FASTLB_H2_ENGINE=0 such a connection is handed whole to the Python path (fastlb/http2/) instead.
#
# Shape: an HTTP/2 connection is a Client whose `h2` is an H2Conn (its nghttp2 server session, the flood
# budget, its open streams). Each stream is a Client of its own (kind IS_STREAM, no socket, `h2` its
# H2Stream) that goes through the engine's HTTP/1.1 request machinery unchanged: its header list is
# written as the HTTP/1.1 request head fastlb/http2/connection.py's H2Connection.request writes (same
# checks, same `Connection: close`), parse_request reads it (header rules, captures, hashing keys, sticky
# pins, limits), dispatch picks and places it on an idle backend connection (or Python connects), the one
# sweep watches its response deadline, and on_backend_readable forwards a plain response (_scan.pxi), the
# access log and counters included. Where the engine writes an answer to a client (write_answer), a
# stream's HTTP/1.1 answer becomes a HEADERS frame (connection-specific fields dropped, as ResponseSink
# does) and its body DATA frames read from the stream's pending buffer by a data provider.
#
# What a stream cannot finish here (where the engine hands an HTTP/1.1 client to the Python path: a
# request it does not serve, no backend to pick now, a backend that failed, a response not plain, a
# --retry-on status, a response timeout; and a request body larger than one engine read, request
# trailers) is handed over alone (h2_handed): its HTTP/1.1 request goes to the Python path over a
# socketpair, which serves it as the Python path serves an HTTP/2 stream's request, and the HTTP/1.1
# response it writes back is turned into frames here (h2_parse_response), as ResponseSink does.
#
# libnghttp2 is not reentrant: frames are written (mem_send) only outside mem_recv; answers submitted
# while it reads are written when the read is done.

from fastlb.http2.nghttp2 cimport *
from libc.stdint cimport uint8_t
from libc.stdio cimport snprintf
from libc.string cimport memchr
from os import environ

cdef enum:
    IS_STREAM = 5                # Client.kind of an HTTP/2 stream (never in the epoll set)

# Engine.h2_mode: who serves HTTP/2 clients.
cdef enum:
    H2_OFF = 0                   # nobody (--h2 off): a preface is a bad HTTP/1.1 request
    H2_PYTHON = 1                # the Python path (fastlb/http2/), handed over (HAND_H2)
    H2_ENGINE = 2                # the engine (unless FASTLB_H2_ENGINE=0)

H2_ENGINE_ENV = "FASTLB_H2_ENGINE"

# What a stream handed to the Python path reads next of the HTTP/1.1 response coming back (H2Stream.rstate).
cdef enum:
    R_HEAD = 0                   # a response head (1xx heads go on as interim HEADERS, as ResponseSink's)
    R_LENGTH = 1                 # a Content-Length body
    R_CHUNK_SIZE = 2             # a chunk-size line
    R_CHUNK_DATA = 3
    R_CHUNK_END = 4              # the CRLF after a chunk
    R_TRAILERS = 5               # the trailer section of a chunked body
    R_UNTIL_CLOSE = 6            # a body that ends when the connection does
    R_DONE = 7                   # the response is whole; anything after it is none of ours

# A response body held for a stream handed to the Python path: from HIGH on the socketpair is not read
# until the client took it below LOW. (Lower than the Python path's STREAM_BUFFER_HIGH / _LOW: the
# socketpair and the Python side's transport hold some of the body too.)
cdef enum:
    H2_BUFFER_HIGH = 64 * 1024
    H2_BUFFER_LOW = 16 * 1024
    MAX_RESPONSE_LINE = 65536    # a response head or trailer section longer than this: the stream is reset

# A stream's header list as received: records of (name length, value length, name, value).
cdef enum:
    FIELD_RECORD = 8             # two uint32 lengths before the bytes

# Ended streams' contexts are kept for the next streams (Engine.h2_spare: no allocation per stream), at
# most H2_SPARE_STREAMS of them per engine (streams opened and reset in a flood do not grow it), each with
# its header-list and body buffers when they are no larger than H2_SPARE_BUFFER.
cdef enum:
    H2_SPARE_STREAMS = 256
    H2_SPARE_BUFFER = 2048
    H2_STREAM_TAIL = 160         # a new context's room for its X-Forwarded-* block and address (or more)
    H2_ANSWER_FIELDS = 64        # an answer's fields read into an array on the stack (more: one allocated)

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


# libnghttp2's allocations for the engine's sessions (a stream costs it four or five: its stream, its
# frames, the response's fields): blocks of a few sizes, each size's freed blocks kept for reuse (at most
# H2_MEM_KEPT of each: the rest go back to malloc), larger ones straight from malloc. A block carries its
# size class in the H2_MEM_HEADER bytes before it (16: malloc's alignment kept). The engine runs on one
# thread, holding the GIL: one pool for the process.
cdef enum:
    H2_MEM_CLASSES = 5           # blocks of 64, 128, 256, 512 and 1024 bytes
    H2_MEM_SMALLEST = 64
    H2_MEM_LARGE = H2_MEM_CLASSES    # the class of a block from malloc
    H2_MEM_KEPT = 512
    H2_MEM_HEADER = 16

cdef void *h2_mem_kept[H2_MEM_CLASSES]      # each class's freed blocks, linked through their first bytes
cdef int h2_mem_count[H2_MEM_CLASSES]


cdef void *h2_mem_malloc(size_t size, void *user_data) noexcept:
    cdef size_t k = 0, room = H2_MEM_SMALLEST
    cdef char *block
    while room < size and k < H2_MEM_CLASSES:
        room <<= 1
        k += 1
    if k < H2_MEM_CLASSES and h2_mem_kept[k] != NULL:
        block = <char *>h2_mem_kept[k]
        h2_mem_kept[k] = (<void **>block)[0]
        h2_mem_count[k] -= 1
        return block
    block = <char *>malloc((room if k < H2_MEM_CLASSES else size) + H2_MEM_HEADER)
    if block == NULL:
        return NULL
    (<size_t *>block)[0] = k
    return block + H2_MEM_HEADER


cdef void h2_mem_free(void *ptr, void *user_data) noexcept:
    cdef size_t k
    if ptr == NULL:
        return
    k = (<size_t *>(<char *>ptr - H2_MEM_HEADER))[0]
    if k == H2_MEM_LARGE or h2_mem_count[k] >= H2_MEM_KEPT:
        free(<char *>ptr - H2_MEM_HEADER)
        return
    (<void **>ptr)[0] = h2_mem_kept[k]
    h2_mem_kept[k] = ptr
    h2_mem_count[k] += 1


cdef void *h2_mem_calloc(size_t count, size_t size, void *user_data) noexcept:
    cdef void *ptr
    if size and count > (<size_t>-1) // size:
        return NULL
    ptr = h2_mem_malloc(count * size, user_data)
    if ptr != NULL:
        memset(ptr, 0, count * size)
    return ptr


cdef void *h2_mem_realloc(void *ptr, size_t size, void *user_data) noexcept:
    cdef size_t k, room
    cdef char *block
    cdef void *grown
    if ptr == NULL:
        return h2_mem_malloc(size, user_data)
    if size == 0:
        h2_mem_free(ptr, user_data)
        return NULL
    block = <char *>ptr - H2_MEM_HEADER
    k = (<size_t *>block)[0]
    if k == H2_MEM_LARGE:
        block = <char *>realloc(block, size + H2_MEM_HEADER)
        return block + H2_MEM_HEADER if block != NULL else NULL
    room = <size_t>H2_MEM_SMALLEST << k
    if size <= room:
        return ptr
    grown = h2_mem_malloc(size, user_data)
    if grown != NULL:
        memcpy(grown, ptr, room)
        h2_mem_free(ptr, user_data)
    return grown


cdef nghttp2_mem h2_mem
h2_mem.mem_user_data = NULL
h2_mem.mem_malloc = h2_mem_malloc
h2_mem.mem_free = h2_mem_free
h2_mem.mem_calloc = h2_mem_calloc
h2_mem.mem_realloc = h2_mem_realloc


cdef inline bint connection_specific(const unsigned char *name, Py_ssize_t n) noexcept:
    """A response field name HTTP/2 forbids (fastlb/http2/common.py's CONNECTION_SPECIFIC; any case)."""
    if n == 10:
        return name_is(name, n, b"connection", 10) or name_is(name, n, b"keep-alive", 10)
    if n == 7:
        return name_is(name, n, b"upgrade", 7)
    if n == 17:
        return name_is(name, n, b"transfer-encoding", 17)
    if n == 16:
        return name_is(name, n, b"proxy-connection", 16)
    return False


cdef struct FieldLines:
    int count                    # fields put in the nv array
    int room                     # the array's size
    unsigned char full           # lines left out for want of room
    unsigned char blank          # the blank line that ends a head was read
    unsigned char chunked        # a Transfer-Encoding line (the only coding the Python path forwards)
    unsigned char has_length     # a Content-Length line, of value `length`
    uint64_t length


cdef inline void fields_start(FieldLines *out, int room) noexcept:
    memset(out, 0, sizeof(FieldLines))
    out.room = room


cdef Py_ssize_t field_lines(const char *r, Py_ssize_t pos, Py_ssize_t end, nghttp2_nv *nva,
                            FieldLines *out) noexcept:
    """HTTP/1.1 field lines r[pos:end] (each ending in CRLF), up to a blank line, added to nva (from
    out.count, out.room at most): values without their leading white space, connection-specific fields
    out (as ResponseSink does; libnghttp2 lower-cases the names as it copies them, so they are read in
    place); Transfer-Encoding and Content-Length noted. Where it stopped: end, or after the blank line
    (out.blank); -1: a line without a colon or its CRLF, or a Content-Length that is not digits."""
    cdef const char *colon_at
    cdef Py_ssize_t line, colon, stop, value_start, i, name_len
    while pos < end:
        line = pos
        stop = pos + find_crlf(r + pos, end - pos)
        if stop < pos:
            return -1
        pos = stop + 2
        if stop == line:
            out.blank = 1
            return pos
        colon_at = <const char *>memchr(r + line, 58, stop - line)
        if colon_at == NULL:
            return -1
        colon = colon_at - r
        name_len = colon - line
        value_start = colon + 1
        while value_start < stop and (r[value_start] == 32 or r[value_start] == 9):
            value_start += 1
        if name_len == 17 and name_is(<const unsigned char *>r + line, 17, b"transfer-encoding", 17):
            out.chunked = 1
            continue
        if name_len == 14 and name_is(<const unsigned char *>r + line, 14, b"content-length", 14):
            out.has_length = 1
            out.length = 0
            for i in range(value_start, stop):
                if not 48 <= r[i] <= 57:
                    return -1
                out.length = out.length * 10 + (r[i] - 48)
        elif connection_specific(<const unsigned char *>r + line, name_len):
            continue
        if out.count == out.room:
            out.full = 1
            continue
        nva[out.count].name = <uint8_t *>(r + line)
        nva[out.count].namelen = name_len
        nva[out.count].value = <uint8_t *>(r + value_start)
        nva[out.count].valuelen = stop - value_start
        nva[out.count].flags = NGHTTP2_NV_FLAG_NONE
        out.count += 1
    return pos


cdef inline int count_lines(const char *r, Py_ssize_t end) noexcept:
    cdef int count = 0
    cdef Py_ssize_t i
    for i in range(end):
        if r[i] == 10:
            count += 1
    return count


cdef struct H2Conn:
    nghttp2_session *session
    void *engine                 # the Engine (borrowed: it outlives its clients)
    Client *owner
    Client *streams              # its open streams, linked by Client.prev / next
    int nstreams
    unsigned char receiving      # inside mem_recv: frames wait until it returns (not reentrant)
    unsigned char goaway_sent
    unsigned char flooded
    unsigned char flush_due      # in Engine.h2_due: written once the batch of events is handled
    unsigned char wake           # a paused stream may read its socketpair again (h2_read_body)
    double tokens, refilled_at   # the control-frame budget (_nghttp2.Session.spend's)
    double idle_since


cdef struct H2Stream:
    Client *conn
    int32_t id
    unsigned char dispatched     # its request went to the engine's machinery
    unsigned char is_head
    uint32_t header_size         # RFC 9113 6.5.2 size of its header list
    char *fields                 # FIELD_RECORD records, while its header block is read; then, while
    uint32_t fields_len          # its body is read, the HTTP/1.1 request (head without its last CRLF,
    uint32_t fields_cap          # body after it: see h2_body)
    uint32_t head_len            # a request with a body: its head's length in `fields`
    unsigned char has_length     # its head has a Content-Length
    unsigned char in_body        # its body is being read (whole in `fields` until it ends or overflows)
    unsigned char relay          # its body goes on to the Python path as it comes (h2_relay_start)
    unsigned char chunked        # ... re-framed chunked (no Content-Length), as H2Connection does
    uint32_t unconsumed          # body bytes received and not yet passed on (the client's window)
    char *trailers_in            # request trailers as `name: value` CRLF lines
    uint32_t trailers_in_len
    double grpc_deadline         # a gRPC call's grpc-timeout as a monotonic time (0: none)
    # Handed to the Python path (h2_handed): its HTTP/1.1 response read back from the socketpair
    # (Client.tunnel) and turned into frames as ResponseSink does: the parser's state, the response's.
    unsigned char rstate         # R_*
    unsigned char submitted      # its HEADERS went to the session
    unsigned char out_eof        # its body is all in the pending buffer (fast path: at once)
    unsigned char paused         # the socketpair is not read while the client has not taken the body
    uint64_t remaining           # bytes left of a Content-Length body or of a chunk
    char *line                   # a response head, a chunk-size line or trailers being read
    uint32_t line_len
    uint32_t line_cap
    nghttp2_nv *trailers         # response trailers (a chunked response's), sent after the body,
    char *trailer_buf            # ... pointing into this copy of their section
    int ntrailers
    double opened
    uint32_t pending_cap         # the size of the Client's pending buffer (the body for the client)
    uint32_t room                # the bytes its allocation has for the X-Forwarded-* block and address
    void *up                     # its request on an HTTP/2 backend (_eh2b.pxi's H2UpStream), or NULL


cdef inline H2Conn *conn_of(Client *c) noexcept:
    return <H2Conn *>c.h2


cdef inline H2Stream *stream_of(Client *c) noexcept:
    return <H2Stream *>c.h2


cdef h2_configure(Engine self, glue):
    """The HTTP/2 limits of the runtime's H2Settings (fastlb/http2/connection.py), read once."""
    h2 = glue.runtime.h2
    if h2 is None:
        self.h2_mode = H2_OFF
        return
    self.h2_mode = H2_PYTHON if environ.get(H2_ENGINE_ENV) == "0" else H2_ENGINE
    self.h2_max_streams = h2.max_concurrent_streams
    self.h2_max_header_list = h2.max_header_list_size
    self.h2_initial_window = h2.initial_window_size
    self.h2_connection_window = h2.connection_window_size
    self.h2_control_burst = h2.max_control_frames
    if self.h2_mode == H2_ENGINE:
        # A stream's request head written whole (a header list's worth), or a head and a body the
        # engine serves (MAX_FAST_HEAD).
        self.h2_request_cap = MAX_FAST_HEAD + self.h2_max_header_list + 1024
        self.h2_request_buf = <char *>malloc(self.h2_request_cap)
        if self.h2_request_buf == NULL:
            raise MemoryError()


cdef bint h2_preface(Engine self, Client *c, Py_ssize_t n):
    """A plain connection's first bytes (in scratch) that are HTTP/2's preface, or its start: served
    here (H2_ENGINE) or handed to the Python path (which holds a partial preface). False: not a preface
    at a connection's start, or HTTP/2 is off (the request parser's then)."""
    if self.h2_mode == H2_OFF or c.deadline_kind != WAIT_HEAD or c.tls != NULL:
        return False
    if memcmp(self.scratch, PyBytes_AS_STRING(H2_PREFACE), min(n, 24)) != 0:
        return False
    if n >= 24 and self.h2_mode == H2_ENGINE and h2_start(self, c):
        h2_receive(self, c, self.scratch, n)
        return True
    self.adopt(c, self.scratch, n, HAND_H2)
    return True


cdef bint h2_start(Engine self, Client *c):
    """c speaks HTTP/2 from now on (its preface read, or ALPN h2): its server session, the flood options
    and SETTINGS the Python path's _nghttp2.Session uses. False: out of memory (c untouched)."""
    cdef nghttp2_session_callbacks *callbacks
    cdef H2Conn *h = <H2Conn *>calloc(1, sizeof(H2Conn))
    cdef int rv
    if h == NULL:
        return False
    if nghttp2_session_callbacks_new(&callbacks) != 0:
        free(h)
        return False
    nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, h2_on_frame_recv)
    nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks, h2_on_begin_headers)
    nghttp2_session_callbacks_set_on_header_callback(callbacks, h2_on_header)
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, h2_on_data_chunk_recv)
    nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, h2_on_stream_close)
    rv = server_session(&h.session, callbacks, <void *>c, self.h2_max_streams, self.h2_max_header_list,
                        self.h2_initial_window, self.h2_connection_window, &h2_mem)
    nghttp2_session_callbacks_del(callbacks)
    if rv != 0:
        free(h)
        return False
    h.engine = <void *>self
    h.owner = c
    h.tokens = self.h2_control_burst
    h.refilled_at = self.now
    h.idle_since = self.now
    c.h2 = <void *>h
    # Its deadlines are its streams' and its idleness (h2_sweep), not a request head's.
    c.deadline_kind = WAIT_STREAMS
    self.h2_connections += 1
    return True


cdef void h2_receive(Engine self, Client *c, const char *data, Py_ssize_t n):
    """Bytes from an HTTP/2 client: fed to its session, then what it has to say is written."""
    cdef H2Conn *h = conn_of(c)
    cdef ssize_t rv
    h.receiving = 1
    rv = nghttp2_session_mem_recv(h.session, <const uint8_t *>data, n)
    h.receiving = 0
    if c.kind != IS_CLIENT:
        return
    if rv < 0:
        # A connection error (libnghttp2 queued its GOAWAY): written, then closed.
        h2_flush(self, c)
        if c.kind == IS_CLIENT:
            self.close_client(c)
        return
    h2_flush(self, c)


cdef void h2_readable(Engine self, Client *c):
    """Reads an HTTP/2 client until it would block (edge-triggered)."""
    cdef ssize_t n
    while c.kind == IS_CLIENT:
        if c.pending != NULL:
            return                  # a client that does not read what it asked for is not read either
        n = client_recv(c, self.scratch, SCRATCH)
        if n == WOULD_BLOCK:
            return
        if n <= 0:
            self.close_client(c)
            return
        h2_receive(self, c, self.scratch, n)
        if n < SCRATCH and c.tls == NULL and not c.hung_up:
            return                  # (plain: a short read drained the socket; after a FIN, read its EOF)


cdef bint h2_flush(Engine self, Client *c):
    """Writes the frames the session has ready, unless it is reading (then its caller does); False when
    the connection ended."""
    cdef H2Conn *h = conn_of(c)
    cdef const uint8_t *data
    cdef ssize_t n, w, have
    if h.receiving:
        return True
    while c.pending != NULL:
        w = client_send(c, c.pending + c.pending_off, c.pending_len - c.pending_off)
        if w == FAILED:
            self.close_client(c)
            return False
        if w == 0:
            return True             # EPOLLOUT resumes (h2_event)
        c.pending_off += <uint32_t>w
        if c.pending_off == c.pending_len:
            free(c.pending)
            c.pending = NULL
            c.pending_len = c.pending_off = 0
    while True:
        # Frames gathered in headbuf, written in one send (TLS: one record run).
        have = 0
        while True:
            n = nghttp2_session_mem_send(h.session, &data)
            if n < 0:
                self.close_client(c)
                return False
            if n == 0:
                break
            if have + n > SCRATCH:
                # Larger than what is left: what is gathered goes first, then this one alone.
                if have:
                    w = client_send(c, self.headbuf, have)
                    if not h2_sent(self, c, self.headbuf, have, w):
                        return False
                    have = 0
                    if c.pending != NULL:
                        return h2_hold(self, c, <const char *>data, n)
                w = client_send(c, <const char *>data, n)
                if not h2_sent(self, c, <const char *>data, n, w):
                    return False
                if c.pending != NULL:
                    return True
                continue
            memcpy(self.headbuf + have, data, n)
            have += n
        if have == 0:
            break
        w = client_send(c, self.headbuf, have)
        if not h2_sent(self, c, self.headbuf, have, w):
            return False
        if c.pending != NULL:
            return True
    if h.wake:
        h.wake = 0
        h2_wake_streams(self, c)
        if c.kind != IS_CLIENT:
            return False
    if not nghttp2_session_want_read(h.session) and not nghttp2_session_want_write(h.session):
        self.close_client(c)        # GOAWAY sent and every stream done
        return False
    if c.read_pending:
        # Bytes came while an answer waited for the client to read: read now (no edge will say so).
        c.read_pending = 0
        h2_readable(self, c)
        return c.kind == IS_CLIENT
    return True


cdef void h2_wake_streams(Engine self, Client *c):
    """Streams whose socketpair reading paused and whose body the client took: read again."""
    cdef Client *s = conn_of(c).streams
    cdef Client *next_stream
    while s != NULL and c.kind == IS_CLIENT:
        next_stream = s.next
        if not stream_of(s).paused and s.tls.tunnel.fd >= 0:
            h2_from_python(self, s)
        s = next_stream


cdef void h2_flush_soon(Engine self, Client *c):
    """Frames are ready (a backend's response): written after this batch of events, so the responses
    of the streams a batch completes leave in one write (as the Python path's flush_soon)."""
    cdef H2Conn *h = conn_of(c)
    cdef Client **grown
    if not self.in_batch:
        h2_flush(self, c)
        return
    if h.flush_due:
        return
    if self.h2_due_count == self.h2_due_cap:
        grown = <Client **>realloc(self.h2_due, sizeof(Client *) * (self.h2_due_cap * 2 + 16))
        if grown == NULL:
            h2_flush(self, c)
            return
        self.h2_due = grown
        self.h2_due_cap = self.h2_due_cap * 2 + 16
    h.flush_due = 1
    self.h2_due[self.h2_due_count] = c
    self.h2_due_count += 1


cdef void h2_flush_due(Engine self):
    """The end of a batch: every connection with frames ready writes them (one closed meanwhile is
    skipped: its memory is freed only after the batch, by bury)."""
    cdef int i = 0
    cdef Client *c
    while i < self.h2_due_count:          # (a flush that reads may add connections)
        c = self.h2_due[i]
        i += 1
        if c.kind == IS_CLIENT and c.h2 != NULL and conn_of(c).flush_due:
            conn_of(c).flush_due = 0
            h2_flush(self, c)
    self.h2_due_count = 0


cdef bint h2_sent(Engine self, Client *c, const char *data, ssize_t size, ssize_t w):
    """After a send of `size` bytes took `w`: the rest waits in c.pending. False when the client is gone."""
    if w == FAILED:
        self.close_client(c)
        return False
    if w < size:
        return h2_hold(self, c, data + w, size - w)
    return True


cdef bint h2_hold(Engine self, Client *c, const char *data, ssize_t size):
    """Bytes the socket did not take: written on EPOLLOUT (appended to what waits already)."""
    cdef char *grown = <char *>realloc(c.pending, c.pending_len + size)
    if grown == NULL:
        self.close_client(c)
        return False
    memcpy(grown + c.pending_len, data, size)
    c.pending = grown
    c.pending_len += <uint32_t>size
    return True


cdef void h2_event(Engine self, Client *c, uint32_t ev):
    """An epoll event on an HTTP/2 client."""
    if ev & (EPOLLRDHUP | EPOLLHUP):
        c.hung_up = 1
    if c.pending != NULL and (ev & EPOLLOUT or c.tls != NULL):
        if not h2_flush(self, c):
            return
    if c.kind == IS_CLIENT and ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        if c.pending != NULL:
            c.read_pending = 1
            return
        h2_readable(self, c)


cdef bint h2_spend(Engine self, H2Conn *h) noexcept:
    """One control-frame token (_nghttp2.Session.spend): False, and GOAWAY ENHANCE_YOUR_CALM, when the
    budget is spent."""
    cdef double now = monotonic_now()
    h.tokens += (now - h.refilled_at) * (self.h2_control_burst / <double>H2_CONTROL_REFILL_DIVISOR)
    h.refilled_at = now
    if h.tokens > self.h2_control_burst:
        h.tokens = self.h2_control_burst
    if h.tokens < 1.0:
        if not h.flooded:
            h.flooded = 1
            nghttp2_session_terminate_session(h.session, NGHTTP2_ENHANCE_YOUR_CALM)
        return False
    h.tokens -= 1.0
    return True


# ---- streams ------------------------------------------------------------------------------------------

cdef Client *h2_new_stream(Engine self, Client *conn, int32_t stream_id):
    """A request context for stream_id, copying what the engine reads of its connection: an ended
    stream's (Engine.h2_spare) with its buffers, or a new one. One allocation: the Client, always a
    ClientTls (its tunnel is the socketpair of a stream handed to the Python path; its ssl is the
    connection's, NULL on h2c), the H2Stream, ClientCaptures where the settings use them, then room for
    the X-Forwarded-* block and the address."""
    cdef size_t stream_at = sizeof(Client) + sizeof(ClientTls)
    cdef size_t captures_at = stream_at + sizeof(H2Stream)
    cdef size_t forward_at = captures_at + (sizeof(ClientCaptures) if self.captures_used else 0)
    cdef uint32_t need = conn.forward_len + conn.ip_len
    cdef Client *s = self.h2_spare
    cdef H2Stream *st
    cdef H2Conn *h = conn_of(conn)
    cdef char *fields = NULL
    cdef char *pending = NULL
    cdef uint32_t fields_cap = 0, pending_cap = 0, room
    if s != NULL and stream_of(s).room >= need:
        self.h2_spare = s.next
        self.h2_spare_count -= 1
        st = stream_of(s)
        fields, fields_cap, pending, pending_cap, room = st.fields, st.fields_cap, s.pending, st.pending_cap, st.room
        memset(s, 0, forward_at)
    else:
        room = max(need, <uint32_t>H2_STREAM_TAIL)
        s = <Client *>calloc(1, forward_at + room)
        if s == NULL:
            return NULL
    st = <H2Stream *>(<char *>s + stream_at)
    st.fields = fields
    st.fields_cap = fields_cap
    st.room = room
    s.pending = pending
    st.pending_cap = pending_cap
    s.tls = <ClientTls *>(s + 1)
    s.h2 = <void *>st
    if conn.tls != NULL and conn.tls.tls_block_len:
        s.tls.tls_block = <char *>malloc(conn.tls.tls_block_len)
        if s.tls.tls_block == NULL:
            h2_free_context(s)
            return NULL
        memcpy(s.tls.tls_block, conn.tls.tls_block, conn.tls.tls_block_len)
        s.tls.tls_block_len = conn.tls.tls_block_len
    if self.captures_used:
        s.caps = <ClientCaptures *>(<char *>s + captures_at)
        s.caps.pin_slot = -1
    s.forward = <char *>s + forward_at
    memcpy(s.forward, conn.forward, conn.forward_len)
    s.forward_len = conn.forward_len
    s.kind = IS_STREAM
    s.fd = -1
    s.state = WAITING
    s.slot = -1
    s.tls.ssl = conn.tls.ssl if conn.tls != NULL else NULL   # read only (HSTS applies to TLS clients)
    s.bind = conn.bind
    s.ip_len = conn.ip_len
    s.ip = s.forward + conn.forward_len
    memcpy(s.ip, conn.ip, conn.ip_len)
    s.tls.tunnel.kind = IS_FREED
    s.tls.tunnel.fd = -1
    st.conn = conn
    st.id = stream_id
    st.opened = self.now
    s.prev = NULL
    s.next = h.streams
    if h.streams != NULL:
        h.streams.prev = s
    h.streams = s
    h.nstreams += 1
    return s


cdef void h2_retire(Engine self, Client *s):
    """free_client of a stream: its request buffer to the engine's spares (spare_buf), its context kept
    for the next stream (after the batch of events being handled: one of them may still name its
    tunnel), with its header-list and body buffers while they are small."""
    cdef H2Stream *st = stream_of(s)
    self.spare_buf(s)
    if st.pending_cap > H2_SPARE_BUFFER:
        free(s.pending)
        s.pending = NULL
        st.pending_cap = 0
    if st.fields_cap > H2_SPARE_BUFFER:
        free(st.fields)
        st.fields = NULL
        st.fields_cap = 0
    free(st.line)
    free(st.trailers_in)
    st.line = st.trailers_in = NULL
    h2_free_trailers(st)
    free(s.tls.tls_block)
    free(s.tls.up)
    s.tls.tls_block = s.tls.up = NULL
    s.tls.tunnel.kind = IS_FREED
    if s.caps != NULL:
        Py_XDECREF(s.caps.session)
        Py_XDECREF(s.caps.learned)
        s.caps.session = s.caps.learned = NULL
    s.kind = IS_FREED
    if self.in_batch:
        s.next = self.h2_retired
        self.h2_retired = s
    else:
        h2_keep_spare(self, s)


cdef void h2_keep_spare(Engine self, Client *s):
    if self.h2_spare_count >= H2_SPARE_STREAMS:
        h2_free_context(s)
        return
    s.next = self.h2_spare
    self.h2_spare = s
    self.h2_spare_count += 1


cdef void h2_bury(Engine self):
    """The end of a batch of events (Engine.bury): the streams it ended become spares."""
    cdef Client *s
    while self.h2_retired != NULL:
        s = self.h2_retired
        self.h2_retired = s.next
        h2_keep_spare(self, s)


cdef void h2_free_context(Client *s):
    free(stream_of(s).fields)
    free(s.pending)
    free(s)


cdef void h2_free_spares(Engine self):
    """The engine's end: the kept contexts freed."""
    cdef Client *s
    h2_bury(self)
    while self.h2_spare != NULL:
        s = self.h2_spare
        self.h2_spare = s.next
        h2_free_context(s)
    self.h2_spare_count = 0


cdef void h2_unlink_stream(Client *s):
    cdef H2Stream *st = stream_of(s)
    cdef H2Conn *h
    if st.conn == NULL:
        return
    h = conn_of(st.conn)
    if s.prev != NULL:
        s.prev.next = s.next
    else:
        h.streams = s.next
    if s.next != NULL:
        s.next.prev = s.prev
    s.prev = s.next = NULL
    h.nstreams -= 1
    h.idle_since = (<Engine>h.engine).now
    st.conn = NULL


cdef void h2_drop_stream(Engine self, Client *s):
    """The stream is over for its connection (closed by the session, or the connection ended): a
    request in flight lets its backend connection go (as close_client does); one Python connects for
    is freed when it is connected (gone)."""
    cdef Backend *b = s.backend
    cdef H2Stream *st = stream_of(s)
    if st.up != NULL:
        h2b_client_gone(self, s)            # HTTP/2 to backends (_eh2b.pxi)
    if st.unconsumed and st.conn != NULL:
        # Its share of the connection's window (a body not passed on in full).
        nghttp2_session_consume_connection(conn_of(st.conn).session, st.unconsumed)
        st.unconsumed = 0
    h2_unlink_stream(s)
    st.fields_len = 0
    free(st.line)
    st.line = NULL
    free(st.trailers_in)
    st.trailers_in = NULL
    h2_free_trailers(st)
    if s.tls.tunnel.fd >= 0:
        # Handed to the Python path: its end of the socketpair sees the close (and lets its backend go).
        self.forget(s.tls.tunnel.fd)
        s.tls.tunnel.fd = -1
        s.tls.tunnel.kind = IS_FREED
    if b != NULL:
        s.backend = NULL
        self.close_backend(b)
        self.finish(s.slot, self.now - s.sent_at, True, 0, self.request_size(s), 0)
    if s.state == CONNECTING:
        s.gone = 1
        return
    h2_free_stream(self, s)


cdef void h2_free_stream(Engine self, Client *s):
    s.tls.ssl = NULL                # its connection's
    self.free_client(s)             # (kept for the next stream: h2_retire)


cdef int h2_on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept:
    cdef Client *c = <Client *>user_data
    cdef H2Conn *h = conn_of(c)
    cdef Engine self = <Engine>h.engine
    cdef Client *s
    if frame.hd.type != NGHTTP2_HEADERS or frame.headers.cat != NGHTTP2_HCAT_REQUEST:
        return 0
    if h.nstreams >= self.h2_max_streams or h.goaway_sent:
        # SETTINGS_MAX_CONCURRENT_STREAMS before the client acknowledged it (as _nghttp2.pyx), or draining.
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame.hd.stream_id, NGHTTP2_REFUSED_STREAM)
        return 0
    s = h2_new_stream(self, c, frame.hd.stream_id)
    if s == NULL:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    nghttp2_session_set_stream_user_data(session, frame.hd.stream_id, <void *>s)
    return 0


cdef int h2_on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                      const uint8_t *value, size_t valuelen, uint8_t flags, void *user_data) noexcept:
    cdef Client *c = <Client *>user_data
    cdef Engine self = <Engine>conn_of(c).engine
    cdef Client *s = <Client *>nghttp2_session_get_stream_user_data(session, frame.hd.stream_id)
    cdef H2Stream *st
    cdef uint32_t need, length
    cdef char *grown
    if s == NULL:
        return 0
    st = stream_of(s)
    if frame.headers.cat != NGHTTP2_HCAT_REQUEST:
        # Request trailers, under the header list's bound (past it they are dropped, as _nghttp2.pyx does).
        st.header_size += <uint32_t>(namelen + valuelen + H2_FIELD_OVERHEAD)
        if st.header_size > self.h2_max_header_list:
            return 0
        grown = <char *>realloc(st.trailers_in, st.trailers_in_len + namelen + valuelen + 4)
        if grown == NULL:
            return NGHTTP2_ERR_CALLBACK_FAILURE
        st.trailers_in = grown
        st.trailers_in_len = <uint32_t>put(grown, st.trailers_in_len, name, namelen)
        st.trailers_in_len = <uint32_t>put_line(grown, st.trailers_in_len, b": ", 2, value, valuelen)
        return 0
    st.header_size += <uint32_t>(namelen + valuelen + H2_FIELD_OVERHEAD)
    if st.header_size > self.h2_max_header_list:
        return 0                    # not kept: answered 431 when the list is whole
    need = st.fields_len + FIELD_RECORD + <uint32_t>(namelen + valuelen)
    if need > st.fields_cap:
        grown = <char *>realloc(st.fields, max(need, st.fields_cap * 2, 512))
        if grown == NULL:
            return NGHTTP2_ERR_CALLBACK_FAILURE
        st.fields = grown
        st.fields_cap = max(need, st.fields_cap * 2, 512)
    length = <uint32_t>namelen
    memcpy(st.fields + st.fields_len, &length, 4)
    length = <uint32_t>valuelen
    memcpy(st.fields + st.fields_len + 4, &length, 4)
    memcpy(st.fields + st.fields_len + FIELD_RECORD, name, namelen)
    memcpy(st.fields + st.fields_len + FIELD_RECORD + namelen, value, valuelen)
    st.fields_len = need
    return 0


cdef int h2_on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept:
    cdef Client *c = <Client *>user_data
    cdef H2Conn *h = conn_of(c)
    cdef Engine self = <Engine>h.engine
    cdef uint8_t kind = frame.hd.type
    cdef bint end = frame.hd.flags & NGHTTP2_FLAG_END_STREAM
    cdef Client *s
    if end and (kind == NGHTTP2_DATA or kind == NGHTTP2_HEADERS) and h2b_client_end(self, session,
                                                                                  frame.hd.stream_id):
        return 0                            # a request streamed to an HTTP/2 backend (_eh2b.pxi)
    if kind == NGHTTP2_HEADERS:
        s = <Client *>nghttp2_session_get_stream_user_data(session, frame.hd.stream_id)
        if s == NULL:
            return 0
        try:
            if frame.headers.cat == NGHTTP2_HCAT_REQUEST:
                h2_request(self, s, end)
            elif end and (stream_of(s).in_body or stream_of(s).relay):
                h2_body_end(self, s)        # after request trailers
            elif not end:
                h2_spend(self, h)           # HEADERS neither a request nor an end
        except BaseException:
            return NGHTTP2_ERR_CALLBACK_FAILURE
    elif kind == NGHTTP2_DATA:
        s = <Client *>nghttp2_session_get_stream_user_data(session, frame.hd.stream_id)
        if end and s != NULL and (stream_of(s).in_body or stream_of(s).relay):
            try:
                h2_body_end(self, s)
            except BaseException:
                return NGHTTP2_ERR_CALLBACK_FAILURE
        elif not end and frame.hd.length == 0:
            h2_spend(self, h)               # an empty DATA frame carries nothing
    elif kind == NGHTTP2_PING or kind == NGHTTP2_SETTINGS or kind == NGHTTP2_PRIORITY \
            or kind == NGHTTP2_RST_STREAM:
        h2_spend(self, h)
    return 0


cdef int h2_on_data_chunk_recv(nghttp2_session *session, uint8_t flags, int32_t stream_id, const uint8_t *data,
                               size_t size, void *user_data) noexcept:
    """A request body's bytes: kept after its head while the whole request fits what the engine serves
    in one piece (MAX_FAST_HEAD, as an HTTP/1.1 request read at once); past that, the request goes to
    the Python path and its body after it as it comes."""
    cdef Client *c = <Client *>user_data
    cdef Engine self = <Engine>conn_of(c).engine
    cdef Client *s = <Client *>nghttp2_session_get_stream_user_data(session, stream_id)
    cdef H2Stream *st
    if s != NULL and stream_of(s).up != NULL:
        return h2b_client_data(self, s, <const char *>data, size)     # to its HTTP/2 backend (_eh2b.pxi)
    if s == NULL or not (stream_of(s).in_body or stream_of(s).relay):
        h2_consume(session, stream_id, size)
        return 0
    st = stream_of(s)
    try:
        if st.relay:
            st.unconsumed += <uint32_t>size
            h2_relay_body(self, s, <const char *>data, size)
            return 0
        h2_consume(session, stream_id, size)
        if st.fields_len + size + 64 > MAX_FAST_HEAD:
            h2_relay_start(self, s, <const char *>data, size)
            return 0
    except BaseException:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    memcpy(st.fields + st.fields_len, data, size)
    st.fields_len += <uint32_t>size
    return 0


cdef inline void h2_consume(nghttp2_session *session, int32_t stream_id, size_t size) noexcept:
    """Body bytes passed on (or dropped): the client may send as much more."""
    if nghttp2_session_consume(session, stream_id, size) != 0:
        nghttp2_session_consume_connection(session, size)


cdef void h2_body_end(Engine self, Client *s) except *:
    """The request's body is whole (END_STREAM): kept whole, its head (with a Content-Length when the
    client sent none), the body, to the engine; relayed, its end to the Python path. Request trailers
    end a chunked body (H2Connection.body_end); with a Content-Length they are dropped, as there."""
    cdef H2Stream *st = stream_of(s)
    cdef char *out = self.h2_request_buf
    cdef Py_ssize_t at = 0
    cdef uint32_t body_len = st.fields_len - st.head_len
    cdef char digits[24]
    cdef int ndigits
    if st.relay:
        st.relay = 0
        if st.chunked:
            h2_relay_send(self, s, b"0\r\n", 3)
            if st.trailers_in_len:
                h2_relay_send(self, s, st.trailers_in, st.trailers_in_len)
            h2_relay_send(self, s, b"\r\n", 2)
        return
    if st.trailers_in_len and not st.has_length:
        h2_relay_start(self, s, NULL, 0)            # a chunked body with its trailers: the Python path's
        h2_body_end(self, s)
        return
    st.in_body = 0
    at = put(out, at, st.fields, st.head_len)
    if not st.has_length:
        ndigits = snprintf(digits, sizeof(digits), "%u", body_len)
        at = put_line(out, at, b"Content-Length: ", 16, digits, ndigits)
    at = put(out, at, b"\r\n", 2)
    at = put(out, at, st.fields + st.head_len, body_len)
    st.fields_len = 0               # (the buffer stays with the context: h2_retire)
    h2_serve(self, s, out, at)


cdef void h2_relay_start(Engine self, Client *s, const char *data, size_t size) except *:
    """The request goes to the Python path before its body is whole: its head (chunked when it has no
    Content-Length), the body so far, then `data` and the rest as they come (h2_relay_body)."""
    cdef H2Stream *st = stream_of(s)
    cdef uint32_t body_len = st.fields_len - st.head_len
    cdef char *out = <char *>malloc(st.head_len + body_len + 64)
    cdef Py_ssize_t at = 0
    cdef char digits[24]
    cdef int ndigits
    if out == NULL:
        raise MemoryError()
    st.in_body = 0
    st.chunked = not st.has_length
    at = put(out, at, st.fields, st.head_len)
    if st.chunked:
        at = put(out, at, b"Transfer-Encoding: chunked\r\n", 28)
    at = put(out, at, b"\r\n", 2)
    if body_len:
        if st.chunked:
            ndigits = snprintf(digits, sizeof(digits), "%x\r\n", body_len)
            at = put(out, at, digits, ndigits)
        at = put(out, at, st.fields + st.head_len, body_len)
        if st.chunked:
            at = put(out, at, b"\r\n", 2)
    st.fields_len = 0               # (the buffer stays with the context: h2_retire)
    try:
        self.adopt(s, out, at, HAND_REQUEST)
    finally:
        free(out)
    if s.state != TUNNEL:
        return                          # could not be handed over: answered already
    st.relay = 1
    if size:
        st.unconsumed += <uint32_t>size
        h2_relay_body(self, s, data, size)


cdef void h2_relay_body(Engine self, Client *s, const char *data, size_t size):
    cdef char digits[24]
    cdef int ndigits
    if stream_of(s).chunked:
        ndigits = snprintf(digits, sizeof(digits), "%zx\r\n", size)
        h2_relay_send(self, s, digits, ndigits)
        h2_relay_send(self, s, data, size)
        h2_relay_send(self, s, b"\r\n", 2)
    else:
        h2_relay_send(self, s, data, size)


cdef void h2_relay_send(Engine self, Client *s, const char *data, size_t size):
    """Bytes for the Python side of a handed stream: sent, or kept (s.tls.up) until its socket takes them."""
    cdef ssize_t w = 0
    cdef char *grown
    if s.tls.tunnel.fd < 0 or size == 0:
        return
    if s.tls.up == NULL:
        while True:
            w = send(s.tls.tunnel.fd, data, size, MSG_NOSIGNAL)
            if w >= 0 or errno != EINTR:
                break
        if w < 0:
            w = 0                       # (EAGAIN; a failed socket is seen when it is read)
        if <size_t>w == size:
            h2_relay_sent(s)
            return
    grown = <char *>realloc(s.tls.up, s.tls.up_len + size - w)
    if grown == NULL:
        return
    s.tls.up = grown
    memcpy(s.tls.up + s.tls.up_len, data + w, size - w)
    s.tls.up_len += <uint32_t>(size - w)


cdef void h2_relay_flush(Engine self, Client *s):
    """What waits for a handed stream's socketpair: written as it takes it."""
    cdef ssize_t w
    while s.tls.up != NULL and s.tls.tunnel.fd >= 0:
        w = send(s.tls.tunnel.fd, s.tls.up + s.tls.up_off, s.tls.up_len - s.tls.up_off, MSG_NOSIGNAL)
        if w < 0:
            if errno == EINTR:
                continue
            return
        s.tls.up_off += <uint32_t>w
        if s.tls.up_off == s.tls.up_len:
            free(s.tls.up)
            s.tls.up = NULL
            s.tls.up_len = s.tls.up_off = 0
            h2_relay_sent(s)


cdef inline void h2_relay_sent(Client *s) noexcept:
    """Every byte of the body so far reached the Python side: the client may send as much more."""
    cdef H2Stream *st = stream_of(s)
    if st.unconsumed and st.conn != NULL:
        nghttp2_session_consume(conn_of(st.conn).session, st.id, st.unconsumed)
        st.unconsumed = 0


cdef int h2_on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                            void *user_data) noexcept:
    cdef Client *c = <Client *>user_data
    cdef H2Conn *h = conn_of(c)
    cdef Engine self = <Engine>h.engine
    cdef Client *s = <Client *>nghttp2_session_get_stream_user_data(session, stream_id)
    if s == NULL:
        return 0
    nghttp2_session_set_stream_user_data(session, stream_id, NULL)
    if error_code != NGHTTP2_NO_ERROR:
        h2_spend(self, h)                   # a stream reset before its end (Rapid Reset)
    try:
        h2_drop_stream(self, s)
    except BaseException:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef inline bint line_breaker(const char *p, uint32_t n) noexcept:
    """connection.py's LINE_BREAKER: a byte that could not stay inside a request line."""
    cdef uint32_t i
    for i in range(n):
        if <unsigned char>p[i] <= 32 or <unsigned char>p[i] == 127:
            return True
    return False


cdef double grpc_timeout(const char *p, uint32_t n) noexcept:
    """connection.py's grpc_timeout: 1-8 digits and a unit, in seconds; 0.0 when it is not one (the
    field then goes on, unheeded)."""
    cdef double value = 0.0
    cdef uint32_t i
    if n < 2 or n > 9:
        return 0.0
    for i in range(n - 1):
        if not 48 <= <unsigned char>p[i] <= 57:
            return 0.0
        value = value * 10 + (p[i] - 48)
    if p[n - 1] == 72:          # H
        return value * 3600.0
    if p[n - 1] == 77:          # M
        return value * 60.0
    if p[n - 1] == 83:          # S
        return value
    if p[n - 1] == 109:         # m
        return value * 1e-3
    if p[n - 1] == 117:         # u
        return value * 1e-6
    if p[n - 1] == 110:         # n
        return value * 1e-9
    return 0.0


cdef void h2_request(Engine self, Client *s, bint end) except *:
    """The stream's header list is whole: checked and written as H2Connection.request writes it, then
    served as an HTTP/1.1 request of the engine (end: it has no body; else once its body is read)."""
    cdef H2Stream *st = stream_of(s)
    cdef char *f = st.fields
    cdef uint32_t pos = 0, nlen, vlen, size
    cdef const char *name
    cdef const char *value
    cdef const char *method = NULL
    cdef const char *path = NULL
    cdef const char *authority = NULL
    cdef const char *host = NULL
    cdef uint32_t method_len = 0, path_len = 0, authority_len = 0, host_len = 0
    cdef const char *target
    cdef uint32_t target_len
    cdef char *out = self.h2_request_buf
    cdef Py_ssize_t at = 0, cookie_at = -1
    cdef bint cookies = False, has_length = False, expects = False
    cdef char *grown
    if st.header_size > self.h2_max_header_list:
        h2_refuse(self, s, b"431")
        return
    # Pseudo-header fields first (libnghttp2 checked the set and their order), and Host.
    while pos < st.fields_len:
        memcpy(&nlen, f + pos, 4)
        memcpy(&vlen, f + pos + 4, 4)
        name = f + pos + FIELD_RECORD
        value = name + nlen
        pos += FIELD_RECORD + nlen + vlen
        if nlen and name[0] == 58:
            if nlen == 7 and memcmp(name, b":method", 7) == 0:
                method, method_len = value, vlen
            elif nlen == 5 and memcmp(name, b":path", 5) == 0:
                path, path_len = value, vlen
            elif nlen == 10 and memcmp(name, b":authority", 10) == 0:
                authority, authority_len = value, vlen
        elif nlen == 4 and memcmp(name, b"host", 4) == 0:
            host, host_len = value, vlen
    if authority != NULL and host != NULL and (host_len != authority_len
                                               or memcmp(host, authority, host_len) != 0):
        h2_refuse(self, s, b"400")          # RFC 9113 8.3.1: a Host naming another origin
        return
    if method == NULL or line_breaker(method, method_len) or (
            path != NULL and (line_breaker(path, path_len) or path_len == 0
                              or (path[0] != 47 and path[0] != 42))):
        h2_refuse(self, s, b"400")
        return
    if path == NULL:
        # CONNECT: the request parser refuses it (405), the Python path's answer.
        path, path_len = (authority, authority_len) if authority != NULL else (b"/", 1)
    size = method_len + path_len + authority_len + host_len + st.fields_len + 64
    if size > self.h2_request_cap:
        h2_unserved(self, s)                # (not reached: the buffer holds a header list's worth)
        return
    at = put(out, at, method, method_len)
    out[at] = 32
    at = put(out, at + 1, path, path_len)
    at = put(out, at, b" HTTP/1.1\r\n", 11)
    target = authority if authority != NULL else host
    target_len = authority_len if authority != NULL else host_len
    if target != NULL:
        at = put_line(out, at, b"Host: ", 6, target, target_len)
    pos = 0
    while pos < st.fields_len:
        memcpy(&nlen, f + pos, 4)
        memcpy(&vlen, f + pos + 4, 4)
        name = f + pos + FIELD_RECORD
        value = name + nlen
        pos += FIELD_RECORD + nlen + vlen
        if nlen == 0 or name[0] == 58 or (nlen == 4 and memcmp(name, b"host", 4) == 0) \
                or (nlen == 2 and memcmp(name, b"te", 2) == 0):
            continue
        if nlen == 6 and memcmp(name, b"cookie", 6) == 0:
            cookies = True                  # RFC 9113 8.2.3: joined with "; ", after the other lines
            continue
        if nlen == 12 and memcmp(name, b"grpc-timeout", 12) == 0:
            st.grpc_deadline = grpc_timeout(value, vlen)
            if st.grpc_deadline > 0.0:
                st.grpc_deadline += self.now
        if nlen == 14 and memcmp(name, b"content-length", 14) == 0:
            has_length = True
        elif nlen == 6 and memcmp(name, b"expect", 6) == 0:
            expects = True
        at = put(out, at, name, nlen)
        at = put_line(out, at, b": ", 2, value, vlen)
    if cookies:
        at = put(out, at, b"Cookie: ", 8)
        cookie_at = at
        pos = 0
        while pos < st.fields_len:
            memcpy(&nlen, f + pos, 4)
            memcpy(&vlen, f + pos + 4, 4)
            name = f + pos + FIELD_RECORD
            pos += FIELD_RECORD + nlen + vlen
            if nlen == 6 and memcmp(name, b"cookie", 6) == 0:
                if at != cookie_at:
                    at = put(out, at, b"; ", 2)
                at = put(out, at, name + nlen, vlen)
        at = put(out, at, b"\r\n", 2)
    at = put(out, at, b"Connection: close\r\n", 19)
    st.is_head = method_len == 4 and memcmp(method, b"HEAD", 4) == 0
    st.dispatched = 1
    if not end:
        # The head waits in `fields` for the body, appended after it (h2_on_data_chunk_recv).
        grown = <char *>realloc(st.fields, MAX_FAST_HEAD)
        if grown == NULL:
            raise MemoryError()
        st.fields = grown
        st.fields_cap = MAX_FAST_HEAD
        memcpy(st.fields, out, at)
        st.fields_len = st.head_len = <uint32_t>at
        st.has_length = has_length
        st.in_body = 1
        if expects:
            # The client waits for 100 Continue before its body: the Python path answers Expect (as
            # for an HTTP/1.1 client, once the request reached a backend), the body is relayed after.
            h2_relay_start(self, s, NULL, 0)
        elif self.h2b_on and not has_length:
            h2b_dispatch_early(self, s)     # to an HTTP/2 backend, its body streamed after (_eh2b.pxi)
        return
    st.fields_len = 0               # (the buffer stays with the context: h2_retire)
    at = put(out, at, b"\r\n", 2)
    h2_serve(self, s, out, at)


cdef void h2_serve(Engine self, Client *s, const char *request, Py_ssize_t size) except *:
    """The stream's HTTP/1.1 request, whole: parsed and dispatched as the engine serves any."""
    if not self.parse_request(s, <const unsigned char *>request, size):
        self.adopt(s, request, size, HAND_REQUEST)     # what the Python path answers (a 405, a 413...)
        return
    self.dispatch(s)


cdef void h2_refuse(Engine self, Client *s, const char *status):
    """A request refused before it became one (H2Connection._refuse): `status`, no body."""
    cdef H2Stream *st = stream_of(s)
    cdef nghttp2_nv nva[2]
    h2_field(&nva[0], b":status", status)
    h2_field(&nva[1], b"content-length", b"0")
    st.fields_len = 0               # (the buffer stays with the context: h2_retire)
    nghttp2_submit_response(conn_of(st.conn).session, st.id, nva, 2, NULL)


cdef void h2_unserved(Engine self, Client *s):
    """A stream that could not be handed to the Python path (no socketpair: out of files or memory):
    502, counted (Engine.h2_unserved_streams)."""
    cdef H2Stream *st = stream_of(s)
    self.h2_unserved_streams += 1
    if st.conn == NULL:
        return
    h2_refuse(self, s, b"502")
    h2_flush_soon(self, st.conn)


cdef void h2_handed(Engine self, Client *s, const char *data, Py_ssize_t size, int reason,
                    bint limits_checked):
    """adopt() for a stream: its HTTP/1.1 request (and its backend connection in flight, if any) goes to
    the Python path over a socketpair, as a client of the stream's bind; the response it writes back
    becomes the stream's frames (h2_from_python). The Python path's rules (errors, retries, timeouts,
    bodies of any size) apply as to the HTTP/1.1 request H2Connection.request would have written."""
    cdef H2Stream *st = stream_of(s)
    cdef int pair[2]
    cdef object inflight = None
    cdef object tls
    if self.h2b_early == s:
        # Dispatched at its HEADERS (_eh2b.pxi): handed over with its body relayed as it comes.
        self.h2b_early = NULL
        h2_relay_start(self, s, NULL, 0)
        return
    if st.conn == NULL or socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, pair) < 0:
        if s.backend != NULL:
            b = s.backend
            s.backend = NULL
            self.close_backend(b)
            self.finish(s.slot, self.now - s.sent_at, False, 0, self.request_size(s), 0)
        s.state = WAITING
        s.deadline_kind = WAIT_NONE
        h2_unserved(self, s)
        return
    if s.backend != NULL:
        limits_checked = self.limiter is not None      # the request in flight passed them already
        inflight = self.inflight(s, data, size)
        data = NULL
        size = 0
    pending = PyBytes_FromStringAndSize(data, size) if size else b""
    tls = (s.bind, PyBytes_FromStringAndSize(s.ip, s.ip_len),
           PyBytes_FromStringAndSize(s.tls.tls_block, s.tls.tls_block_len) if s.tls.tls_block_len else b"", False, True)
    s.state = TUNNEL
    s.deadline_kind = WAIT_NONE
    s.tls.tunnel.kind = IS_TUNNEL_END
    s.tls.tunnel.fd = pair[0]
    s.tls.tunnel.client = s
    st.rstate = R_HEAD
    if not self.watch(pair[0], &s.tls.tunnel):
        close(pair[0])
        close(pair[1])
        s.tls.tunnel.kind = IS_FREED
        s.tls.tunnel.fd = -1
        h2_unserved(self, s)
        return
    self.adopted += 1
    self.handed[reason] += 1
    self.glue.adopt(pair[1], pending, inflight, limits_checked, tls)


cdef void h2_from_python(Engine self, Client *s):
    """An event on a handed stream's socketpair: its response read until the socket would block (or the
    client has not taken enough of the body yet), then the frames written."""
    cdef H2Stream *st = stream_of(s)
    cdef Client *conn = st.conn
    cdef ssize_t n
    if conn == NULL or s.tls.tunnel.fd < 0:
        return
    if s.tls.up != NULL:
        h2_relay_flush(self, s)
    while s.tls.tunnel.fd >= 0 and st.conn != NULL:
        if s.pending_len - s.pending_off >= H2_BUFFER_HIGH:
            st.paused = 1                    # h2_read_body wakes it
            break
        n = recv(s.tls.tunnel.fd, self.scratch, SCRATCH, 0)
        if n < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                break
            n = 0
        if n == 0:
            h2_python_ended(self, s)
            break
        if not h2_parse_response(self, s, self.scratch, n):
            h2_python_ended(self, s)
            break
    if conn.kind == IS_CLIENT:
        h2_flush_soon(self, conn)


cdef void h2_python_ended(Engine self, Client *s):
    """The Python side closed the socketpair (after its response, Connection: close) or it failed: a
    body read until then ends; a response cut short is a reset (ResponseSink.close / abort)."""
    cdef H2Stream *st = stream_of(s)
    cdef nghttp2_session *session
    self.forget(s.tls.tunnel.fd)
    s.tls.tunnel.fd = -1
    s.tls.tunnel.kind = IS_FREED
    if st.conn == NULL:
        return
    session = conn_of(st.conn).session
    if st.rstate == R_UNTIL_CLOSE:
        st.rstate = R_DONE
        h2_body_done(s)
    elif st.rstate != R_DONE:
        st.rstate = R_DONE
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, st.id,
                                  NGHTTP2_INTERNAL_ERROR if st.submitted else NGHTTP2_CANCEL)


cdef inline void h2_body_done(Client *s) noexcept:
    cdef H2Stream *st = stream_of(s)
    st.out_eof = 1
    if st.conn != NULL:
        nghttp2_session_resume_data(conn_of(st.conn).session, st.id)


cdef bint h2_keep_line(H2Stream *st, const char *p, Py_ssize_t n) noexcept:
    """Appends to the line being read; False past MAX_RESPONSE_LINE (or out of memory)."""
    cdef char *grown
    if st.line_len + n > MAX_RESPONSE_LINE:
        return False
    if st.line_len + n > st.line_cap:
        grown = <char *>realloc(st.line, st.line_len + n + 256)
        if grown == NULL:
            return False
        st.line = grown
        st.line_cap = <uint32_t>(st.line_len + n + 256)
    memcpy(st.line + st.line_len, p, n)
    st.line_len += <uint32_t>n
    return True


cdef bint h2_body_bytes(Engine self, Client *s, const char *p, Py_ssize_t n):
    """Body bytes for the data provider (s.pending from pending_off)."""
    if s.pending_off and s.pending_off == s.pending_len:
        s.pending_off = s.pending_len = 0
    elif s.pending_off > H2_BUFFER_LOW:
        memmove(s.pending, s.pending + s.pending_off, s.pending_len - s.pending_off)
        s.pending_len -= s.pending_off
        s.pending_off = 0
    if not h2_pending_room(s, s.pending_len + n):
        return False
    memcpy(s.pending + s.pending_len, p, n)
    s.pending_len += <uint32_t>n
    nghttp2_session_resume_data(conn_of(stream_of(s).conn).session, stream_of(s).id)
    return True


cdef Py_ssize_t find_crlf(const char *p, Py_ssize_t n) noexcept:
    """Where the first CRLF of p[:n] starts (-1: none). (memchr: a field line's bytes are not looked at
    one by one.)"""
    cdef const char *at = p
    cdef const char *last = p + n - 1          # a CR needs its LF after it
    while at < last:
        at = <const char *>memchr(at, 13, last - at)
        if at == NULL:
            return -1
        if at[1] == 10:
            return at - p
        at += 1
    return -1


cdef bint h2_parse_response(Engine self, Client *s, const char *p, Py_ssize_t n):
    """Feeds bytes of the HTTP/1.1 response the Python path wrote; False: it is malformed (reset)."""
    cdef H2Stream *st = stream_of(s)
    cdef Py_ssize_t take, i, end
    cdef uint64_t size
    cdef int digit
    while n > 0 and st.conn != NULL:
        if st.rstate == R_DONE:
            return True
        if st.rstate == R_HEAD or st.rstate == R_TRAILERS:
            # Up to the blank line: looked for in what is kept plus these bytes.
            if not h2_keep_line(st, p, n):
                return False
            end = -1
            i = 0
            if st.rstate == R_TRAILERS and st.line_len >= 2 and st.line[0] == 13 and st.line[1] == 10:
                end = 0
            else:
                while i + 3 < st.line_len:
                    if st.line[i] == 13 and st.line[i + 1] == 10 and st.line[i + 2] == 13 and st.line[i + 3] == 10:
                        end = i + 2
                        break
                    i += 1
            if end < 0:
                return True
            # Bytes of this read after the section: fed again below.
            take = n - (st.line_len - (end + 2))
            if st.rstate == R_HEAD:
                if not h2_response_head(self, s, end):
                    return False
            else:
                h2_response_trailers(self, s, end)
                st.rstate = R_DONE
                h2_body_done(s)
            st.line_len = 0
            p += take
            n -= take
        elif st.rstate == R_LENGTH or st.rstate == R_CHUNK_DATA:
            take = n if <uint64_t>n < st.remaining else <Py_ssize_t>st.remaining
            if not h2_body_bytes(self, s, p, take):
                return False
            st.remaining -= take
            p += take
            n -= take
            if st.remaining == 0:
                if st.rstate == R_LENGTH:
                    st.rstate = R_DONE
                    h2_body_done(s)
                else:
                    st.rstate = R_CHUNK_END
                    st.line_len = 0
        elif st.rstate == R_CHUNK_END:
            # The CRLF after a chunk's data (kept in `line` while it is split over reads).
            take = min(n, 2 - st.line_len)
            for i in range(take):
                if p[i] != (13 if st.line_len + i == 0 else 10):
                    return False
            st.line_len += <uint32_t>take
            p += take
            n -= take
            if st.line_len == 2:
                st.line_len = 0
                st.rstate = R_CHUNK_SIZE
        elif st.rstate == R_CHUNK_SIZE:
            end = find_crlf(p, n)
            if end < 0:
                return h2_keep_line(st, p, n)
            if not h2_keep_line(st, p, end):
                return False
            size = 0
            i = 0
            while i < st.line_len and st.line[i] != 59 and st.line[i] != 32 and st.line[i] != 9:    # ';' ext
                digit = hex_value(<unsigned char>st.line[i])
                if digit < 0 or size >> 59:
                    return False
                size = size * 16 + digit
                i += 1
            if i == 0:
                return False
            st.line_len = 0
            p += end + 2
            n -= end + 2
            if size == 0:
                st.rstate = R_TRAILERS
            else:
                st.remaining = size
                st.rstate = R_CHUNK_DATA
        elif st.rstate == R_UNTIL_CLOSE:
            if not h2_body_bytes(self, s, p, n):
                return False
            n = 0
    return True


cdef bint h2_response_head(Engine self, Client *s, Py_ssize_t end):
    """The response head in st.line[:end] (its last CRLF at end): submitted as HEADERS (a 1xx one as an
    interim head, connection-specific fields out), and how its body is framed."""
    cdef H2Stream *st = stream_of(s)
    cdef char *r = st.line
    cdef nghttp2_nv *nva
    cdef int n, status, count
    cdef bint chunked, has_length
    cdef uint64_t length
    cdef FieldLines fields
    cdef nghttp2_data_provider provider
    if end < 12 or memcmp(r, b"HTTP/1.", 7) != 0:
        return False
    status = (r[9] - 48) * 100 + (r[10] - 48) * 10 + (r[11] - 48)
    if not 100 <= status <= 599:
        return False
    count = count_lines(r, end)
    nva = <nghttp2_nv *>malloc(sizeof(nghttp2_nv) * (count + 1))
    if nva == NULL:
        return False
    h2_field(&nva[0], b":status", b"")
    nva[0].value = <uint8_t *>(r + 9)
    nva[0].valuelen = 3
    fields_start(&fields, count)
    if field_lines(r, find_crlf(r, end) + 2, end, nva + 1, &fields) < 0:
        free(nva)
        return False
    n = fields.count + 1
    if status < 200:
        # An interim response (a backend's 103, fastlb's own 100 Continue): what the HTTP/1.1 path
        # forwards goes on as HEADERS without END_STREAM before the final one (ResponseSink's way).
        nghttp2_submit_headers(conn_of(st.conn).session, NGHTTP2_FLAG_NONE, st.id, NULL, nva, n, NULL)
        free(nva)
        st.line_len = 0
        return True
    chunked = fields.chunked
    has_length = fields.has_length
    length = fields.length
    st.submitted = 1
    provider.source.ptr = <void *>s
    provider.read_callback = h2_read_body
    if status == 204 or status == 304 or st.is_head:
        st.rstate = R_DONE
        st.out_eof = 1
        nghttp2_submit_response(conn_of(st.conn).session, st.id, nva, n, NULL)
    else:
        if chunked:
            st.rstate = R_CHUNK_SIZE
        elif has_length:
            st.rstate = R_LENGTH
            st.remaining = length
            if length == 0:
                st.rstate = R_DONE
                st.out_eof = 1
        else:
            st.rstate = R_UNTIL_CLOSE
        nghttp2_submit_response(conn_of(st.conn).session, st.id, nva, n, &provider)
    free(nva)
    return True


cdef void h2_response_trailers(Engine self, Client *s, Py_ssize_t end):
    """A chunked response's trailer section (st.line[:end]): kept, lower-cased, connection-specific
    fields out, for h2_read_body to send after the body."""
    cdef H2Stream *st = stream_of(s)
    cdef char *r
    cdef int count
    cdef FieldLines fields
    if end == 0:
        return
    # The section moves to its own buffer: the nv entries point into it until they are submitted.
    r = <char *>malloc(end + 2)
    if r == NULL:
        return
    memcpy(r, st.line, end + 2)
    count = count_lines(r, end)
    st.trailers = <nghttp2_nv *>malloc(sizeof(nghttp2_nv) * (count + 1))
    if st.trailers == NULL:
        free(r)
        return
    fields_start(&fields, count)
    field_lines(r, 0, end, st.trailers, &fields)
    st.ntrailers = fields.count
    st.trailer_buf = r
    if st.ntrailers == 0:
        h2_free_trailers(st)


cdef void h2_free_trailers(H2Stream *st) noexcept:
    free(st.trailer_buf)
    free(st.trailers)
    st.trailer_buf = NULL
    st.trailers = NULL
    st.ntrailers = 0


cdef void h2_answer(Engine self, Client *s, iovec *iov, int count):
    """write_answer for a stream: the engine's HTTP/1.1 answer (a backend's plain response with the
    lines the engine adds, or fastlb's own; whole lines in each iov entry up to the blank line) becomes a
    HEADERS frame, its fields read in place (libnghttp2 copies them), and its body DATA frames, read from
    a copy in the stream's pending buffer."""
    cdef H2Stream *st = stream_of(s)
    cdef H2Conn *h
    cdef nghttp2_nv local[H2_ANSWER_FIELDS]
    cdef nghttp2_nv *nva = local
    cdef FieldLines fields
    cdef nghttp2_data_provider provider
    cdef const char *r = <const char *>iov[0].iov_base
    cdef Py_ssize_t body_pos = 0, body_len = 0, at
    cdef int status, j, body_iov = count, lines = 0
    s.state = WAITING
    s.deadline_kind = WAIT_NONE
    if st.conn == NULL:
        return                      # reset meanwhile: nobody to tell
    h = conn_of(st.conn)
    # "HTTP/1.1 SSS reason" CRLF, field lines, CRLF, body (the engine's own bytes: well formed).
    status = (r[9] - 48) * 100 + (r[10] - 48) * 10 + (r[11] - 48)
    fields_start(&fields, H2_ANSWER_FIELDS - 1)
    if not answer_fields(iov, count, nva + 1, &fields, &body_iov, &body_pos):
        if fields.full:
            # More lines than the array on the stack holds: an array for all of them.
            for j in range(count):
                lines += count_lines(<const char *>iov[j].iov_base, iov[j].iov_len)
            nva = <nghttp2_nv *>malloc(sizeof(nghttp2_nv) * (lines + 1))
            fields_start(&fields, lines)
        if nva == NULL or not answer_fields(iov, count, nva + 1, &fields, &body_iov, &body_pos):
            if nva != local:
                free(nva)
            nghttp2_submit_rst_stream(h.session, NGHTTP2_FLAG_NONE, st.id, NGHTTP2_INTERNAL_ERROR)
            h2_flush_soon(self, st.conn)
            return
    h2_field(&nva[0], b":status", b"")
    nva[0].value = <uint8_t *>(r + 9)
    nva[0].valuelen = 3
    if not (status == 204 or status == 304 or st.is_head):
        for j in range(body_iov, count):
            body_len += iov[j].iov_len
        body_len -= body_pos
    s.pending_off = s.pending_len = 0
    if body_len and h2_pending_room(s, body_len):
        at = 0
        for j in range(body_iov, count):
            memcpy(s.pending + at, <const char *>iov[j].iov_base + body_pos, iov[j].iov_len - body_pos)
            at += iov[j].iov_len - body_pos
            body_pos = 0
        s.pending_len = <uint32_t>body_len
    st.out_eof = 1
    st.submitted = 1
    provider.source.ptr = <void *>s
    provider.read_callback = h2_read_body
    # (libnghttp2 copies the fields before returning; the body is read from s.pending as windows allow)
    if s.pending_len == 0:
        nghttp2_submit_response(h.session, st.id, nva, fields.count + 1, NULL)
    else:
        nghttp2_submit_response(h.session, st.id, nva, fields.count + 1, &provider)
    if nva != local:
        free(nva)
    h2_flush_soon(self, st.conn)


cdef bint answer_fields(iovec *iov, int count, nghttp2_nv *nva, FieldLines *fields, int *body_iov,
                        Py_ssize_t *body_pos) noexcept:
    """The field lines of an answer's iov (after its status line) into nva: where its body starts (the
    entry, the offset in it). False: no room for them all (fields.full), or not lines."""
    cdef const char *p
    cdef Py_ssize_t pos, n
    cdef int j
    for j in range(count):
        p = <const char *>iov[j].iov_base
        n = iov[j].iov_len
        pos = find_crlf(p, n) + 2 if j == 0 else 0
        pos = field_lines(p, pos, n, nva, fields)
        if pos < 0:
            return False
        if fields.blank:
            if fields.full:
                return False
            body_iov[0] = j
            body_pos[0] = pos
            if pos == n:
                body_iov[0] = j + 1
                body_pos[0] = 0
            return True
    return False


cdef bint h2_pending_room(Client *s, size_t size) noexcept:
    """The stream's pending buffer holds at least `size` bytes (grown as needed, its bytes kept)."""
    cdef H2Stream *st = stream_of(s)
    cdef char *grown
    if size <= st.pending_cap:
        return True
    grown = <char *>realloc(s.pending, size)
    if grown == NULL:
        return False
    s.pending = grown
    st.pending_cap = <uint32_t>size
    return True


cdef ssize_t h2_read_body(nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
                          uint32_t *data_flags, nghttp2_data_source *source, void *user_data) noexcept:
    """A stream's body from its pending buffer, as flow control allows; at its end, its trailers if it
    has any (_nghttp2.read_body's way)."""
    cdef Client *s = <Client *>source.ptr
    cdef H2Stream *st = stream_of(s)
    cdef size_t n = s.pending_len - s.pending_off
    if n > length:
        n = length
    if n:
        memcpy(buf, s.pending + s.pending_off, n)
        s.pending_off += <uint32_t>n
        if st.paused and s.pending_len - s.pending_off < H2_BUFFER_LOW:
            st.paused = 0
            h2_wake(conn_of(st.conn), s)
    if s.pending_off == s.pending_len and st.out_eof:
        if st.trailers != NULL:
            # The stream ends with a HEADERS frame of trailers, not with this DATA frame.
            nghttp2_submit_trailer(session, stream_id, st.trailers, st.ntrailers)
            h2_free_trailers(st)
            data_flags[0] |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM
        else:
            data_flags[0] |= NGHTTP2_DATA_FLAG_EOF
        return n
    if n == 0:
        return NGHTTP2_ERR_DEFERRED
    return n


cdef inline void h2_wake(H2Conn *h, Client *s) noexcept:
    """A paused stream's body went below the low-water mark: its socketpair is read again after the
    write under way (h2_flush), not inside libnghttp2's callback."""
    h.wake = 1


# ---- the connection's end, its deadlines ----------------------------------------------------------------

cdef void h2_end(Engine self, Client *c):
    """close_client of an HTTP/2 client: its streams end with it."""
    cdef H2Conn *h = conn_of(c)
    while h.streams != NULL:
        h2_drop_stream(self, h.streams)
    nghttp2_session_del(h.session)
    free(h)
    c.h2 = NULL


cdef void h2_deadline_exceeded(Engine self, Client *s):
    """A gRPC call past its grpc-timeout (H2Connection.deadline_exceeded): its backend request is let go
    (its slot back; handed to the Python path: the socketpair closes) and the client gets
    DEADLINE_EXCEEDED, as a Trailers-Only response when nothing of the response reached it yet, else a
    reset (CANCEL)."""
    cdef H2Stream *st = stream_of(s)
    cdef nghttp2_session *session = conn_of(st.conn).session
    cdef Backend *b = s.backend
    st.grpc_deadline = 0.0
    if b != NULL:
        s.backend = NULL
        self.close_backend(b)
        self.finish(s.slot, self.now - s.sent_at, True, 0, self.request_size(s), 0)
    if s.tls.tunnel.fd >= 0:
        self.forget(s.tls.tunnel.fd)
        s.tls.tunnel.fd = -1
        s.tls.tunnel.kind = IS_FREED
    s.deadline_kind = WAIT_NONE
    st.relay = st.in_body = 0
    if st.submitted:
        st.rstate = R_DONE
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, st.id, NGHTTP2_CANCEL)
    else:
        st.submitted = 1
        st.rstate = R_DONE
        h2_grpc_only(session, st.id, b"4", b"deadline exceeded in fastlb")        # DEADLINE_EXCEEDED
    h2_flush(self, st.conn)


cdef void h2_grpc_only(nghttp2_session *session, int32_t stream_id, const char *status,
                       const char *message) noexcept:
    """fastlb's own gRPC answer to a stream nothing of a response reached yet: Trailers-Only (200,
    application/grpc, grpc-status and grpc-message in the one HEADERS frame)."""
    cdef nghttp2_nv nva[4]
    h2_field(&nva[0], b":status", b"200")
    h2_field(&nva[1], b"content-type", b"application/grpc")
    h2_field(&nva[2], b"grpc-status", status)
    h2_field(&nva[3], b"grpc-message", message)
    nghttp2_submit_response(session, stream_id, nva, 4, NULL)


cdef inline void h2_field(nghttp2_nv *nv, const char *name, const char *value) noexcept:
    nv.name = <uint8_t *>name
    nv.namelen = strlen(name)
    nv.value = <uint8_t *>value
    nv.valuelen = strlen(value)
    nv.flags = NGHTTP2_NV_FLAG_NONE


cdef void h2_sweep(Engine self, Client *c):
    """The sweep's visit (H2Connection.on_deadline): a header block still not whole after
    http_request_timeout ends the connection; a gRPC call past its grpc-timeout is answered
    DEADLINE_EXCEEDED; a stream past its response deadline is handed over (the Python path answers 504
    or retries); with no stream, idleness past keepalive_timeout or draining ends it with GOAWAY."""
    cdef H2Conn *h = conn_of(c)
    cdef Client *s = h.streams
    cdef Client *next_stream
    cdef H2Stream *st
    while s != NULL:
        next_stream = s.next
        st = stream_of(s)
        if st.up != NULL:
            h2b_sweep_stream(self, s)       # a stream to an HTTP/2 backend (_eh2b.pxi)
            if c.kind != IS_CLIENT:
                return
            s = next_stream
            continue
        if not st.dispatched and st.opened <= self.now - self.http_request_timeout:
            nghttp2_submit_goaway(h.session, NGHTTP2_FLAG_NONE,
                                  nghttp2_session_get_last_proc_stream_id(h.session), NGHTTP2_PROTOCOL_ERROR,
                                  NULL, 0)
            h2_flush(self, c)
            if c.kind == IS_CLIENT:
                self.close_client(c)
            return
        if st.grpc_deadline and st.grpc_deadline <= self.now:
            h2_deadline_exceeded(self, s)
            if c.kind != IS_CLIENT:
                return
        elif s.deadline_kind == WAIT_BACKEND and s.deadline <= self.now:
            self.adopt(s, NULL, 0, HAND_TIMEOUT)       # Python answers 504 or retries, by its rules
            if c.kind != IS_CLIENT:
                return
        s = next_stream
    if h.streams == NULL and (self.draining or self.now - h.idle_since >= self.keepalive_timeout):
        if not h.goaway_sent:
            h.goaway_sent = 1
            nghttp2_submit_goaway(h.session, NGHTTP2_FLAG_NONE,
                                  nghttp2_session_get_last_proc_stream_id(h.session), NGHTTP2_NO_ERROR, NULL, 0)
        h2_flush(self, c)
        if c.kind == IS_CLIENT:
            self.close_client(c)
        return
    if self.draining and not h.goaway_sent:
        h.goaway_sent = 1
        nghttp2_submit_goaway(h.session, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(h.session),
                              NGHTTP2_NO_ERROR, NULL, 0)
        h2_flush(self, c)
