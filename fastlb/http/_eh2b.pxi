# HTTP/2 to backends in the HTTP engine (`--backend HOST:PORT,proto=h2`, cleartext h2 with prior
# knowledge), with libnghttp2 client sessions over the engine's own backend connections (included by
# fastlb/http/_fast.pyx after _eh2.pxi).
#
# What it serves: HTTP/2 client streams (_eh2.pxi) of a balancer whose one pool (no routing rules, no
# sticky rule, no response header rules) has only cleartext proto=h2 backends (fastlb/http/fast.py's
# h2_backends_served). Everything else with proto=h2 backends stays on the Python path
# (fastlb/http2/backend.py): TLS to h2 backends, routing, HTTP/1.1 clients (handed over per request).
#
# Shape: a stream's request is read and checked as _eh2.pxi reads any (its HTTP/1.1 head, the engine's
# header rules, limits and pick: parse_request, dispatch). A request with a body is dispatched at its
# HEADERS (h2b_dispatch_early), so its body streams after it (gRPC client streaming and bidi); where
# place() would put it on an HTTP/1.1 connection it goes to h2b_place instead: the head becomes the
# backend stream's header list, submitted on a connection of the backend (H2Up) with a
# stream to spare (the backend's SETTINGS_MAX_CONCURRENT_STREAMS), else on a new one. Bodies flow both
# ways under flow control: the client's DATA is acknowledged (WINDOW_UPDATE) as the backend stream
# takes it, the backend's as the client stream takes it; response HEADERS, DATA and trailers go on as
# they come. The slot the pick took goes back with the outcome at the stream's end (finish), as for an
# HTTP/1.1 request.
#
# Failures: a stream the backend did not process (a connect that failed, REFUSED_STREAM, a GOAWAY below
# its id: libnghttp2 closes those with REFUSED_STREAM) is sent again to another backend while the pool's
# retry rule allows (may_send_again_on; the body is held while it is within the replay limit); one that
# may have been processed is never sent again: its client gets UNAVAILABLE (gRPC: grpc-status 14, as
# Trailers-Only or as trailers after what it had; else a 502 or a reset). A reset either way is passed
# on. Deadlines: a gRPC call's grpc-timeout (_eh2.pxi's DEADLINE_EXCEEDED), a response head not come
# within response_timeout (504; gRPC UNAVAILABLE).

from libc.errno cimport EINPROGRESS, ETIMEDOUT
from libc.string cimport strerror
import socket as _socket

cdef enum:
    IS_H2_UPSTREAM = 6             # an H2Up in the epoll set (its first field, as Client.kind)
    H2B_STREAMS_BEFORE_SETTINGS = 100   # streams put on a connection before any SETTINGS of its backend came
    H2B_STREAMS_ASSUMED_MAX = 1000 # ... and at most, whatever the backend's last SETTINGS said
    H2B_FLUSH_ROUNDS = 8           # end of a batch: backend and client writes feeding each other, bounded

cdef struct H2UpStream
cdef struct H2Up


cdef struct H2bSlot:
    # Per engine slot (Engine.backends index): whether the engine serves it over HTTP/2 and where it is.
    unsigned char h2
    unsigned char python           # a proto=h2 backend the engine does not serve (TLS, a host name): its
                                   # requests are handed to the Python path
    sockaddr_storage addr
    socklen_t addrlen
    double connect_timeout
    H2Up *conns                    # its connections, newest first
    uint32_t max_streams           # the backend's last SETTINGS_MAX_CONCURRENT_STREAMS: a new connection's
                                   # bound until its own SETTINGS come


cdef struct H2Up:
    # One connection to a proto=h2 backend.
    int kind                       # IS_H2_UPSTREAM
    int fd
    int slot
    nghttp2_session *session
    void *engine                   # the Engine (borrowed)
    H2Up *next
    H2Up *prev
    H2UpStream *streams            # the streams on it
    int nstreams
    unsigned char connecting       # the connect is under way: nothing is written yet
    unsigned char goaway           # the backend said GOAWAY (or the connection failed): no new stream
    unsigned char settled          # the backend's SETTINGS came (its stream limit is known)
    unsigned char flush_due        # in Engine.h2b_due
    unsigned char dead             # closed: freed after the batch (2: its connect failed)
    int error                      # the failed connect's errno
    char *pending                  # frames the socket did not take
    uint32_t pending_len
    uint32_t pending_off
    double started                 # the connect's start
    double idle_since


cdef struct H2UpStream:
    # A client stream's request on a backend connection (H2Stream.up).
    Client *s
    H2Up *conn                     # NULL: not on a connection (yet, or any more)
    H2UpStream *next
    H2UpStream *prev
    int32_t id                     # its stream on conn (0: none)
    char *body                     # the request body not yet taken by the backend stream (all of it while
    uint32_t body_len              # `replayable`)
    uint32_t body_off
    uint32_t body_cap
    uint32_t client_owed           # client DATA bytes not yet acknowledged to the client
    uint32_t unconsumed            # backend DATA bytes the client stream has not taken yet
    unsigned char body_end         # the client's request ended
    unsigned char replayable       # every byte of the body is still held
    unsigned char responded        # its response HEADERS went to the client
    unsigned char ended            # the backend's response ended (END_STREAM)
    unsigned char finished         # its slot went back
    unsigned char grpc             # content-type application/grpc: failures are told as grpc-status
    int tries                      # attempts used (retries + 1)
    int status
    char *fields                   # a header block from the backend: records as H2Stream.fields'
    uint32_t fields_len
    uint32_t fields_cap
    uint32_t fields_size           # its RFC 9113 size, bounded by the client side's header list limit
    long long bytes_out


cdef inline H2UpStream *up_of(Client *s) noexcept:
    return <H2UpStream *>stream_of(s).up


# ---- configuration, slots ---------------------------------------------------------------------------------

cdef h2b_configure(Engine self, glue):
    """Whether the engine serves its pool's proto=h2 backends (fast.py's h2_backends_served: with the
    engine's HTTP/2 on); called before any slot is made."""
    self.h2b_on = bool(glue.h2_backends_served)
    if self.h2b_on:
        self.h2b_buf = <char *>malloc(SCRATCH)
        if self.h2b_buf == NULL:
            raise MemoryError()


