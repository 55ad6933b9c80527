# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""libnghttp2 sessions: the server side (`Session`, for fastlb/http2/connection.py's client connections) and
the client side (`ClientSession`, for fastlb/http2/backend.py's connections to proto=h2 backends and the
gRPC health check). Both read a stream's body from its `out` and send its `trailers` after it (`read_body`).

libnghttp2 does the protocol: framing, HPACK (its inflater and deflater), stream states, flow control,
SETTINGS, and the message checks of RFC 9113 section 8 (HTTP messaging is left on): header names
lower-case tokens, values without CR, LF, NUL or surrounding white space, no connection-specific
fields (Connection, Keep-Alive, Proxy-Connection, Transfer-Encoding, Upgrade; TE other than
"trailers"), the pseudo-header fields (:method, :scheme, :path present once, before the regular fields,
none unknown, no response pseudo-header in a request), content-length against the DATA received, and
the limits set here (the CONTINUATION frames after a HEADERS, RST_STREAM rate,
SETTINGS entries, outbound ACKs queued for a client that does not read). A stream that breaks one of
them is reset by the library before fastlb sees a request.

What libnghttp2 does not bound, this module does: concurrent streams before the client acknowledged
the SETTINGS that announce the limit (refused here with REFUSED_STREAM), the decoded size of a header list (SETTINGS only
advertises it: an HPACK bomb decodes to far more than it sends; fields past the limit are not kept and
the stream is answered 431), and the frames that cost the server work without being a request (PING,
SETTINGS, PRIORITY, RST_STREAM, empty DATA, streams reset before their response): a token
bucket per connection, `control_burst` tokens, refilled at a tenth of that per second; when it is empty
the connection ends with GOAWAY ENHANCE_YOUR_CALM.

The Python side (`owner`) is called per stream event, by one set of callbacks for both sides (see
`_Session`): new_stream (server), headers (a header list is whole), body, body_end, stream_closed,
drained, goaway_received. Streams live in `streams` (id -> stream object), so a session deleted with open
streams leaks nothing. A response is submitted with its header list; its body is read by libnghttp2 from
the stream's `out` (a bytearray) as flow control allows, `out_eof` saying it is all there.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t, int32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

cdef extern from "time.h" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    int CLOCK_MONOTONIC

from fastlb.http2.nghttp2 cimport *


# Error codes for Python (RST_STREAM / GOAWAY).
NO_ERROR = NGHTTP2_NO_ERROR
PROTOCOL_ERROR = NGHTTP2_PROTOCOL_ERROR
INTERNAL_ERROR = NGHTTP2_INTERNAL_ERROR
REFUSED_STREAM = NGHTTP2_REFUSED_STREAM
CANCEL = NGHTTP2_CANCEL
ENHANCE_YOUR_CALM = NGHTTP2_ENHANCE_YOUR_CALM

# The limits (H2_* flood options, HPACK table, control budget refill) are fastlb/http2/nghttp2.pxd's, the
# engine's too (fastlb/http/_eh2.pxi).