cdef h2b_slot(Engine self, int slot, backend):
    """slot_of's new slot: served over HTTP/2 here when it is a cleartext proto=h2 backend at an IP
    address (a host name would be resolved in the event loop, blocking it: the Python path's)."""
    cdef H2bSlot *grown
    cdef H2bSlot *e
    if self.h2b_slot_cap < self.slot_capacity:
        grown = <H2bSlot *>realloc(self.h2b_slots, sizeof(H2bSlot) * self.slot_capacity)
        if grown == NULL:
            raise MemoryError()
        self.h2b_slots = grown
        self.h2b_slot_cap = self.slot_capacity
    e = &self.h2b_slots[slot]
    memset(e, 0, sizeof(H2bSlot))
    if backend.h2 is None:
        return
    e.python = 1                      # (also where the engine serves no h2 backend: one added at run time)
    if not self.h2b_on or backend.h2 is None or backend.ssl_context is not None:
        return
    try:
        family, _, _, _, address = _socket.getaddrinfo(backend.host, backend.port, type=_socket.SOCK_STREAM,
                                                       flags=_socket.AI_NUMERICHOST)[0]
    except OSError:
        return
    if family == _socket.AF_INET:
        (<sockaddr_in *>&e.addr).sin_family = AF_INET
        (<sockaddr_in *>&e.addr).sin_port = htons(address[1])
        inet_pton(AF_INET, address[0].encode(), &(<sockaddr_in *>&e.addr).sin_addr)
        e.addrlen = sizeof(sockaddr_in)
    elif family == _socket.AF_INET6:
        (<sockaddr_in6 *>&e.addr).sin6_family = AF_INET6
        (<sockaddr_in6 *>&e.addr).sin6_port = htons(address[1])
        inet_pton(AF_INET6, address[0].encode(), &(<sockaddr_in6 *>&e.addr).sin6_addr)
        e.addrlen = sizeof(sockaddr_in6)
    else:
        return
    e.connect_timeout = backend.pool.connect_timeout
    e.max_streams = H2B_STREAMS_BEFORE_SETTINGS
    e.python = 0
    e.h2 = 1


# ---- a stream's request: placed on a connection --------------------------------------------------------

cdef void h2b_dispatch_early(Engine self, Client *s) except *:
    """A request with a body, its header list whole (h2_request): dispatched now, so its body streams
    to the backend as it comes. Where it does not go to an h2 backend (handed over, answered here) the
    body is the Python path's (relayed after the head: h2_handed's hook) or not wanted."""
    cdef H2Stream *st = stream_of(s)
    cdef Py_ssize_t at = put(self.h2_request_buf, 0, st.fields, st.head_len)
    at = put(self.h2_request_buf, at, b"\r\n", 2)
    self.h2b_early = s
    try:
        h2_serve(self, s, self.h2_request_buf, at)
    finally:
        self.h2b_early = NULL
    if st.up == NULL and not st.relay:
        st.in_body = 0              # answered here (a 429, an unserved stream): its body is dropped
        free(st.fields)
        st.fields = NULL
        st.fields_len = st.fields_cap = 0


cdef int h2b_place(Engine self, Client *c, object backend, int slot) except -1:
    """place()'s hook: 1 when the request went elsewhere than an HTTP/1.1 connection of the engine:
    to an h2 backend here (a stream), to the Python path (an HTTP/1.1 client of an h2 backend, its slot
    given back first; a stream dispatched early to an HTTP/1.1 backend)."""
    cdef bint h2 = self.h2b_slots[slot].h2
    cdef H2UpStream *u
    cdef H2Stream *st
    cdef uint32_t body_at
    if not h2 and not self.h2b_slots[slot].python and not (c.kind == IS_STREAM and self.h2b_early == c):
        return 0
    if not h2 or c.kind != IS_STREAM:
        # The Python path picks again (its own h2 streams, or the early stream's relayed body).
        backend.pool.release(backend)
        c.slot = -1
        self.adopt(c, c.buf, c.req_len, HAND_NO_BACKEND, self.limiter is not None)
        return 1
    st = stream_of(c)
    u = <H2UpStream *>calloc(1, sizeof(H2UpStream))
    if u == NULL:
        raise MemoryError()
    u.s = c
    u.replayable = 1
    u.tries = 1
    st.up = <void *>u
    if self.h2b_early == c:
        st.in_body = 0              # its body comes to h2b_client_data from now on
        free(st.fields)
        st.fields = NULL
        st.fields_len = st.fields_cap = 0
    else:
        u.body_end = 1
        # A whole request (no body, or its body read whole): the body after the head's blank line.
        body_at = c.head_len - c.body_len
        if c.body_len and not h2b_body_append(self, u, c.buf + c.req_len + body_at, c.body_len):
            raise MemoryError()
    c.state = SENT
    c.sent_at = self.now
    c.deadline = self.now + self.response_timeout
    c.deadline_kind = WAIT_BACKEND
    self.h2_backend_streams += 1
    h2b_submit(self, c, slot)
    return 1


cdef H2Up *h2b_connection(Engine self, int slot):
    """A connection of the slot's backend with a stream to spare, else a new one (NULL: it could not be
    made: no socket, or out of memory)."""
    cdef H2bSlot *e = &self.h2b_slots[slot]
    cdef H2Up *up = e.conns
    cdef uint32_t limit
    while up != NULL:
        if not up.goaway and not up.dead:
            limit = nghttp2_session_get_remote_settings(up.session, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS)
            if not up.settled and limit > e.max_streams:
                limit = e.max_streams
            if <uint32_t>up.nstreams < limit:
                return up
        up = up.next
    return h2b_open(self, slot)