cdef double monotonic_now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class _Session:
    """What the server and the client sessions share: one set of callbacks (below), feeding and draining
    bytes, the streams, bodies read from a stream's `out` (and its `trailers`, a list of (name, value)
    pairs or None, sent after it).

    Both sides call the same owner methods: headers(stream, end) (a header block is whole: a request head
    or response head, a 1xx, trailers; `end`: END_STREAM), body(stream, data), body_end(stream) (END_STREAM
    on DATA), stream_closed(stream, error_code), drained(stream) (a body's `out` went below the stream's
    `low_water`), goaway_received(); the server's also new_stream(stream_id). A header block's fields are
    appended to the stream's `fields` (a list), or to its `trailers_in` once `fields` is None, within
    `max_header_list` bytes counted as SETTINGS_MAX_HEADER_LIST_SIZE counts them (the stream's
    `header_size`: past the bound, fields are counted but not kept)."""
    cdef nghttp2_session *ptr
    cdef public object owner          # the Python connection the callbacks report to
    cdef public dict streams          # stream id -> its stream object
    cdef public Py_ssize_t max_header_list
    cdef public bint receiving        # inside receive(): libnghttp2 is not reentrant, the owner's flush waits
    cdef object error                 # an exception a callback raised, re-raised after mem_recv

    def __cinit__(self):
        self.ptr = NULL

    def __dealloc__(self):
        if self.ptr != NULL:
            nghttp2_session_del(self.ptr)
            self.ptr = NULL

    cdef int open(self, bint server, int max_streams=0, Py_ssize_t max_header_list=0, int initial_window=0,
                  int connection_window=0) except -1:
        """Creates the libnghttp2 session with this module's callbacks: a server's with its SETTINGS and
        flood options (nghttp2.pxd's server_session, the engine's own), a client's with the options that
        apply to one."""
        cdef nghttp2_session_callbacks *callbacks
        cdef nghttp2_option *option
        cdef int rv
        self.streams = {}
        self.error = None
        if nghttp2_session_callbacks_new(&callbacks) != 0:
            raise MemoryError()
        nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, on_frame_recv)
        if server:
            nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks, on_begin_headers)
        nghttp2_session_callbacks_set_on_header_callback(callbacks, on_header)
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, on_data_chunk_recv)
        nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, on_stream_close)
        if server:
            rv = server_session(&self.ptr, callbacks, <void *>self, max_streams, max_header_list,
                                initial_window, connection_window)
        elif nghttp2_option_new(&option) != 0:
            rv = -1
        else:
            # Received bodies are acknowledged (WINDOW_UPDATE) as fastlb passes them on, not as they
            # arrive: a stream whose receiver reads slowly holds at most its window.
            nghttp2_option_set_no_auto_window_update(option, 1)
            nghttp2_option_set_max_outbound_ack(option, H2_MAX_OUTBOUND_ACK)
            nghttp2_option_set_max_settings(option, H2_MAX_SETTINGS)
            nghttp2_option_set_max_continuations(option, H2_MAX_CONTINUATIONS)
            nghttp2_option_set_max_deflate_dynamic_table_size(option, H2_DEFLATE_TABLE_SIZE)
            rv = nghttp2_session_client_new2(&self.ptr, callbacks, <void *>self, option)
            nghttp2_option_del(option)
        nghttp2_session_callbacks_del(callbacks)
        if rv != 0:
            raise MemoryError()
        return 0

    cdef bint spend(self) noexcept:
        """A control frame's token (the server's budget, Session.spend); a backend is not budgeted."""
        return True

    def receive(self, bytes data):
        """Feeds bytes read from the peer; a negative libnghttp2 error ends the connection (returned as
        str). `receiving` is set meanwhile."""
        cdef ssize_t rv
        self.receiving = True
        try:
            rv = nghttp2_session_mem_recv(self.ptr, <const uint8_t *>PyBytes_AS_STRING(data),
                                          PyBytes_GET_SIZE(data))
        finally:
            self.receiving = False
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        if rv < 0:
            return nghttp2_strerror(<int>rv).decode()
        return None

    def pending(self):
        """The frames to write now (b"" when none); a libnghttp2 error as str."""
        cdef const uint8_t *data
        cdef ssize_t n
        cdef list chunks = None
        cdef bytes first = b""
        while True:
            n = nghttp2_session_mem_send(self.ptr, &data)
            if self.error is not None:
                error, self.error = self.error, None
                raise error
            if n < 0:
                return nghttp2_strerror(<int>n).decode()
            if n == 0:
                break
            chunk = PyBytes_FromStringAndSize(<const char *>data, n)
            if chunks is None and not first:
                first = chunk
            else:
                if chunks is None:
                    chunks = [first]
                chunks.append(chunk)
        return first if chunks is None else b"".join(chunks)

    @property
    def done(self):
        """Neither side has anything more to say: the connection may close."""
        return not nghttp2_session_want_read(self.ptr) and not nghttp2_session_want_write(self.ptr)

    def resume(self, int32_t stream_id):
        """More of a body (or its end) is in the stream's `out`."""
        nghttp2_session_resume_data(self.ptr, stream_id)

    def consume(self, int32_t stream_id, size_t size):
        """`size` bytes of a received body were passed on: the peer may send that much more."""
        if stream_id:
            nghttp2_session_consume(self.ptr, stream_id, size)
        else:
            nghttp2_session_consume_connection(self.ptr, size)

    def reset(self, int32_t stream_id, uint32_t code):
        nghttp2_submit_rst_stream(self.ptr, NGHTTP2_FLAG_NONE, stream_id, code)

    def goaway(self, uint32_t code):
        """No new stream after the last one seen; those already open finish."""
        nghttp2_submit_goaway(self.ptr, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(self.ptr),
                              code, NULL, 0)