cdef H2Up *h2b_open(Engine self, int slot):
    """A new connection to the slot's backend: a non-blocking connect, its client session with the
    preface and SETTINGS queued (written once connected)."""
    cdef H2bSlot *e = &self.h2b_slots[slot]
    cdef nghttp2_session_callbacks *callbacks
    cdef nghttp2_option *option
    cdef nghttp2_settings_entry settings[3]
    cdef H2Up *up
    cdef int fd, one = 1, rv
    fd = socket(e.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        return NULL
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
    up = <H2Up *>calloc(1, sizeof(H2Up))
    if up == NULL:
        close(fd)
        return NULL
    if nghttp2_session_callbacks_new(&callbacks) != 0:
        free(up)
        close(fd)
        return NULL
    nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, h2b_on_frame_recv)
    nghttp2_session_callbacks_set_on_header_callback(callbacks, h2b_on_header)
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, h2b_on_data_chunk_recv)
    nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, h2b_on_stream_close)
    rv = nghttp2_option_new(&option)
    if rv == 0:
        # Response bodies are acknowledged as the client takes them (h2b_read_response), as _eh2.pxi
        # acknowledges request bodies.
        nghttp2_option_set_no_auto_window_update(option, 1)
        nghttp2_option_set_max_outbound_ack(option, H2_MAX_OUTBOUND_ACK)
        nghttp2_option_set_max_settings(option, H2_MAX_SETTINGS)
        nghttp2_option_set_max_continuations(option, H2_MAX_CONTINUATIONS)
        nghttp2_option_set_max_deflate_dynamic_table_size(option, H2_DEFLATE_TABLE_SIZE)
        rv = nghttp2_session_client_new2(&up.session, callbacks, <void *>up, option)
        nghttp2_option_del(option)
    nghttp2_session_callbacks_del(callbacks)
    if rv != 0:
        free(up)
        close(fd)
        return NULL
    settings[0].settings_id = NGHTTP2_SETTINGS_ENABLE_PUSH
    settings[0].value = 0
    settings[1].settings_id = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
    settings[1].value = self.h2_initial_window
    settings[2].settings_id = NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE
    settings[2].value = <uint32_t>self.h2_max_header_list
    nghttp2_submit_settings(up.session, NGHTTP2_FLAG_NONE, settings, 3)
    if self.h2_connection_window > 65535:
        nghttp2_session_set_local_window_size(up.session, NGHTTP2_FLAG_NONE, 0, self.h2_connection_window)
    up.kind = IS_H2_UPSTREAM
    up.fd = fd
    up.slot = slot
    up.engine = <void *>self
    up.connecting = 1
    up.started = up.idle_since = self.now
    up.next = e.conns
    if e.conns != NULL:
        e.conns.prev = up
    e.conns = up
    if connect(fd, <sockaddr *>&e.addr, e.addrlen) < 0 and errno != EINPROGRESS:
        up.error = errno
        up.connecting = 0                 # refused at once: failed when its streams are on it (h2b_submit)
        up.goaway = 1
        up.dead = 2                       # (2: the connect failed; freed by h2b_connect_failed)
        return up
    if not self.watch(fd, <void *>up):
        up.goaway = 1
        up.dead = 2
    return up


cdef void h2b_submit(Engine self, Client *s, int slot) except *:
    """The stream's request (its head after the engine's rules, in s.buf) submitted on a connection of
    the slot's backend."""
    cdef H2UpStream *u = up_of(s)
    cdef H2Up *up = h2b_connection(self, slot)
    cdef char *r = s.buf + s.req_len
    cdef Py_ssize_t end = s.head_len - s.body_len - 2     # the blank line's CRLF
    cdef Py_ssize_t sp1 = 0, sp2, pos
    cdef int i, n
    cdef FieldLines fields
    cdef nghttp2_nv *nva
    cdef nghttp2_nv *field
    cdef nghttp2_data_provider provider
    cdef const uint8_t *authority = NULL
    cdef size_t authority_len = 0
    if up == NULL:
        h2b_finish(self, u, False)
        h2b_unavailable(self, s, 0)
        return
    u.conn = up
    u.next = up.streams
    u.prev = NULL
    if up.streams != NULL:
        up.streams.prev = u
    up.streams = u
    up.nstreams += 1
    if up.dead:
        h2b_connect_failed(self, up)      # (its streams, this one included, go elsewhere or fail)
        return
    while r[sp1] != 32:
        sp1 += 1
    sp2 = sp1 + 1
    while r[sp2] != 32:
        sp2 += 1
    pos = find_crlf(r, end + 2) + 2
    fields_start(&fields, count_lines(r + pos, end - pos))
    nva = <nghttp2_nv *>malloc(sizeof(nghttp2_nv) * (fields.room + 5))
    if nva == NULL:
        raise MemoryError()
    # The head's field lines (the engine wrote them), read as a response's are (field_lines: the
    # connection-specific ones out), after room for the four pseudo-headers. Then Host becomes :authority
    # (RFC 9113 8.3.1) and TE is sent as "trailers" below (gRPC needs it).
    field_lines(r, pos, end, nva + 4, &fields)
    n = 4
    for i in range(4, 4 + fields.count):
        field = &nva[i]
        if field.namelen == 4 and name_is(field.name, 4, b"host", 4):
            authority, authority_len = field.value, field.valuelen
            continue
        if field.namelen == 2 and name_is(field.name, 2, b"te", 2):
            continue
        if (field.namelen == 12 and name_is(field.name, 12, b"content-type", 12) and field.valuelen >= 16
                and memcmp(field.value, b"application/grpc", 16) == 0):
            u.grpc = 1
        nva[n] = field[0]
        n += 1
    h2_field(&nva[0], b":method", b"")
    nva[0].value = <uint8_t *>r
    nva[0].valuelen = sp1
    h2_field(&nva[1], b":scheme", b"http")
    h2_field(&nva[2], b":authority", b"")
    nva[2].value = <uint8_t *>authority
    nva[2].valuelen = authority_len
    h2_field(&nva[3], b":path", b"")
    nva[3].value = <uint8_t *>(r + sp1 + 1)
    nva[3].valuelen = sp2 - sp1 - 1
    h2_field(&nva[n], b"te", b"trailers")
    n += 1
    provider.source.ptr = <void *>u
    provider.read_callback = h2b_read_request
    if u.body_end and u.body_len == 0:
        u.id = nghttp2_submit_request(up.session, NULL, nva, n, NULL, <void *>u)
    else:
        u.id = nghttp2_submit_request(up.session, NULL, nva, n, &provider, <void *>u)
    free(nva)
    if u.id < 0:
        u.id = 0
        h2b_detach(self, u)
        h2b_finish(self, u, False)
        h2b_unavailable(self, s, 0)
        return
    h2b_flush_soon(self, up)