cdef nghttp2_nv *field_array(list fields, Py_ssize_t first) except NULL:
    """An nghttp2_nv array for (name, value) bytes pairs, from index `first` on (the slots before are the
    caller's: pseudo-header fields); the bytes stay the caller's, alive until the submit returns."""
    cdef Py_ssize_t n = len(fields) + first, i
    cdef nghttp2_nv *nva = <nghttp2_nv *>malloc((n if n else 1) * sizeof(nghttp2_nv))
    cdef bytes name, value
    if nva == NULL:
        raise MemoryError()
    for i in range(first, n):
        name, value = fields[i - first]
        nva[i].name = <uint8_t *>PyBytes_AS_STRING(name)
        nva[i].namelen = PyBytes_GET_SIZE(name)
        nva[i].value = <uint8_t *>PyBytes_AS_STRING(value)
        nva[i].valuelen = PyBytes_GET_SIZE(value)
        nva[i].flags = NGHTTP2_NV_FLAG_NONE
    return nva


cdef nghttp2_nv *response_fields(bytes status, list fields) except NULL:
    """A response head's nghttp2_nv array: :status, then `fields` (freed by the caller)."""
    cdef nghttp2_nv *nva = field_array(fields, 1)
    nva[0].name = <uint8_t *>b":status"
    nva[0].namelen = 7
    nva[0].value = <uint8_t *>PyBytes_AS_STRING(status)
    nva[0].valuelen = PyBytes_GET_SIZE(status)
    nva[0].flags = NGHTTP2_NV_FLAG_NONE
    return nva


cdef class Session(_Session):
    """The server side, one per HTTP/2 client connection (fastlb/http2/connection.py's H2Connection)."""
    cdef public Py_ssize_t max_streams
    cdef double tokens, burst, refill, refilled_at
    cdef public bint flooded          # the control budget ran out: GOAWAY sent

    def __init__(self, owner, int max_concurrent_streams, Py_ssize_t max_header_list,
                 int initial_window_size, int connection_window_size, int control_burst):
        self.owner = owner
        self.max_header_list = max_header_list
        self.max_streams = max_concurrent_streams
        self.burst = control_burst
        self.tokens = control_burst
        self.refill = control_burst / <double>H2_CONTROL_REFILL_DIVISOR
        self.refilled_at = monotonic_now()
        self.open(True, max_concurrent_streams, max_header_list, initial_window_size, connection_window_size)

    cdef bint spend(self) noexcept:
        """One control token; False (and GOAWAY ENHANCE_YOUR_CALM) when the budget is spent."""
        cdef double now = monotonic_now()
        self.tokens += (now - self.refilled_at) * self.refill
        self.refilled_at = now
        if self.tokens > self.burst:
            self.tokens = self.burst
        if self.tokens < 1.0:
            if not self.flooded:
                self.flooded = True
                nghttp2_session_terminate_session(self.ptr, NGHTTP2_ENHANCE_YOUR_CALM)
            return False
        self.tokens -= 1.0
        return True

    def respond(self, int32_t stream_id, bytes status, list fields, bint has_body):
        """Submits a response head: `fields` a list of (lower-case name, value) bytes pairs; with a
        body, it is read from the stream's `out` (see the module docstring)."""
        cdef nghttp2_nv *nva = response_fields(status, fields)
        cdef nghttp2_data_provider provider
        cdef int rv
        provider.source.ptr = NULL
        provider.read_callback = read_body
        # libnghttp2 copies the fields into its own frame before returning.
        rv = nghttp2_submit_response(self.ptr, stream_id, nva, len(fields) + 1, &provider if has_body else NULL)
        free(nva)
        return rv == 0

    def inform(self, int32_t stream_id, bytes status, list fields):
        """Submits an interim (1xx) response head: a HEADERS frame without END_STREAM, before the final
        response (RFC 9113 8.1)."""
        cdef nghttp2_nv *nva = response_fields(status, fields)
        cdef int32_t rv = nghttp2_submit_headers(self.ptr, NGHTTP2_FLAG_NONE, stream_id, NULL, nva,
                                                 len(fields) + 1, NULL)
        free(nva)
        return rv >= 0


# ---- the client side: fastlb's connections to proto=h2 backends (fastlb/http2/backend.py) -------------------

# The window fastlb gives a backend's response, per stream: acknowledged as the response goes on to the
# client (a slow client holds at most this much of it), and for the connection, 16 streams' worth.
cdef enum:
    CLIENT_STREAM_WINDOW = 256 * 1024
# The decoded header fields kept of one response (head, interim heads and trailers together); beyond it the
# response fails (fastlb/http2/backend.py: BackendStream.header_block). Advertised to the backend.
cdef enum:
    CLIENT_MAX_HEADER_LIST = 256 * 1024


cdef class ClientSession(_Session):
    """A client session on one connection to a backend, carrying many requests at once as streams (the
    owner: fastlb/http2/backend.py's H2BackendConnection, or the gRPC health check's connection)."""

    def __init__(self, owner):
        cdef nghttp2_settings_entry settings[4]
        self.owner = owner
        self.max_header_list = CLIENT_MAX_HEADER_LIST
        self.open(False)
        settings[0].settings_id = NGHTTP2_SETTINGS_ENABLE_PUSH
        settings[0].value = 0
        settings[1].settings_id = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
        settings[1].value = CLIENT_STREAM_WINDOW
        settings[2].settings_id = NGHTTP2_SETTINGS_HEADER_TABLE_SIZE
        settings[2].value = H2_DEFLATE_TABLE_SIZE
        settings[3].settings_id = NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE
        settings[3].value = CLIENT_MAX_HEADER_LIST
        nghttp2_submit_settings(self.ptr, NGHTTP2_FLAG_NONE, settings, 4)
        nghttp2_session_set_local_window_size(self.ptr, NGHTTP2_FLAG_NONE, 0, CLIENT_STREAM_WINDOW * 16)

    def request(self, list fields, stream, bint has_body):
        """Submits a request head (`fields`: pseudo-header fields first, names lower-case); with a body, it
        is read from the stream's `out`. The stream id (> 0), or a negative libnghttp2 error as str."""
        cdef nghttp2_nv *nva = field_array(fields, 0)
        cdef nghttp2_data_provider provider
        cdef int32_t stream_id
        provider.source.ptr = NULL
        provider.read_callback = read_body
        stream_id = nghttp2_submit_request(self.ptr, NULL, nva, len(fields),
                                           &provider if has_body else NULL, NULL)
        free(nva)
        if stream_id < 0:
            return nghttp2_strerror(stream_id).decode()
        self.streams[stream_id] = stream
        return stream_id

    @property
    def max_streams(self):
        """The backend's SETTINGS_MAX_CONCURRENT_STREAMS (unbounded until it says)."""
        return nghttp2_session_get_remote_settings(self.ptr, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS)


# ---- callbacks, both sides (libnghttp2 calls them inside mem_recv / mem_send) ---------------------------------