cdef void h2b_detach(Engine self, H2UpStream *u) noexcept:
    """u leaves its connection (its stream there is forgotten: callbacks for it find nothing)."""
    cdef H2Up *up = u.conn
    if up == NULL:
        return
    if u.id > 0 and not up.dead:
        nghttp2_session_set_stream_user_data(up.session, u.id, NULL)
        if u.unconsumed:
            nghttp2_session_consume_connection(up.session, u.unconsumed)
            h2b_flush_soon(self, up)
    u.unconsumed = 0
    if u.prev != NULL:
        u.prev.next = u.next
    else:
        up.streams = u.next
    if u.next != NULL:
        u.next.prev = u.prev
    u.next = u.prev = NULL
    up.nstreams -= 1
    if up.nstreams == 0:
        up.idle_since = self.now
    u.conn = NULL
    u.id = 0


# ---- bodies ----------------------------------------------------------------------------------------------

cdef bint h2b_body_append(Engine self, H2UpStream *u, const char *data, size_t size) noexcept:
    """Request body bytes for the backend stream: all kept while within the replay limit (a stream the
    backend refuses is sent again whole), else only what it has not taken."""
    cdef char *grown
    cdef uint32_t need
    if u.replayable and u.body_len + size > <size_t>self.replay_limit:
        u.replayable = 0
    if not u.replayable and u.body_off:
        memmove(u.body, u.body + u.body_off, u.body_len - u.body_off)
        u.body_len -= u.body_off
        u.body_off = 0
    need = <uint32_t>(u.body_len + size)
    if need > u.body_cap:
        grown = <char *>realloc(u.body, max(need, u.body_cap * 2, 1024))
        if grown == NULL:
            return False
        u.body = grown
        u.body_cap = max(need, u.body_cap * 2, 1024)
    memcpy(u.body + u.body_len, data, size)
    u.body_len = need
    return True


cdef int h2b_client_data(Engine self, Client *s, const char *data, size_t size) noexcept:
    """h2_on_data_chunk_recv's hook: a client stream's DATA for its backend stream (acknowledged to the
    client once the backend stream takes it: h2b_read_request)."""
    cdef H2UpStream *u = up_of(s)
    if u.body_end or not h2b_body_append(self, u, data, size):
        h2_consume(conn_of(stream_of(s).conn).session, stream_of(s).id, size)
        return 0
    u.client_owed += <uint32_t>size
    if u.conn != NULL and u.id > 0:
        nghttp2_session_resume_data(u.conn.session, u.id)
        h2b_flush_soon(self, u.conn)
    return 0


cdef bint h2b_client_end(Engine self, nghttp2_session *session, int32_t stream_id) noexcept:
    """h2_on_frame_recv's hook: END_STREAM of a stream whose request goes to an h2 backend (its request
    trailers are not passed on). False: not such a stream."""
    cdef Client *s = <Client *>nghttp2_session_get_stream_user_data(session, stream_id)
    cdef H2UpStream *u
    if s == NULL or stream_of(s).up == NULL:
        return False
    u = up_of(s)
    u.body_end = 1
    if u.conn != NULL and u.id > 0:
        nghttp2_session_resume_data(u.conn.session, u.id)
        h2b_flush_soon(self, u.conn)
    return True


cdef ssize_t h2b_read_request(nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
                              uint32_t *data_flags, nghttp2_data_source *source, void *user_data) noexcept:
    """The backend stream's request body, as its window allows; the client may send as much more."""
    cdef H2UpStream *u = <H2UpStream *>source.ptr
    cdef Engine self = <Engine>(<H2Up *>user_data).engine
    cdef size_t n = u.body_len - u.body_off
    cdef uint32_t owed
    cdef H2Stream *st
    if n > length:
        n = length
    if n:
        memcpy(buf, u.body + u.body_off, n)
        u.body_off += <uint32_t>n
        if not u.replayable and u.body_off == u.body_len:
            u.body_off = u.body_len = 0
        owed = <uint32_t>min(<size_t>u.client_owed, n)
        if owed and u.s != NULL:
            st = stream_of(u.s)
            u.client_owed -= owed
            if st.conn != NULL:
                h2_consume(conn_of(st.conn).session, st.id, owed)
                h2_flush_soon(self, st.conn)
    if u.body_off == u.body_len and u.body_end:
        data_flags[0] |= NGHTTP2_DATA_FLAG_EOF
        return n
    if n == 0:
        return NGHTTP2_ERR_DEFERRED
    return n


cdef ssize_t h2b_read_response(nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
                               uint32_t *data_flags, nghttp2_data_source *source, void *user_data) noexcept:
    """The client stream's response body from its pending buffer (then its trailers), as its window
    allows; the backend may send as much more."""
    cdef Client *s = <Client *>source.ptr
    cdef H2Stream *st = stream_of(s)
    cdef H2UpStream *u = up_of(s)
    cdef size_t n = s.pending_len - s.pending_off
    cdef size_t n_taken
    if n > length:
        n = length
    if n:
        memcpy(buf, s.pending + s.pending_off, n)
        s.pending_off += <uint32_t>n
        if s.pending_off == s.pending_len:
            s.pending_off = s.pending_len = 0
        if u != NULL and u.conn != NULL and u.unconsumed:
            n_taken = min(<size_t>u.unconsumed, n)
            u.unconsumed -= <uint32_t>n_taken
            h2_consume(u.conn.session, u.id, n_taken)
            h2b_flush_soon(<Engine>u.conn.engine, u.conn)
    if s.pending_off == s.pending_len and st.out_eof:
        if st.trailers != NULL:
            nghttp2_submit_trailer(session, stream_id, st.trailers, st.ntrailers)
            h2_free_trailers(st)
            data_flags[0] |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM
        else:
            data_flags[0] |= NGHTTP2_DATA_FLAG_EOF
        return n
    if n == 0:
        return NGHTTP2_ERR_DEFERRED
    return n


# ---- the backend's frames --------------------------------------------------------------------------------

cdef int h2b_on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                       const uint8_t *value, size_t valuelen, uint8_t flags, void *user_data) noexcept:
    cdef H2Up *up = <H2Up *>user_data
    cdef Engine self = <Engine>up.engine
    cdef H2UpStream *u = <H2UpStream *>nghttp2_session_get_stream_user_data(session, frame.hd.stream_id)
    cdef uint32_t need, length
    cdef char *grown
    if u == NULL or u.s == NULL:
        return 0
    u.fields_size += <uint32_t>(namelen + valuelen + H2_FIELD_OVERHEAD)
    if u.fields_size > self.h2_max_header_list:
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE      # the stream is reset (a failed response)
    if namelen == 7 and memcmp(name, b":status", 7) == 0:
        if valuelen == 3:
            u.status = (value[0] - 48) * 100 + (value[1] - 48) * 10 + (value[2] - 48)
        return 0
    if namelen and name[0] == 58:
        return 0                    # (libnghttp2 refuses connection-specific fields in a response itself)
    need = u.fields_len + FIELD_RECORD + <uint32_t>(namelen + valuelen)
    if need > u.fields_cap:
        grown = <char *>realloc(u.fields, max(need, u.fields_cap * 2, 512))
        if grown == NULL:
            return NGHTTP2_ERR_CALLBACK_FAILURE
        u.fields = grown
        u.fields_cap = max(need, u.fields_cap * 2, 512)
    length = <uint32_t>namelen
    memcpy(u.fields + u.fields_len, &length, 4)
    length = <uint32_t>valuelen
    memcpy(u.fields + u.fields_len + 4, &length, 4)
    memcpy(u.fields + u.fields_len + FIELD_RECORD, name, namelen)
    memcpy(u.fields + u.fields_len + FIELD_RECORD + namelen, value, valuelen)
    u.fields_len = need
    return 0


cdef nghttp2_nv *h2b_fields_nv(H2UpStream *u, int room_before, int *count) noexcept:
    """The header block received (u.fields) as an nv array with room_before entries free at its start
    (pointing into u.fields); NULL when out of memory."""
    cdef uint32_t pos = 0, nlen, vlen
    cdef int n = 0
    cdef nghttp2_nv *nva
    while pos < u.fields_len:
        memcpy(&nlen, u.fields + pos, 4)
        memcpy(&vlen, u.fields + pos + 4, 4)
        pos += FIELD_RECORD + nlen + vlen
        n += 1
    nva = <nghttp2_nv *>malloc(sizeof(nghttp2_nv) * (n + room_before + 1))
    if nva == NULL:
        return NULL
    pos = 0
    n = room_before
    while pos < u.fields_len:
        memcpy(&nlen, u.fields + pos, 4)
        memcpy(&vlen, u.fields + pos + 4, 4)
        nva[n].name = <uint8_t *>(u.fields + pos + FIELD_RECORD)
        nva[n].namelen = nlen
        nva[n].value = <uint8_t *>(u.fields + pos + FIELD_RECORD + nlen)
        nva[n].valuelen = vlen
        nva[n].flags = NGHTTP2_NV_FLAG_NONE
        pos += FIELD_RECORD + nlen + vlen
        n += 1
    count[0] = n
    return nva


cdef int h2b_on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept:
    cdef H2Up *up = <H2Up *>user_data
    cdef Engine self = <Engine>up.engine
    cdef H2UpStream *u
    cdef bint end = frame.hd.flags & NGHTTP2_FLAG_END_STREAM
    if frame.hd.type == NGHTTP2_SETTINGS:
        up.settled = 1
        self.h2b_slots[up.slot].max_streams = min(
            nghttp2_session_get_remote_settings(session, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS),
            <uint32_t>H2B_STREAMS_ASSUMED_MAX)
        return 0
    if frame.hd.type == NGHTTP2_GOAWAY:
        up.goaway = 1               # no new stream; those past its last id close REFUSED_STREAM
        return 0
    if frame.hd.type != NGHTTP2_HEADERS and frame.hd.type != NGHTTP2_DATA:
        return 0
    u = <H2UpStream *>nghttp2_session_get_stream_user_data(session, frame.hd.stream_id)
    if u == NULL or u.s == NULL:
        return 0
    if frame.hd.type == NGHTTP2_HEADERS:
        if frame.headers.cat == NGHTTP2_HCAT_RESPONSE or not u.responded:
            # (an interim one, 1xx, goes on as such; the final one after it comes as HCAT_HEADERS)
            h2b_response_head(self, u, end)
        elif end:
            h2b_trailers(self, u)
        u.fields_len = u.fields_size = 0
    if end:
        u.ended = 1
        if u.responded:
            stream_of(u.s).out_eof = 1
            if stream_of(u.s).conn != NULL:
                nghttp2_session_resume_data(conn_of(stream_of(u.s).conn).session, stream_of(u.s).id)
                h2_flush_soon(self, stream_of(u.s).conn)
    return 0