cdef int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept:
    """A request's stream begins (the server side's only: a client session makes its streams itself)."""
    cdef Session self = <Session>user_data
    if frame.hd.type != NGHTTP2_HEADERS or frame.headers.cat != NGHTTP2_HCAT_REQUEST:
        return 0
    if len(self.streams) >= self.max_streams:
        # libnghttp2 enforces SETTINGS_MAX_CONCURRENT_STREAMS only once the client acknowledged it, and
        # an attacker sends its streams before: refused here (safe to retry, RFC 9113 8.7). Its header
        # fields are decoded (HPACK state) but not kept: it has no stream object.
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame.hd.stream_id, NGHTTP2_REFUSED_STREAM)
        return 0
    try:
        self.streams[frame.hd.stream_id] = self.owner.new_stream(frame.hd.stream_id)
    except BaseException as exc:
        self.error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                   const uint8_t *value, size_t valuelen, uint8_t flags, void *user_data) noexcept:
    cdef _Session self = <_Session>user_data
    stream = self.streams.get(frame.hd.stream_id)
    if stream is None:
        return 0
    try:
        size = stream.header_size + namelen + valuelen + H2_FIELD_OVERHEAD
        stream.header_size = size
        if size <= self.max_header_list:
            # (Trailers, gRPC's mostly, are under the same bound as the header list.)
            fields = stream.fields
            if fields is None:
                fields = stream.trailers_in
            fields.append((PyBytes_FromStringAndSize(<const char *>name, namelen),
                           PyBytes_FromStringAndSize(<const char *>value, valuelen)))
    except BaseException as exc:
        self.error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept:
    cdef _Session self = <_Session>user_data
    cdef uint8_t kind = frame.hd.type
    cdef bint end = frame.hd.flags & NGHTTP2_FLAG_END_STREAM
    try:
        if kind == NGHTTP2_HEADERS:
            stream = self.streams.get(frame.hd.stream_id)
            if stream is None:
                return 0
            if frame.headers.cat == NGHTTP2_HCAT_HEADERS and not end and not self.spend():
                return 0                           # (a server's budget: HEADERS neither a request nor an end)
            self.owner.headers(stream, end)
        elif kind == NGHTTP2_DATA:
            if end:
                stream = self.streams.get(frame.hd.stream_id)
                if stream is not None:
                    self.owner.body_end(stream)
            elif frame.hd.length == 0:
                self.spend()                       # an empty DATA frame carries nothing
        elif kind == NGHTTP2_GOAWAY:
            self.owner.goaway_received()
        elif kind == NGHTTP2_PING or kind == NGHTTP2_SETTINGS or kind == NGHTTP2_PRIORITY \
                or kind == NGHTTP2_RST_STREAM:
            # (Not WINDOW_UPDATE: a client reading a large response sends one per DATA frame or so.)
            self.spend()
    except BaseException as exc:
        self.error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int on_data_chunk_recv(nghttp2_session *session, uint8_t flags, int32_t stream_id, const uint8_t *data,
                            size_t size, void *user_data) noexcept:
    cdef _Session self = <_Session>user_data
    stream = self.streams.get(stream_id)
    if stream is None:
        nghttp2_session_consume_connection(self.ptr, size)
        return 0
    try:
        self.owner.body(stream, PyBytes_FromStringAndSize(<const char *>data, size))
    except BaseException as exc:
        self.error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                         void *user_data) noexcept:
    cdef _Session self = <_Session>user_data
    stream = self.streams.pop(stream_id, None)
    if stream is None:
        return 0
    try:
        if error_code != NGHTTP2_NO_ERROR:
            self.spend()                           # a stream reset before its end (Rapid Reset)
        self.owner.stream_closed(stream, error_code)
    except BaseException as exc:
        self.error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef ssize_t read_body(nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
                       uint32_t *data_flags, nghttp2_data_source *source, void *user_data) noexcept:
    """A body for either side, from the stream's `out`; at its end, the stream's `trailers` if it has any."""
    cdef _Session self = <_Session>user_data
    cdef Py_ssize_t n, have
    cdef bytearray out
    cdef nghttp2_nv *nva
    stream = self.streams.get(stream_id)
    if stream is None:
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
    try:
        out = stream.out
        have = len(out)
        n = have if <size_t>have <= length else <Py_ssize_t>length
        if n:
            memcpy(buf, <char *>out, n)
            del out[:n]
            if have - n < stream.low_water:
                self.owner.drained(stream)
        if n == have and stream.out_eof:
            trailers = stream.trailers
            if trailers:
                # The stream ends with a HEADERS frame of trailers, not with this DATA frame.
                nva = field_array(trailers, 0)
                nghttp2_submit_trailer(session, stream_id, nva, len(trailers))
                free(nva)
                stream.trailers = None
                data_flags[0] |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM
            else:
                data_flags[0] |= NGHTTP2_DATA_FLAG_EOF
            return n
        if n == 0:
            return NGHTTP2_ERR_DEFERRED
        return n
    except BaseException as exc:
        self.error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