cdef void h2b_response_head(Engine self, H2UpStream *u, bint end) noexcept:
    """The backend's response head: submitted to the client stream (Trailers-Only when it ends the
    stream), its body to follow from the stream's pending buffer."""
    cdef Client *s = u.s
    cdef H2Stream *st = stream_of(s)
    cdef nghttp2_nv *nva
    cdef int n
    cdef char status[4]
    cdef nghttp2_data_provider provider
    if st.conn == NULL:
        return
    nva = h2b_fields_nv(u, 1, &n)
    if nva == NULL:
        return
    status[0] = <char>(48 + u.status // 100 % 10)
    status[1] = <char>(48 + u.status // 10 % 10)
    status[2] = <char>(48 + u.status % 10)
    status[3] = 0
    h2_field(&nva[0], b":status", status)
    if u.status < 200:
        # An interim response (103 Early Hints): HEADERS without END_STREAM before the final one.
        nghttp2_submit_headers(conn_of(st.conn).session, NGHTTP2_FLAG_NONE, st.id, NULL, nva, n, NULL)
        free(nva)
        h2_flush_soon(self, st.conn)
        return
    u.responded = 1
    st.submitted = 1
    s.state = WAITING
    s.deadline_kind = WAIT_NONE              # a streamed response lasts as long as it lasts
    provider.source.ptr = <void *>s
    provider.read_callback = h2b_read_response
    if end or st.is_head:
        st.out_eof = 1
        nghttp2_submit_response(conn_of(st.conn).session, st.id, nva, n, NULL)
    else:
        nghttp2_submit_response(conn_of(st.conn).session, st.id, nva, n, &provider)
    free(nva)
    h2_flush_soon(self, st.conn)


cdef void h2b_trailers(Engine self, H2UpStream *u) noexcept:
    """The backend's trailers (grpc-status...): sent by the client stream after its body
    (h2b_read_response); the records move to the stream (H2Stream.trailer_buf)."""
    cdef H2Stream *st = stream_of(u.s)
    cdef int n
    cdef nghttp2_nv *nva = h2b_fields_nv(u, 0, &n)
    if nva == NULL or n == 0:
        free(nva)
        return
    h2_free_trailers(st)
    st.trailers = nva
    st.ntrailers = n
    st.trailer_buf = u.fields
    u.fields = NULL
    u.fields_cap = 0


cdef int h2b_on_data_chunk_recv(nghttp2_session *session, uint8_t flags, int32_t stream_id, const uint8_t *data,
                                size_t size, void *user_data) noexcept:
    cdef H2Up *up = <H2Up *>user_data
    cdef Engine self = <Engine>up.engine
    cdef H2UpStream *u = <H2UpStream *>nghttp2_session_get_stream_user_data(session, stream_id)
    if u == NULL or u.s == NULL or not u.responded or stream_of(u.s).conn == NULL:
        h2_consume(session, stream_id, size)
        return 0
    if not h2_body_bytes(self, u.s, <const char *>data, size):
        return NGHTTP2_ERR_CALLBACK_FAILURE
    u.unconsumed += <uint32_t>size
    u.bytes_out += size
    h2_flush_soon(self, stream_of(u.s).conn)
    return 0


cdef int h2b_on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                             void *user_data) noexcept:
    cdef H2Up *up = <H2Up *>user_data
    cdef Engine self = <Engine>up.engine
    cdef H2UpStream *u = <H2UpStream *>nghttp2_session_get_stream_user_data(session, stream_id)
    if u == NULL:
        return 0
    if u.s == NULL:
        h2b_detach(self, u)             # an orphan (h2b_client_gone): its stream is done
        h2b_free(u)
        return 0
    try:
        if error_code == NGHTTP2_NO_ERROR and u.ended:
            h2b_finish(self, u, True)
            h2b_detach(self, u)
        elif error_code == NGHTTP2_REFUSED_STREAM and not u.responded:
            h2b_detach(self, u)
            h2b_again(self, u)                  # not processed (RFC 9113 8.7): another backend may take it
        else:
            h2b_detach(self, u)
            h2b_lost(self, u, error_code)
    except BaseException:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


# ---- outcomes ----------------------------------------------------------------------------------------------

cdef void h2b_finish(Engine self, H2UpStream *u, bint ok) except *:
    """The stream's slot goes back with its outcome, counted and logged as an HTTP/1.1 request's."""
    cdef Client *s = u.s
    if u.finished or s == NULL or s.slot < 0:
        return
    u.finished = 1
    if ok:
        self.served += 1
    self.finish(s.slot, self.now - s.sent_at, ok and u.status < 500, u.status if ok else 0,
                self.request_size(s), u.bytes_out)
    if ok and self.access_log is not None:
        self.log_request(s, s.slot, None, u.status, self.request_size(s), u.bytes_out,
                         max(0.0, s.sent_at - s.started))


cdef void h2b_again(Engine self, H2UpStream *u) except *:
    """A stream the backend did not process: to another backend while the pool's retry rule allows
    (the body still held whole), else UNAVAILABLE. Its slot goes back first."""
    cdef Client *s = u.s
    cdef object backend, other
    cdef int slot
    if s == NULL:
        return
    slot = s.slot
    backend = self.backends[slot]
    if not u.finished:
        u.finished = 1
        # Not held against the backend (as the keep-alive race on HTTP/1.1): only its slot goes back.
        backend.pool.release(backend)
    if may_send_again_on(False, u.replayable, False, False, u.tries, self.attempts[slot]):
        other = backend.pool.select_now(None, [backend], None)
        if other is not None:
            slot = self.slot_of(other)
            if not self.h2b_slots[slot].h2:
                other.pool.release(other)
            else:
                s.slot = slot
                u.tries += 1
                u.finished = 0
                u.ended = u.responded = 0
                u.status = 0
                u.body_off = 0
                h2b_submit(self, s, slot)
                return
    s.slot = -1
    h2b_unavailable(self, s, 0)


cdef void h2b_lost(Engine self, H2UpStream *u, uint32_t error_code) except *:
    """A stream the backend may have processed ended before its response did (reset, connection lost):
    never sent again; its slot goes back as a failure, the client is told."""
    h2b_finish(self, u, False)
    if u.s != NULL:
        h2b_unavailable(self, u.s, error_code)


cdef void h2b_unavailable(Engine self, Client *s, uint32_t error_code) noexcept:
    """The client stream gets no (more) response from a backend: gRPC UNAVAILABLE (grpc-status 14,
    Trailers-Only, or as trailers after what it had), else a 502, or a reset passing on the backend's
    code when a response had started."""
    cdef H2Stream *st = stream_of(s)
    cdef H2UpStream *u = up_of(s)
    cdef nghttp2_session *session
    s.state = WAITING
    s.deadline_kind = WAIT_NONE
    if st.conn == NULL:
        return
    session = conn_of(st.conn).session
    if u != NULL and u.responded:
        if u.grpc and not st.out_eof:
            h2_free_trailers(st)
            st.trailers = <nghttp2_nv *>malloc(sizeof(nghttp2_nv) * 2)
            if st.trailers != NULL:
                h2_field(&st.trailers[0], b"grpc-status", b"14")
                h2_field(&st.trailers[1], b"grpc-message", b"backend stream lost in fastlb")
                st.ntrailers = 2
                st.out_eof = 1
                nghttp2_session_resume_data(session, st.id)
                h2_flush_soon(self, st.conn)
                return
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, st.id,
                                  error_code if error_code != NGHTTP2_NO_ERROR else NGHTTP2_INTERNAL_ERROR)
    elif u != NULL and u.grpc:
        st.submitted = 1
        h2_grpc_only(session, st.id, b"14", b"no backend answered in fastlb")     # UNAVAILABLE
    else:
        h2_refuse(self, s, b"502")
    if u != NULL:
        u.responded = 1
        u.ended = 1
    h2_flush_soon(self, st.conn)


cdef void h2b_client_gone(Engine self, Client *s) noexcept:
    """h2_drop_stream's hook: the client stream ended (answered, reset, or its connection closed): the
    slot goes back if still held, the backend stream is cancelled if still open (u, an orphan then,
    stays on its connection until the backend stream closes: libnghttp2 may still read its body)."""
    cdef H2UpStream *u = up_of(s)
    if not u.finished and s.slot >= 0:
        u.finished = 1
        try:
            self.finish(s.slot, self.now - s.sent_at, True, 0, self.request_size(s), 0)
        except BaseException:
            pass
    u.s = NULL
    stream_of(s).up = NULL
    if u.conn != NULL and u.id > 0 and not u.conn.dead:
        nghttp2_submit_rst_stream(u.conn.session, NGHTTP2_FLAG_NONE, u.id, NGHTTP2_CANCEL)
        h2b_flush_soon(self, u.conn)
        return
    h2b_detach(self, u)
    h2b_free(u)


cdef void h2b_free(H2UpStream *u) noexcept:
    free(u.body)
    free(u.fields)
    free(u)


cdef void h2b_sweep_stream(Engine self, Client *s) except *:
    """h2_sweep's hook for a stream to an h2 backend: past its grpc-timeout, DEADLINE_EXCEEDED (the
    backend stream cancelled); no response head within response_timeout, a failure (504, gRPC
    UNAVAILABLE)."""
    cdef H2Stream *st = stream_of(s)
    cdef H2UpStream *u = up_of(s)
    cdef bint late = s.deadline_kind == WAIT_BACKEND and s.deadline <= self.now
    if not (st.grpc_deadline and st.grpc_deadline <= self.now) and not late:
        return
    if u.conn != NULL and u.id > 0:
        nghttp2_submit_rst_stream(u.conn.session, NGHTTP2_FLAG_NONE, u.id, NGHTTP2_CANCEL)
        h2b_flush_soon(self, u.conn)
    h2b_detach(self, u)
    h2b_finish(self, u, False)
    if st.grpc_deadline and st.grpc_deadline <= self.now:
        u.ended = 1
        h2_deadline_exceeded(self, s)
    elif not u.responded and not u.grpc:
        u.responded = u.ended = 1
        s.state = WAITING
        s.deadline_kind = WAIT_NONE
        h2_refuse(self, s, b"504")
        h2_flush(self, st.conn)
    else:
        h2b_unavailable(self, s, NGHTTP2_CANCEL)


# ---- connections: events, writes, failures --------------------------------------------------------------

cdef void h2b_event(Engine self, H2Up *up, uint32_t ev) except *:
    """An epoll event on a backend connection: its connect done, frames to write, bytes to read."""
    cdef int err = 0
    cdef socklen_t size = sizeof(err)
    cdef ssize_t n, rv
    if up.connecting:
        if not ev & (EPOLLOUT | EPOLLERR | EPOLLHUP):
            return
        getsockopt(up.fd, SOL_SOCKET, SO_ERROR, &err, &size)
        if err or ev & (EPOLLERR | EPOLLHUP):
            up.error = err
            up.connecting = 0
            up.goaway = 1
            up.dead = 2
            h2b_connect_failed(self, up)
            return
        up.connecting = 0
        backend = self.backends[up.slot]
        backend.pool.connect_worked(backend, self.now - up.started, self.now - up.started, False)
        h2b_flush(self, up)
        if up.dead:
            return
    if ev & EPOLLOUT and up.pending != NULL:
        h2b_flush(self, up)
        if up.dead:
            return
    if not ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        return
    while not up.dead:
        n = recv(up.fd, self.scratch, SCRATCH, 0)
        if n < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                break
            n = 0
        if n == 0:
            h2b_close(self, up)
            return
        rv = nghttp2_session_mem_recv(up.session, <const uint8_t *>self.scratch, n)
        if rv < 0:
            h2b_close(self, up)
            return
        if n < SCRATCH and not ev & (EPOLLRDHUP | EPOLLHUP):
            break               # a short read drained the socket (but the peer's close has no edge of its own)
    h2b_flush_soon(self, up)


cdef void h2b_flush_soon(Engine self, H2Up *up) noexcept:
    """Frames are ready: written at the end of the batch of events (never inside libnghttp2's callbacks:
    it is not reentrant), so many streams' frames leave in one write."""
    cdef H2Up **grown
    if up.flush_due or up.dead:
        return
    if self.h2b_due_count == self.h2b_due_cap:
        grown = <H2Up **>realloc(self.h2b_due, sizeof(H2Up *) * (self.h2b_due_cap * 2 + 16))
        if grown == NULL:
            return
        self.h2b_due = grown
        self.h2b_due_cap = self.h2b_due_cap * 2 + 16
    up.flush_due = 1
    self.h2b_due[self.h2b_due_count] = up
    self.h2b_due_count += 1


cdef void h2b_flush_due(Engine self) except *:
    """The end of a batch (on_ready's hook, and the sweep's): backend connections with frames ready
    write them, and the client connections that this makes ready (windows, trailers) theirs, in turn."""
    cdef int rounds = 0, i, count
    cdef H2Up *up
    while self.h2b_due_count and rounds < H2B_FLUSH_ROUNDS:
        rounds += 1
        count = self.h2b_due_count
        i = 0
        while i < count:
            up = self.h2b_due[i]
            i += 1
            up.flush_due = 0
            if not up.dead:
                h2b_flush(self, up)
        # (entries added meanwhile move to the front)
        memmove(self.h2b_due, self.h2b_due + count, sizeof(H2Up *) * (self.h2b_due_count - count))
        self.h2b_due_count -= count
        if self.h2_due_count:
            h2_flush_due(self)
    h2b_bury(self)


cdef void h2b_flush(Engine self, H2Up *up) except *:
    """Writes what the session has ready (after what waits already) until the socket would block."""
    cdef const uint8_t *data
    cdef ssize_t n, w, have
    if up.connecting or up.dead:
        return
    while True:
        while up.pending != NULL:
            w = send(up.fd, up.pending + up.pending_off, up.pending_len - up.pending_off, MSG_NOSIGNAL)
            if w < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    return                  # EPOLLOUT resumes it
                h2b_close(self, up)
                return
            up.pending_off += <uint32_t>w
            if up.pending_off == up.pending_len:
                free(up.pending)
                up.pending = NULL
                up.pending_len = up.pending_off = 0
        have = 0
        while have < SCRATCH:
            n = nghttp2_session_mem_send(up.session, &data)
            if n < 0:
                h2b_close(self, up)
                return
            if n == 0:
                break
            if have + n > SCRATCH:
                if not h2b_hold(up, self.h2b_buf, have) or not h2b_hold(up, <const char *>data, n):
                    h2b_close(self, up)
                    return
                have = 0
                break
            memcpy(self.h2b_buf + have, data, n)
            have += n
        if have:
            while True:
                w = send(up.fd, self.h2b_buf, have, MSG_NOSIGNAL)
                if w >= 0 or errno != EINTR:
                    break
            if w < 0:
                if errno != EAGAIN:
                    h2b_close(self, up)
                    return
                w = 0
            if w < have and not h2b_hold(up, self.h2b_buf + w, have - w):
                h2b_close(self, up)
                return
        if up.pending == NULL and have == 0:
            break
        if up.pending != NULL and have:
            return                          # the socket is full: EPOLLOUT resumes it
    if up.goaway and up.nstreams == 0:
        h2b_close(self, up)


cdef bint h2b_hold(H2Up *up, const char *data, ssize_t size) noexcept:
    cdef char *grown
    if size <= 0:
        return True
    grown = <char *>realloc(up.pending, up.pending_len + size)
    if grown == NULL:
        return False
    memcpy(grown + up.pending_len, data, size)
    up.pending = grown
    up.pending_len += <uint32_t>size
    return True


cdef void h2b_unlink(Engine self, H2Up *up) noexcept:
    """up leaves its slot's list and the epoll set (freed after the batch: h2b_bury)."""
    cdef H2bSlot *e = &self.h2b_slots[up.slot]
    if up.prev != NULL:
        up.prev.next = up.next
    elif e.conns == up:
        e.conns = up.next
    if up.next != NULL:
        up.next.prev = up.prev
    up.next = up.prev = NULL
    if up.fd >= 0:
        self.forget(up.fd)
        up.fd = -1
    up.kind = IS_FREED
    if not up.dead:
        up.dead = 1
    # Kept for h2b_bury (the batch may still name it): linked through `next` on the engine's list.
    up.next = self.h2b_dead
    self.h2b_dead = up


cdef void h2b_bury(Engine self) noexcept:
    """Frees the connections closed (after the batch of events, which may still name them); one still
    in h2b_due waits for the next time."""
    cdef H2Up *up
    cdef H2Up *kept = NULL
    while self.h2b_dead != NULL:
        up = self.h2b_dead
        self.h2b_dead = up.next
        if up.flush_due:
            up.next = kept
            kept = up
            continue
        nghttp2_session_del(up.session)
        free(up.pending)
        free(up)
    self.h2b_dead = kept


cdef void h2b_close(Engine self, H2Up *up) except *:
    """The connection ended (EOF, an error, a protocol error, GOAWAY done): its streams that may have
    been processed are lost (never sent again), those never written go elsewhere."""
    cdef H2UpStream *u
    cdef bint written = not up.connecting and up.dead != 2
    if up.kind == IS_FREED:
        return
    up.goaway = 1
    h2b_unlink(self, up)
    while up.streams != NULL:
        u = up.streams
        h2b_detach(self, u)
        if u.s == NULL:
            h2b_free(u)
            continue
        if u.ended:
            h2b_finish(self, u, True)
        elif written:
            h2b_lost(self, u, NGHTTP2_NO_ERROR)
        else:
            h2b_again(self, u)


cdef void h2b_connect_failed(Engine self, H2Up *up) except *:
    """The connect failed (refused, timed out): counted against the backend once (the pool's
    connect_attempt_failed gives back the first stream's slot with it), its streams go elsewhere."""
    cdef H2UpStream *u
    cdef object backend = self.backends[up.slot]
    cdef bint reported = False
    if up.kind == IS_FREED and up.streams == NULL:
        return
    up.goaway = 1
    if up.kind != IS_FREED:
        h2b_unlink(self, up)
    while up.streams != NULL:
        u = up.streams
        h2b_detach(self, u)
        if u.s == NULL:
            h2b_free(u)
            continue
        if not reported and not u.finished:
            reported = True
            u.finished = 1
            backend.pool.connect_attempt_failed(
                backend, OSError(up.error, strerror(up.error).decode()) if up.error else ConnectionError(
                    "connection closed while connecting"), self.now - up.started, [])
        h2b_again(self, u)


# ---- the engine's sweep, shutdown -------------------------------------------------------------------------

cdef void h2b_sweep(Engine self) except *:
    """Engine.sweep's hook: connects past their timeout fail, idle connections past backend_idle_timeout
    (or draining) close."""
    cdef int slot
    cdef H2Up *up
    cdef H2Up *next_up
    if self.h2b_slots == NULL:
        return
    for slot in range(self.slot_count):
        up = self.h2b_slots[slot].conns
        while up != NULL:
            next_up = up.next
            if up.connecting and self.now - up.started > self.h2b_slots[slot].connect_timeout:
                up.error = ETIMEDOUT
                up.connecting = 0
                up.dead = 2
                h2b_connect_failed(self, up)
            elif up.nstreams == 0 and (self.draining or self.now - up.idle_since >= self.backend_idle_timeout):
                h2b_close(self, up)
            up = next_up
    h2b_flush_due(self)


cdef void h2b_close_all(Engine self) except *:
    cdef int slot
    if self.h2b_slots == NULL:
        return
    for slot in range(self.slot_count):
        while self.h2b_slots[slot].conns != NULL:
            h2b_close(self, self.h2b_slots[slot].conns)
    h2b_bury(self)
