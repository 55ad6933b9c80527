# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The C engine of HTTP mode: the common request served without Python objects or libuv.

What it serves: on a plain or TLS bind of a balancer with nothing per request in Python beyond routing and
picking (see fastlb/http/fast.py), with its access log (lines formatted here, written by
fastlb/_accesslog.pyx's thread), header rules, hashing keys, sticky sessions (a C cache of what each
Cookie header means to the rule) and --retry-on statuses (listed and retryable: Python's), a keep-alive
HTTP/1.1 client whose request (GET, POST, PUT, PATCH, DELETE,
OPTIONS; no body, or a Content-Length body) is complete in one read, made of bytes a strict subset of RFC 9112 allows, and
whose backend answers with a plain response (fastlb/http/_scan.pxi) whose head is in its first read: a
body that the read does not hold whole is relayed read by read (relay_body, RELAYING) to an HTTP/1.1 client.

How: the engine owns an epoll set that uvloop watches as one file descriptor (`loop.add_reader`). Client
and backend sockets are in it edge-triggered, registered once (no epoll_ctl per request). Per request:
one recv from the client, one scan of the head, the backend's head built into a buffer, one send on an
idle backend connection the engine keeps per backend, one recv of the response, one scan, one writev to
the client. Python is called twice (the pool picks a backend and takes its slot: select_now; the slot
is released with the outcome: response_done), both compiled code called directly.

Everything else leaves the engine at once, by adoption: the client socket (and, mid-request, the
backend socket) becomes a uvloop transport with the ordinary Python protocol (fastlb/http/protocol.py),
which is fed the bytes the engine read and not yet answered, so it parses them as if it had read them
itself: malformed or unusual requests, bodies, pipelining, responses that are not plain, a backend that
closes or fails, a response timeout. Python's own rules (errors, retries, timeouts) then apply exactly.
A request that needs a new backend connection is connected by Python (the pool's retries, queue and
timeouts), which hands the connected socket back. A connection that left the engine does not return.

TLS binds (fastlb/http/_etls.pxi): the engine accepts, handshakes (within the connect timeout, as
uvloop's ssl_handshake_timeout on the Python path) and reads and writes records itself with OpenSSL, on
the SSL_CTX fastlb/tls.py built for the bind before the fork (ServerTLS.native: SNI certificate sets,
session tickets every worker shares, client certificates, ALPN h2 and http/1.1). Per connection: its
SSL*, the ALPN protocol agreed, and for a verified client certificate the `X-Client-Subject` line, made once
(tls.format_subject, the Python path's own formatting) and added to each request head as the Python
path adds it. Admission control runs after the handshake, as on the Python path. A failed or timed-out
handshake is counted (Engine.handshake_failures) and the socket closed, not logged (uvloop logs neither).
A client whose ALPN chose h2 (or a plain one that opens with the h2c preface) is served by _eh2.pxi's
HTTP/2 (FASTLB_H2_ENGINE=0: handed over at once to the Python path's, fastlb/http2/).

Adoption of a TLS connection: the SSL state lives here and cannot move to a uvloop transport, so the
engine keeps the connection and hands the Python path one end of a socketpair instead of the client's
socket (with the client's address and subject line, which a socketpair cannot tell). From then on the
connection is a tunnel: the engine decrypts what the client sends into the socketpair and encrypts what
the Python path writes to it, and the Python path serves exactly as it would a plain connection of that
bind (errors, bodies, upgrades, its timeouts and counts). When the Python side closes, what it wrote is
written to the client (within keepalive_timeout), then a close_notify; the client's end is passed on as
an EOF. Rare by design (what the engine does not serve), it costs one extra local hop per byte.
"""
from libc.stdlib cimport malloc, calloc, free, realloc
from libc.string cimport memcpy, memcmp, memmove, memset, strlen
from libc.errno cimport errno, EAGAIN, EINTR, EMFILE, ENFILE, ENOBUFS, ENOMEM
from libc.stdint cimport uint32_t, int32_t, uint64_t, uintptr_t
from posix.unistd cimport close, read
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF, Py_XDECREF
from cpython.tuple cimport PyTuple_GET_ITEM
from cpython.list cimport PyList_GET_ITEM
from cpython.dict cimport PyDict_GetItem
from cpython.float cimport PyFloat_AS_DOUBLE
from fastlb._posix cimport *
from fastlb.http.reuse cimport may_reuse, may_send_again_on
from fastlb._accesslog cimport LogWriter
from fastlb._admission cimport Limiter, ADMIT, DENIED, MAX_KEY_HEADERS, cookie_value
# Deadline kinds (the sweep's; a connection's first request waits for WAIT_HEAD, then WAIT_IDLE between
# requests, WAIT_BACKEND for a response; a TLS connection its handshake first) and the pool's hashing key,
# as the Python side names them.
from fastlb.constants cimport (WAIT_NONE, WAIT_HEAD, WAIT_IDLE, WAIT_BACKEND, WAIT_HANDSHAKE, WAIT_TUNNEL_FLUSH,
                               WAIT_STREAMS,
                               KEY_NONE, KEY_SOURCE, KEY_URI, KEY_PATH, KEY_HEADER, KEY_COOKIE, KEY_QUERY,
                               STICKY_NONE, STICKY_COOKIE_INSERT, STICKY_COOKIE_PREFIX, STICKY_LEARN_COOKIE,
                               STICKY_LEARN_HEADER, STICKY_SOURCE)
from fastlb._openssl cimport *

from fastlb.http.headers import IDEMPOTENT_METHODS

from os import urandom

include "_scan.pxi"


cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<fcntl.h>" nogil:
    # (Python.h defines _GNU_SOURCE, which declares these)
    ssize_t splice(int fd_in, void *off_in, int fd_out, void *off_out, size_t size, unsigned int flags)
    int pipe2(int *pipefd, int flags)
    int fcntl(int fd, int cmd, ...)
    enum:
        SPLICE_F_MOVE, SPLICE_F_NONBLOCK, F_SETPIPE_SZ, O_NONBLOCK, O_CLOEXEC

cdef extern from "<sys/socket.h>" nogil:
    int socketpair(int domain, int type, int protocol, int *sv)
    int shutdown(int fd, int how)
    enum:
        AF_UNIX, SOCK_STREAM, SHUT_WR

cdef enum:
    SCRATCH = 65536
    RELAY_BYTES = 262144       # relay_body's read size: the Python path's (uvloop's) too
    MAX_EVENTS = 256
    SPARE_BUF_BYTES = 262144   # request buffers kept for reuse between requests (Engine.spare_bufs)
    SPARE_BUF_MIN = 16         # a smaller one cannot hold the list's link and capacity: freed
    MAX_IP_TEXT = 47           # a client address as text (inet_ntop's IPv6 form is at most 45)
    MAX_IOV = MAX_SPANS + 6    # the head's spans, Connection: close, the added block, HSTS, the insert cookie, CRLF, body
    COOKIE_CACHE = 4096        # distinct Cookie headers whose meaning (sticky rules) the engine keeps
    MAX_CACHED_COOKIE = 4096   # a longer Cookie header is looked up in Python every time
    MAX_FAST_HEAD = 12288      # a longer request head (or added block) goes to the Python path
    MAX_LATENCY_BUCKETS = 32   # observe.LATENCY_BUCKETS and the overflow bucket fit

# What a socket in the epoll set is (the first field of both structs).
cdef enum:
    IS_FREED = 0       # closed or adopted: an event still naming it in this batch is skipped
    IS_CLIENT = 1
    IS_BACKEND = 2
    IS_LISTENER = 3
    IS_TUNNEL_END = 4      # the engine's end of a TLS connection's socketpair to the Python path

# Client states.
cdef enum:
    WAITING = 0        # for a request
    CONNECTING = 1     # Python is connecting a backend for the request
    SENT = 2           # the request went to the backend (maybe partly): waiting for the response
    WRITING = 3        # an answer is still being written to the client; nothing is read meanwhile
    HANDSHAKE = 4      # TLS: the handshake is under way
    TUNNEL = 5         # TLS, handed to the Python path: the engine relays the decrypted bytes (adopt())
    RELAYING = 6       # the response's head is out, the rest of its Content-Length body follows (relay_body)

# What send_answer did with an answer.
cdef enum:
    ANSWER_SENT = 0
    ANSWER_PENDING = 1     # the rest waits in c.pending for the client's EPOLLOUT (flush_client)
    ANSWER_FAILED = 2      # the client is closed

# Why a connection went to the Python path (adopt()): counted by reason (Engine.handed_over(), the metrics'
# fastlb_http_engine_handed_over_total{reason}), named by HANDED_REASONS in this order.
cdef enum:
    HAND_REQUEST = 0           # a request the engine does not serve (malformed, unusual, a body, pipelined)
    HAND_NO_BACKEND = 1        # nothing to pick now (down, full, a queue), a routed body over its limit
    HAND_BACKEND_FAILED = 2    # the backend connection closed or failed before a response
    HAND_RESPONSE = 3          # a response the engine does not forward itself (not plain, a watched header)
    HAND_RETRY = 4             # a --retry-on status for a request that may be sent again
    HAND_TIMEOUT = 5           # no response within response_timeout (Python answers 504 or retries)
    HAND_H2 = 6                # ALPN h2 or an h2c preface: HTTP/2 is the Python path's (fastlb/http2/) unless
                               # the engine serves it (_eh2.pxi)
    HAND_REASONS = 7
HANDED_REASONS = ("request", "no_backend", "backend_failed", "response", "retry_status", "response_timeout",
                  "h2")

# Request header names the engine acts on (from HttpSettings.request_actions): what it does with them.
cdef enum:
    H_FORWARD = 0      # not in the table: forwarded as `name: value`
    H_SKIP = 1         # hop-by-hop, or set by fastlb: not forwarded
    H_IS_HOST = 2
    H_IS_CONNECTION = 3
    H_IS_LENGTH = 4    # Content-Length: a body whole in the same read is served
    H_ADOPT = 5        # anything else the Python path handles (chunked, Upgrade, Expect, X-Forwarded-For...)
    H_CAPTURE = 8      # H_CAPTURE + i: its value is kept (capture slot i: a hashing key, a sticky rule's)
    H_KEY = 16         # H_KEY + i: forwarded, and its value is the key of `header:` rate limits of slot i

# Request headers the engine keeps (Router.capture's, for a pool without routing rules): capture slots.
cdef enum:
    MAX_CAPTURES = 3   # the hashing key's header, the learned session's header, Cookie

cdef struct Backend
cdef struct Client


cdef struct TunnelEnd:
    int kind               # IS_TUNNEL_END
    int fd
    Client *client


cdef struct Backend:
    int kind
    int fd
    int slot               # index of its fastlb Backend in Engine.backends
    Client *client         # the client whose request it serves; NULL: idle
    Backend *next_idle
    Backend *prev_idle
    double idle_since
    # A response whose body the engine relays (the client RELAYING): what is still to come of it, and
    # what the metrics and the access log are told at its end.
    long long body_left
    long long response_bytes
    int status
    unsigned char reused   # it waited idle: closed before a byte of the next response, the keep-alive race
    unsigned char closing  # the response said Connection: close: not parked at its end


cdef struct ClientCaptures:
    # What the request in flight's headers give the pool's rules, in the same allocation behind its Client
    # only when the engine's settings have rate limit key headers, captured headers or a sticky rule
    # (Engine.captures_used): without them a client carries only the NULL pointer (issue 15).
    uint32_t key_start[MAX_KEY_HEADERS]   # the request's rate limit key headers in buf (admission)
    int32_t key_len[MAX_KEY_HEADERS]      # -1: absent
    uint32_t cap_start[MAX_CAPTURES]      # the request's captured headers in buf
    int32_t cap_len[MAX_CAPTURES]         # -1: absent
    # Sticky sessions: what the request's Cookie header means (from the engine's cache of them).
    int pin_slot                # the backend its cookie pins (-1: none)
    PyObject *session           # cookie insert: its valid, unexpired session (Sticky.pin's third), or NULL
    PyObject *learned           # learn:NAME: the session id its cookie carries (b"": none), or NULL


cdef struct ClientTls:
    # A TLS client's state, in the same allocation behind its Client (Engine.take_client): a client of a
    # plain bind carries only the NULL pointer (an idle connection's size, issue 15).
    SSL *ssl
    unsigned char alpn            # ALPN_*: what the handshake agreed on
    unsigned char short_read      # the socket BIO's last read drained the socket (_etls.pxi)
    unsigned char verifies        # the bind asks for client certificates (the subject header)
    char *tls_block               # `X-Client-Subject: ...` CRLF of a verified client certificate
    uint32_t tls_block_len
    sockaddr_storage peer         # admission control runs after the handshake, as on the Python path
    # A TLS connection handed to the Python path (TUNNEL): the socketpair end, and what waits for it.
    TunnelEnd tunnel
    char *up                      # decrypted client bytes the socketpair did not take yet
    uint32_t up_len
    uint32_t up_off
    unsigned char up_ended        # the client's end was passed on (SHUT_WR)
    unsigned char down_ended      # the Python side closed its end: close once pending is written


cdef struct Client:
    # Laid out widest first, the small fields packed at the end: its size is each idle connection's
    # (issue 15; 184 bytes, plus the address and X-Forwarded-For bytes in the same allocation).
    int kind
    int fd
    double deadline
    Client *prev
    Client *next
    Backend *backend       # serving the request in flight
    double sent_at
    # The request in flight as the metrics and the access log see it (request_size, log_request).
    double started             # when its head was read (CLOCK_MONOTONIC, as time.monotonic())
    # The request in flight: buf[0:req_len] as the client sent it (for an adoption), then
    # buf[req_len:req_len + head_len] the head for the backend, sent up to head_sent.
    char *buf
    # An answer not yet written in full.
    char *pending
    # X-Forwarded-For / -Proto for this client (HttpSettings.forward_block_for), made once.
    char *forward
    char *ip                   # the client's address as text (the hashing key `source`): in the same
                               # allocation, after forward
    ClientCaptures *caps          # NULL unless rate limit keys, captures or a sticky rule are set
    ClientTls *tls                # TLS (fastlb/http/_etls.pxi); NULL on a plain bind (but a stream's,
                                  # whose ssl is its connection's: NULL on h2c)
    void *h2                      # HTTP/2 (_eh2.pxi): a connection's H2Conn, a stream's H2Stream; else NULL
    uint32_t buf_cap
    uint32_t req_len
    uint32_t head_len
    uint32_t head_sent
    uint32_t pending_len
    uint32_t pending_off
    uint32_t forward_len
    uint32_t url_start         # the request target in buf (the hashing key `uri` / `path`)
    uint32_t url_end
    uint32_t host_start        # the Host value in buf, the method's length, the body's (routing rules)
    uint32_t host_end
    uint32_t method_len
    uint32_t body_len
    uint32_t header_size       # its header lines as the Python path counts them: name + value + 4 each
    int slot                   # its backend's index in Engine.backends (-1: none)
    int bind                   # the listener's bind (FastPath.binds index)
    unsigned char state           # WAITING..TUNNEL
    unsigned char deadline_kind   # WAIT_*
    unsigned char ip_len
    unsigned char close_after     # close once the answer is written (Connection: close, draining)
    unsigned char read_pending    # readable while busy: read once back to WAITING
    unsigned char hung_up         # the client shut its side (EPOLLRDHUP): read again after each answer
    unsigned char gone            # closed while Python was connecting for it: freed on the callback
    unsigned char counted         # in the admission table's connections per source: leave() on close


cdef struct Listener:
    int kind
    int fd                 # the engine's own duplicate of a listening socket
    int paused             # out of files: out of the epoll set until resume_accepting()
    Listener *next
    int bind               # FastPath.binds index
    SSL_CTX *ctx           # a TLS bind's front context (its ServerContext is kept in Engine.tls_contexts)
    unsigned char verifies
    double handshake_timeout


include "_etls.pxi"
include "_eh2.pxi"
include "_eh2b.pxi"


cdef struct CookieEntry:
    # One raw Cookie header and what it means to the pool's sticky rule (Sticky.cookie_facts): a
    # keep-alive client sends the same header every time, so the parse and the HMAC run once per value.
    char *key              # a copy of the header (NULL: a free entry)
    uint32_t key_len
    uint64_t hash
    PyObject *session      # insert: the signed session tuple (backend, first, last, line), or NULL
    double first, last     # its times (the maxlife / maxidle checks are per request)
    int pin_slot           # the backend the session (insert) or the cookie (prefix) names; -1: none
    PyObject *forwarded    # the Cookie header forwarded (prefix, insert+indirect), or NULL: as sent
    PyObject *learned      # learn:NAME: the session id (bytes; b"": none)


cdef struct SlotCounts:
    # A backend's request counts (observe.Observer.count_request's), added here per request and into its
    # Traffic when Python reads them (Engine.flush_counts, before every snapshot: observe.pool_snapshot).
    unsigned long long requests
    unsigned long long responses[5]    # by status class 1xx..5xx
    long long bytes_in, bytes_out
    unsigned long long latency[MAX_LATENCY_BUCKETS]   # observe.Histogram's counts (response time)
    double latency_sum
    unsigned char dirty


cdef struct HeaderRule:
    const char *name       # lower-case
    int length
    int action


cdef extern from "<time.h>" nogil:
    enum: CLOCK_REALTIME


cdef inline double wall_now() noexcept nogil:
    """time.time(): Sticky.clock, which cookie times are in."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline double monotonic_now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


# Bytes of a request target the engine accepts: visible ASCII (llhttp also refuses 0x80 and above).
# Host values: reg-name characters (RFC 3986) and ':' for a port; anything else is the Python path's.
cdef unsigned char HOST_CHAR[256]


cdef void _init_host_chars():
    cdef int c
    for c in range(256):
        HOST_CHAR[c] = 0
    for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~!$&'()*+,;=%-":
        HOST_CHAR[c] = 1


_init_host_chars()


cdef bint valid_simple_host(const unsigned char *p, Py_ssize_t n):
    """A Host the engine forwards: a non-empty reg-name or IPv4, an optional `:digits`."""
    cdef Py_ssize_t i = 0
    while i < n and HOST_CHAR[p[i]]:
        i += 1
    if i == 0:
        return False
    if i == n:
        return True
    if p[i] != 58:
        return False
    i += 1
    while i < n:
        if not 48 <= p[i] <= 57:
            return False
        i += 1
    return True


cdef object cookie_key(const unsigned char *p, Py_ssize_t n, const char *name, Py_ssize_t name_len):
    """fastlb/http/routing.py's cookie_value (the hashing key cookie:NAME) on a Cookie header, found by the
    rate limits' own scanner (fastlb/_admission.pyx cookie_value): None when absent or empty."""
    cdef const char *value
    cdef Py_ssize_t value_len
    if cookie_value(<const char *>p, n, name, name_len, &value, &value_len):
        return PyBytes_FromStringAndSize(value, value_len)
    return None


cdef inline int hex_value(unsigned char ch) noexcept:
    if 48 <= ch <= 57:
        return ch - 48
    if 97 <= ch <= 102:
        return ch - 87
    if 65 <= ch <= 70:
        return ch - 55
    return -1


cdef Py_ssize_t unquote(const unsigned char *p, Py_ssize_t n, char *out, bint plus) noexcept:
    """urllib.parse.unquote_to_bytes on p[:n] into out (after '+' -> ' ' when plus); its length."""
    cdef Py_ssize_t i = 0, size = 0
    cdef int high, low
    while i < n:
        if p[i] == 37 and i + 2 < n:                          # '%' and two hex digits
            high = hex_value(p[i + 1])
            low = hex_value(p[i + 2])
            if high >= 0 and low >= 0:
                out[size] = <char>(high * 16 + low)
                size += 1
                i += 3
                continue
        out[size] = 32 if plus and p[i] == 43 else <char>p[i]
        size += 1
        i += 1
    return size


cdef object query_key(const unsigned char *url, Py_ssize_t n, const char *name, Py_ssize_t name_len,
                      char *decoded):
    """fastlb/http/routing.py's query_value (the hashing key query:NAME) on a request target: the first
    parameter named NAME (as sent or percent-decoded), its value decoded ('+' is a space); None when
    absent or empty. decoded: room for n bytes."""
    cdef Py_ssize_t start = 0, end, eq, size
    while start < n and url[start] != 63:                     # '?'
        start += 1
    if start == n:
        return None
    start += 1
    end = start
    while end < n and url[end] != 35:                         # '#': the query ends there
        end += 1
    n = end
    while start <= n:
        end = start
        while end < n and url[end] != 38:                     # '&'
            end += 1
        eq = start
        while eq < end and url[eq] != 61:                     # '='
            eq += 1
        if (eq - start == name_len and memcmp(url + start, name, name_len) == 0) or (
                unquote(url + start, eq - start, decoded, False) == name_len
                and memcmp(decoded, name, name_len) == 0):
            size = unquote(url + eq + 1, end - eq - 1, decoded, True) if eq < end else 0
            return PyBytes_FromStringAndSize(decoded, size) if size else None
        start = end + 1
    return None


cdef inline Py_ssize_t put(char *out, Py_ssize_t at, const void *data, Py_ssize_t size) noexcept:
    """Appends size bytes at out[at]; the new end. (memmove: the header lines move within headbuf.)"""
    memmove(out + at, data, size)
    return at + size


cdef inline Py_ssize_t put_line(char *out, Py_ssize_t at, const char *name, Py_ssize_t name_size,
                                const void *value, Py_ssize_t value_size) noexcept:
    """Appends `name` `value` CRLF (name with its ': ')."""
    at = put(out, at, name, name_size)
    at = put(out, at, value, value_size)
    out[at] = 13
    out[at + 1] = 10
    return at + 2


cdef inline bint lower_equals(const unsigned char *p, Py_ssize_t n, const char *word, Py_ssize_t word_len):
    return name_is(p, n, word, word_len)


cdef class Engine:
    """One worker's engine. `glue` (fastlb/http/fast.py's FastPath) answers connect(), adopt(),
    select_sticky(), select_routed() and the rest; per request the engine calls the pools themselves
    (select, finish)."""

    cdef int epfd
    cdef object glue, loop
    # Per request the engine calls the pool itself, without a frame of fast.py's: the single pool's
    # select_now (select()), and per slot its pool's response_done (finish()); metrics (when on) are
    # counted in C per slot (SlotCounts) and added to the backends' Traffic on read (flush_counts).
    cdef object select_now, no_tries
    cdef bint counting
    cdef SlotCounts *counts
    cdef double latency_bounds[MAX_LATENCY_BUCKETS]    # observe.LATENCY_BUCKETS
    cdef int nbounds
    cdef list slot_done             # slot -> its pool's response_done
    cdef unsigned char *slot_tls    # slot -> the backend speaks TLS (FastPath._take: never the engine's)
    cdef char *scratch         # one read at a time, shared by every socket
    cdef char *headbuf         # the backend head being built
    cdef char *relay_buf       # relay_body's reads (RELAY_BYTES): a long body in few system calls
    cdef int relay_pipe[2]     # relay_body's splice between plain sockets (-1: none); empty between steps
    # Request buffers (Client.buf) of clients waiting between requests, for the next request of any
    # client: an idle keep-alive connection holds none, and a request mallocs none once warm. A list
    # linked through each buffer's first 8 bytes (its capacity in the next 4), bounded in bytes.
    cdef char *spare_bufs
    cdef size_t spare_bytes
    cdef Client *clients       # every client the engine holds (for the sweep and close_all)
    cdef Listener *listeners
    cdef bytes forward_before, forward_after    # X-Forwarded-For / -Proto around the client address
    cdef bytes tls_forward_before, tls_forward_after    # the same for TLS binds (-Proto: https)
    cdef Client *tunnels       # TLS connections handed to the Python path (adopt()): relayed here
    cdef list tls_contexts     # the ServerContexts whose SSL_CTX the listeners use (kept alive)
    cdef public unsigned long long handshake_failures
    cdef public Py_ssize_t live
    cdef public Py_ssize_t max_clients  # at this many clients the listeners rest (the worker's AcceptGate)
    cdef bint accept_paused
    cdef public bint draining
    cdef public object on_idle          # draining: called when the last client goes (HttpPath.start_draining)
    # Per backend: the fastlb Backend object (slot -> object) and its idle connections (LIFO).
    cdef list backends
    cdef dict slots
    cdef Backend **idle
    cdef int *idle_count
    cdef int slot_capacity
    cdef int slot_count          # len(backends), kept in C: __dealloc__ may run after the list is cleared
    # Settings (HttpSettings), read once.
    cdef double http_request_timeout, keepalive_timeout, response_timeout, backend_idle_timeout
    cdef Py_ssize_t max_idle, max_header_size, max_headers, max_uri_length, max_body_size
    cdef Py_ssize_t max_response_header_size
    cdef int key_kind
    cdef bint routed           # routing rules: Python routes each request (glue.select_routed)
    cdef object select_routed
    cdef bint forwarded_for
    cdef bytes request_block, response_block, timeout_408
    cdef HeaderRule *rules
    cdef int nrules
    cdef list rule_names       # keeps the rule names' bytes alive
    cdef double now
    cdef bint in_batch
    cdef Client *dead_clients
    cdef Backend *dead_backends
    # Counters (tests and the stats: how much the engine served itself).
    cdef public unsigned long long served, adopted, connects
    cdef unsigned long long handed[HAND_REASONS]     # adoptions by reason (HAND_*)
    # The features the engine serves with the Python path's semantics (set_features).
    cdef LogWriter access_log          # None: no access log
    cdef double wall_offset            # time.time() - time.monotonic(), the Observer's
    cdef list log_names                # slot -> (pool name, backend address) as bytes
    cdef tuple response_dropped        # response header names (lower-case) not forwarded
    cdef tuple hsts_dropped            # the same where HSTS applies: the backend's own line too
    cdef bint hsts_on                  # a pool sets HSTS: TLS clients' responses get its line
    cdef list slot_hsts                # slot -> its pool's Strict-Transport-Security line (b"": none)
    cdef public unsigned long long accepted    # client connections accepted since start
    # Admission control (fastlb/admission.py): the C table, checked per accept and per request without
    # Python (a 429's bytes come from Python: the limited path); the pool id of the unrouted pool.
    cdef Limiter limiter
    cdef int limit_pool
    cdef int nkeys             # key headers recorded per request (H_KEY actions)
    cdef object limited_response
    cdef bytes too_many_close
    # Hashing keys on a header, cookie or query parameter, and sticky sessions (a pool without routing
    # rules; set_captures): the captured headers' slots (-1: not captured), the key's name.
    cdef int cap_hash, cap_sticky, cap_cookie, ncaps
    cdef bint captures_used        # nkeys, ncaps or a sticky rule: clients carry a ClientCaptures
    cdef bint cookie_held          # the Cookie header is re-emitted after the others (sticky rewrites it)
    cdef bytes key_name            # cookie:NAME / query:NAME (case-sensitive)
    cdef char *decoded             # query keys: a parameter's name or value percent-decoded
    cdef object sticky             # the pool's fastlb.sticky.Sticky, or None
    cdef int sticky_kind           # its kind (0: none)
    cdef double maxidle, maxlife, refresh_after
    cdef CookieEntry *cookie_cache # COOKIE_CACHE entries (cookie kinds)
    cdef uint64_t cookie_seed
    cdef object select_sticky, store_miss, cookie_facts, cookie_line, record
    # source / learned ids: the pool's StickTable read in place (its OrderedDict of key -> [id, expires]);
    # a fresh hit is served here, anything else by Sticky.pinned_by_key (select_sticky).
    cdef object table_entries, table_touch
    cdef double touch_before            # StickTable.touch_due: less than this left before expiry
    cdef dict ident_slots               # backend id -> slot
    cdef int table_hit_slot
    cdef tuple response_watch      # response header names that send a response to the Python path
    cdef PyObject **fresh_line     # per slot: a new session's Set-Cookie line (insert) of second fresh_second
    cdef long long *fresh_second
    cdef int *attempts             # per slot: its pool's attempts per request (retries + 1)
    cdef unsigned char retry_status[600]   # --retry-on statuses
    cdef Py_ssize_t replay_limit   # a request over this many bytes (protocol.REPLAY_LIMIT) is never re-sent
    # HTTP/2 clients served here (_eh2.pxi; h2_configure): on or off, the limits (H2Settings), counts.
    cdef int h2_mode               # H2_OFF, H2_PYTHON, H2_ENGINE
    cdef int h2_max_streams, h2_initial_window, h2_connection_window
    cdef Py_ssize_t h2_max_header_list
    cdef double h2_control_burst
    cdef char *h2_request_buf     # a stream's HTTP/1.1 request head being written
    cdef Py_ssize_t h2_request_cap
    cdef public unsigned long long h2_connections, h2_unserved_streams
    cdef Client **h2_due           # HTTP/2 connections with frames to write at the end of the batch
    cdef int h2_due_count, h2_due_cap
    cdef Client *h2_spare          # ended streams' contexts kept for the next streams (h2_retire), and
    cdef Client *h2_retired        # those ended in the batch being handled (spare after it: h2_bury)
    cdef int h2_spare_count
    # HTTP/2 to backends (_eh2b.pxi): on or off, per slot, the stream dispatched at its HEADERS, the
    # connections with frames to write at the end of the batch, those closed, their write buffer.
    cdef bint h2b_on
    cdef H2bSlot *h2b_slots
    cdef int h2b_slot_cap
    cdef Client *h2b_early
    cdef H2Up **h2b_due
    cdef int h2b_due_count, h2b_due_cap
    cdef H2Up *h2b_dead
    cdef char *h2b_buf
    cdef public unsigned long long h2_backend_streams

    def __cinit__(self):
        self.epfd = -1
        self.scratch = NULL
        self.headbuf = NULL
        self.relay_buf = NULL
        self.relay_pipe[0] = self.relay_pipe[1] = -1
        self.spare_bufs = NULL
        self.spare_bytes = 0
        self.clients = NULL
        self.idle = NULL
        self.idle_count = NULL
        self.rules = NULL
        self.dead_clients = NULL
        self.dead_backends = NULL
        self.listeners = NULL
        self.tunnels = NULL
        self.cookie_cache = NULL
        self.decoded = NULL
        self.fresh_line = NULL
        self.fresh_second = NULL
        self.attempts = NULL
        self.h2_request_buf = NULL
        self.h2_due = NULL
        self.h2_spare = self.h2_retired = NULL
        self.h2_spare_count = 0
        self.h2b_slots = NULL
        self.h2b_due = NULL
        self.h2b_dead = NULL
        self.h2b_buf = NULL
        self.h2b_early = NULL
        self.slot_tls = NULL
        self.counts = NULL
        self.max_clients = 1 << 40
        self.accept_paused = False

    def __init__(self, glue, loop, settings, bint routed, Py_ssize_t max_body_size, int key_kind,
                 dict request_actions, dict action_codes, bytes timeout_408, admission=None,
                 int limit_pool=-1):
        """request_actions: HttpSettings.request_actions (lower-case name -> action); action_codes maps
        the actions the engine handles itself: {'drop': H_DROP, 'host': H_HOST, 'connection': ...}."""
        cdef int i = 0, bucket
        cdef bytes name
        self.glue = glue
        self.loop = loop
        h2b_configure(self, glue)
        self.select_now = glue.pool.select_now if glue.pool is not None else None
        self.no_tries = glue.no_tries
        self.counting = glue.observer is not None
        from fastlb.observe import LATENCY_BUCKETS
        if len(LATENCY_BUCKETS) >= MAX_LATENCY_BUCKETS:
            raise ValueError("observe.LATENCY_BUCKETS has more buckets than the engine counts")
        self.nbounds = len(LATENCY_BUCKETS)
        for bucket, bound in enumerate(LATENCY_BUCKETS):
            self.latency_bounds[bucket] = bound
        self.slot_done = []
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1")
        self.scratch = <char *>malloc(SCRATCH)
        self.headbuf = <char *>malloc(SCRATCH)
        self.relay_buf = <char *>malloc(RELAY_BYTES)
        if self.scratch == NULL or self.headbuf == NULL or self.relay_buf == NULL:
            raise MemoryError()
        if pipe2(self.relay_pipe, O_NONBLOCK | O_CLOEXEC) == 0:
            fcntl(self.relay_pipe[1], F_SETPIPE_SZ, <int>RELAY_BYTES)     # (else 64 KiB a step)
        else:
            self.relay_pipe[0] = self.relay_pipe[1] = -1                   # read and send, then
        self.backends = []
        self.slots = {}
        self.slot_hsts = []
        self.http_request_timeout = settings.http_request_timeout
        self.keepalive_timeout = settings.keepalive_timeout
        self.response_timeout = settings.response_timeout
        self.backend_idle_timeout = settings.backend_idle_timeout
        self.max_idle = settings.backend_max_idle
        self.max_header_size = settings.max_header_size
        self.max_response_header_size = settings.max_response_header_size
        self.max_headers = settings.max_headers
        self.max_uri_length = settings.max_uri_length
        self.max_body_size = max_body_size
        self.key_kind = key_kind
        self.routed = routed
        self.select_routed = glue.select_routed
        self.forwarded_for = settings.forwarded_for
        self.request_block = settings.request_block
        self.response_block = settings.response_block
        self.timeout_408 = timeout_408
        # forward_block_for(address, "http") with a marker for the address (b"": forwarding off).
        self.forward_before, _, self.forward_after = settings.forward_block_for(b"\x00", b"http").partition(b"\x00")
        self.tls_forward_before, _, self.tls_forward_after = (
            settings.forward_block_for(b"\x00", b"https").partition(b"\x00"))
        self.tls_contexts = []
        self.rule_names = []
        key_headers = admission.engine_headers if admission is not None else []
        captures = self.set_captures(glue, action_codes, request_actions)
        self.rules = <HeaderRule *>malloc(sizeof(HeaderRule) * (len(request_actions) + len(key_headers)
                                                                + len(captures) + 1))
        if self.rules == NULL:
            raise MemoryError()
        for name, action in request_actions.items():
            self.rule_names.append(name)
            self.rules[i].name = <const char *>PyBytes_AS_STRING(name)
            self.rules[i].length = len(name)
            if name in captures:                  # Cookie, held back (fast.py: no other name is both)
                self.rules[i].action = H_CAPTURE + captures.pop(name)
            elif action == action_codes["drop"]:
                self.rules[i].action = H_SKIP
            elif action == action_codes["host"]:
                self.rules[i].action = H_IS_HOST
            elif action == action_codes["connection"]:
                self.rules[i].action = H_IS_CONNECTION
            elif action == action_codes["content-length"]:
                self.rules[i].action = H_IS_LENGTH
            else:
                self.rules[i].action = H_ADOPT
            i += 1
        for slot, name in enumerate(key_headers):      # fast.py: none of them is in request_actions
            self.rule_names.append(name)
            self.rules[i].name = <const char *>PyBytes_AS_STRING(name)
            self.rules[i].length = len(name)
            self.rules[i].action = H_KEY + slot
            i += 1
        for name, slot in captures.items():
            self.rule_names.append(name)
            self.rules[i].name = <const char *>PyBytes_AS_STRING(name)
            self.rules[i].length = len(name)
            self.rules[i].action = H_CAPTURE + slot
            i += 1
        self.nkeys = len(key_headers)
        self.captures_used = self.nkeys > 0 or self.ncaps > 0 or self.sticky_kind != STICKY_NONE
        self.nrules = i
        self.now = monotonic_now()
        self.set_features(glue, settings)
        h2_configure(self, glue)
        if admission is not None:
            self.limiter = admission.limiter
            self.limit_pool = limit_pool
            self.limited_response = admission.limited_response
            self.too_many_close = admission.limited_response(1.0, True)

    cdef set_features(self, glue, settings):
        """The access log (glue.access_log: observe.AccessLog's C writer, or None) and the response
        header rules (HttpSettings.response_dropped; the blocks to add are response_block)."""
        self.access_log = glue.access_log
        self.wall_offset = glue.wall_offset
        self.log_names = []
        self.response_dropped = settings.response_dropped
        self.response_watch = settings.response_watch
        self.hsts_dropped = settings.hsts_dropped
        self.hsts_on = glue.hsts_on
        for status in settings.retry_statuses:
            if 0 <= status < 600:
                self.retry_status[status] = 1
        self.replay_limit = glue.replay_limit

    cdef dict set_captures(self, glue, dict action_codes, dict request_actions):
        """The headers a pool without routing rules needs kept (its hashing key's header, its sticky
        rule's header or Cookie) -> capture slot; and the sticky rule's settings (glue.sticky: the
        pool's fastlb.sticky.Sticky, or None). fast.py checks the engine may serve the rest."""
        cdef dict captures = {}
        route = glue.route
        sticky = self.sticky = glue.sticky
        self.cap_hash = self.cap_sticky = self.cap_cookie = -1
        self.key_name = b""
        self.cookie_held = request_actions.get(b"cookie") == action_codes["cookie"]
        if route is not None and self.key_kind == KEY_HEADER:
            self.cap_hash = captures.setdefault(route.key_name, len(captures))
        elif route is not None and self.key_kind in (KEY_COOKIE, KEY_QUERY):
            self.key_name = route.key_name
            if self.key_kind == KEY_COOKIE:
                self.cap_cookie = captures.setdefault(b"cookie", len(captures))
        self.sticky_kind = sticky.kind if sticky is not None else STICKY_NONE
        if sticky is not None:
            self.maxidle = sticky.maxidle or 0.0
            self.maxlife = sticky.maxlife or 0.0
            self.refresh_after = sticky.refresh_after
            if self.sticky_kind == STICKY_LEARN_HEADER:
                self.cap_sticky = captures.setdefault(sticky.lname, len(captures))
            elif self.sticky_kind != STICKY_SOURCE:
                self.cap_cookie = captures.setdefault(b"cookie", len(captures))
                self.cookie_cache = <CookieEntry *>calloc(COOKIE_CACHE, sizeof(CookieEntry))
                if self.cookie_cache == NULL:
                    raise MemoryError()
                self.cookie_seed = <uint64_t>int.from_bytes(urandom(8), "little")
            self.select_sticky = glue.select_sticky
            self.record = sticky.record
            if sticky.table is not None:
                self.table_entries = sticky.table.entries
                self.table_touch = sticky.table.entries.move_to_end
                self.touch_before = sticky.table.ttl * 0.75
                self.ident_slots = {ident: self.slot_of(backend) for ident, backend in sticky.by_id.items()}
            self.store_miss = glue.STORE_MISS
            self.cookie_facts = sticky.cookie_facts
            self.cookie_line = sticky.response_block
        if self.cookie_held:
            self.cap_cookie = captures.setdefault(b"cookie", len(captures))
        if self.key_kind == KEY_QUERY:
            self.decoded = <char *>malloc(SCRATCH)
            if self.decoded == NULL:
                raise MemoryError()
        self.ncaps = len(captures)
        return captures

    cdef inline long long request_size(self, Client *c) noexcept:
        """The request's bytes to the backend as both paths count them (protocol.py's out_size: an
        estimate of the head, plus the body)."""
        return (c.header_size + (c.url_end - c.url_start) + c.method_len + len(self.request_block)
                + 512 + c.body_len)

    cdef void log_request(self, Client *c, int slot, bytes pool, int status, long long bytes_in,
                          long long bytes_out, double connect_seconds):
        """The request's access-log line (observe.Observer.http_request's fields); slot -1: no backend
        answered (then pool names the pool)."""
        cdef bytes address = b"-"
        cdef double now = monotonic_now()
        while len(self.log_names) < len(self.backends):
            self.log_names.append(self.glue.log_names(self.backends[len(self.log_names)]))
        if slot >= 0:
            pool, address = self.log_names[slot]
        self.access_log.line(self.wall_offset + c.started, c.ip, c.ip_len, pool, len(pool), address,
                             len(address), status, NULL, 0, bytes_in, bytes_out, connect_seconds,
                             now - c.started, c.buf, c.method_len, c.buf + c.url_start,
                             c.url_end - c.url_start)

    def __dealloc__(self):
        cdef Py_ssize_t i
        cdef char *spare
        if self.epfd >= 0:
            close(self.epfd)
        free(self.scratch)
        free(self.headbuf)
        free(self.relay_buf)
        if self.relay_pipe[0] >= 0:
            close(self.relay_pipe[0])
            close(self.relay_pipe[1])
        while self.spare_bufs != NULL:
            spare = self.spare_bufs
            self.spare_bufs = (<char **>spare)[0]
            free(spare)
        free(self.rules)
        free(self.idle)
        free(self.idle_count)
        free(self.attempts)
        free(self.slot_tls)
        free(self.counts)
        free(self.decoded)
        free(self.h2_request_buf)
        free(self.h2_due)
        h2_free_spares(self)
        free(self.h2b_slots)
        free(self.h2b_due)
        free(self.h2b_buf)
        if self.fresh_line != NULL:
            for i in range(self.slot_count):
                Py_XDECREF(self.fresh_line[i])
        free(self.fresh_line)
        free(self.fresh_second)
        if self.cookie_cache != NULL:
            for i in range(COOKIE_CACHE):
                self.forget_cookie(&self.cookie_cache[i])
        free(self.cookie_cache)

    @property
    def fileno(self):
        return self.epfd

    def handed_over(self):
        """Connections handed to the Python path since start, by reason (HANDED_REASONS)."""
        return {name: self.handed[i] for i, name in enumerate(HANDED_REASONS)}

    # ---- clients in and out ------------------------------------------------------------------------

    def listen(self, int fd, int bind=0, tls=None, double handshake_timeout=0.0):
        """Accepts on a listening socket from now on (fd: the engine's own duplicate, closed by it); bind:
        its FastPath.binds index; tls: a TLS bind's fastlb._crelay.ServerContext (ServerTLS.native),
        whose handshakes must end within handshake_timeout."""
        cdef Listener *l = <Listener *>malloc(sizeof(Listener))
        cdef epoll_event ev
        if l == NULL:
            close(fd)
            raise MemoryError()
        l.kind = IS_LISTENER
        l.fd = fd
        l.paused = 0
        l.bind = bind
        l.ctx = NULL
        l.verifies = 0
        l.handshake_timeout = handshake_timeout
        if tls is not None:
            self.tls_contexts.append(tls)
            l.ctx = <SSL_CTX *><uintptr_t>tls.front_address()
            l.verifies = tls.verifies
        l.next = self.listeners
        self.listeners = l
        # Level-triggered; EXCLUSIVE: of the workers sharing the socket, one is woken per connection.
        ev.events = EPOLLIN | EPOLLEXCLUSIVE
        ev.data.ptr = <void *>l
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl")

    def stop_listening(self):
        """No new connection (draining): the listening sockets' duplicates are closed."""
        cdef Listener *l
        while self.listeners != NULL:
            l = self.listeners
            self.listeners = l.next
            self.forget(l.fd)
            l.kind = IS_FREED
            free(l)

    cdef void on_listener_ready(self, Listener *l):
        cdef sockaddr_storage address
        cdef socklen_t length
        cdef int fd, i, verdict, one = 1
        cdef char ip[64]
        for i in range(64):             # a bounded batch: the other sockets get their turn
            if self.live >= self.max_clients:
                self.pause_accepting(0)
                return
            length = sizeof(address)
            fd = accept4(l.fd, <sockaddr *>&address, &length, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                    self.pause_accepting(errno)
                return                  # EAGAIN (another worker was faster), or an error to retry later
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
            ip[0] = 0
            if address.ss_family == AF_INET:
                inet_ntop(AF_INET, &(<sockaddr_in *>&address).sin_addr, ip, sizeof(ip))
            elif address.ss_family == AF_INET6:
                inet_ntop(AF_INET6, &(<sockaddr_in6 *>&address).sin6_addr, ip, sizeof(ip))
            if self.limiter is not None and l.ctx == NULL:     # TLS: after the handshake (handshake())
                verdict = self.limiter.admit_address(<sockaddr *>&address, ip, strlen(ip))
                if verdict != ADMIT:
                    if verdict != DENIED:       # over the connections per source: 429, then closed
                        send(fd, PyBytes_AS_STRING(self.too_many_close), len(self.too_many_close),
                             MSG_NOSIGNAL)
                    close(fd)
                    continue
            self.take_client(fd, ip, strlen(ip), l, &address)

    cdef void pause_accepting(self, int err):
        """At max_clients, or out of files (err): the listeners are level-triggered, so they would wake
        the loop for a failing accept4 at once, for ever. They leave the epoll set; connections wait in
        the backlog until Python calls resume_accepting() (fastlb/l4.py's AcceptGate, shortly after)."""
        cdef Listener *l = self.listeners
        if self.accept_paused:
            return
        self.accept_paused = True
        while l != NULL:
            if not l.paused:
                l.paused = 1
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, l.fd, NULL)
            l = l.next
        self.glue.accept_paused(err)

    def resume_accepting(self):
        """Listeners paused by pause_accepting() accept again (a failing accept pauses them again)."""
        cdef Listener *l = self.listeners
        cdef epoll_event ev
        self.accept_paused = False
        while l != NULL:
            if l.paused:
                l.paused = 0
                ev.events = EPOLLIN | EPOLLEXCLUSIVE
                ev.data.ptr = <void *>l
                epoll_ctl(self.epfd, EPOLL_CTL_ADD, l.fd, &ev)
            l = l.next

    cdef void take_client(self, int fd, const char *ip, Py_ssize_t ip_len, Listener *l,
                          sockaddr_storage *address):
        """A new client socket (the engine owns fd from now on); on a TLS bind its handshake starts."""
        cdef bytes forward_before = self.tls_forward_before if l.ctx != NULL else self.forward_before
        cdef bytes forward_after = self.tls_forward_after if l.ctx != NULL else self.forward_after
        cdef Py_ssize_t before = len(forward_before), after = len(forward_after)
        cdef uint32_t forward_len = <uint32_t>(before + ip_len + after) if before else 0
        # One allocation: the Client, its ClientTls on a TLS bind, its ClientCaptures where the settings
        # use them, its X-Forwarded-For / -Proto bytes.
        cdef size_t captures_at = sizeof(Client) + (sizeof(ClientTls) if l.ctx != NULL else 0)
        cdef size_t forward_at = captures_at + (sizeof(ClientCaptures) if self.captures_used else 0)
        cdef Client *c
        ip_len = min(ip_len, MAX_IP_TEXT)
        c = <Client *>malloc(forward_at + forward_len + ip_len)
        if c == NULL:
            close(fd)
            return
        c.caps = NULL
        if self.captures_used:
            c.caps = <ClientCaptures *>(<char *>c + captures_at)
            c.caps.session = c.caps.learned = NULL
            c.caps.pin_slot = -1
        c.tls = NULL
        if l.ctx != NULL:
            c.tls = <ClientTls *>(c + 1)
            c.tls.ssl = NULL
            c.tls.alpn = ALPN_NONE
            c.tls.verifies = l.verifies
            c.tls.tls_block = NULL
            c.tls.tls_block_len = 0
            c.tls.tunnel.kind = IS_FREED
            c.tls.tunnel.fd = -1
            c.tls.tunnel.client = c
            c.tls.up = NULL
            c.tls.up_len = c.tls.up_off = 0
            c.tls.up_ended = c.tls.down_ended = 0
        c.bind = l.bind
        c.h2 = NULL
        c.kind = IS_CLIENT
        c.fd = fd
        c.state = WAITING
        c.backend = NULL
        c.slot = -1
        c.buf = NULL
        c.buf_cap = 0
        c.req_len = c.head_len = c.head_sent = 0
        c.pending = NULL
        c.pending_len = c.pending_off = 0
        # X-Forwarded-For / -Proto: HttpSettings.forward_block_for's bytes around the address.
        c.forward_len = forward_len
        c.forward = <char *>c + forward_at
        if before:
            memcpy(c.forward, PyBytes_AS_STRING(forward_before), before)
            memcpy(c.forward + before, ip, ip_len)
            memcpy(c.forward + before + ip_len, PyBytes_AS_STRING(forward_after), after)
        c.close_after = c.read_pending = c.hung_up = c.gone = 0
        c.counted = self.limiter is not None and l.ctx == NULL
        c.ip_len = <unsigned char>ip_len
        c.ip = c.forward + forward_len
        memcpy(c.ip, ip, ip_len)
        c.deadline = self.now + self.http_request_timeout
        c.deadline_kind = WAIT_HEAD
        c.prev = NULL
        c.next = self.clients
        if self.clients != NULL:
            self.clients.prev = c
        self.clients = c
        self.live += 1
        self.accepted += 1
        if l.ctx != NULL:
            c.tls.peer = address[0]
            c.state = HANDSHAKE
            c.deadline = self.now + l.handshake_timeout
            c.deadline_kind = WAIT_HANDSHAKE
            if not tls_prepare(c, l.ctx, fd):
                self.close_client(c)
                return
        if not self.watch(fd, c):
            self.close_client(c)
            return
        # Bytes may have arrived before the registration: the edge for them is already gone.
        if c.state == HANDSHAKE:
            self.handshake(c)
        else:
            self.on_client_readable(c)

    cdef void handshake(self, Client *c):
        """One step of a TLS client's handshake; done, the connection is a client like any other (its
        first request within http_request_timeout, as the Python path's connection_made sets)."""
        cdef int r = SSL_do_handshake(c.tls.ssl)
        cdef int err, verdict
        cdef bytes block
        cdef object subject
        if r != 1:
            err = SSL_get_error(c.tls.ssl, r)
            if err == SSL_ERROR_WANT_READ or err == SSL_ERROR_WANT_WRITE:
                return                  # edge-triggered both ways: the next event resumes it
            ERR_clear_error()
            self.handshake_failures += 1
            self.close_client(c)
            return
        c.tls.alpn = alpn_of(c.tls.ssl)
        if c.tls.verifies:
            subject = peer_subject(c.tls.ssl)
            if subject is not None:
                block = self.glue.subject_block(subject)
                c.tls.tls_block = <char *>malloc(len(block))
                if c.tls.tls_block == NULL:
                    self.close_client(c)
                    return
                memcpy(c.tls.tls_block, PyBytes_AS_STRING(block), len(block))
                c.tls.tls_block_len = <uint32_t>len(block)
        c.state = WAITING
        c.deadline = self.now + self.http_request_timeout
        c.deadline_kind = WAIT_HEAD
        if self.limiter is not None:
            verdict = self.limiter.admit_address(<sockaddr *>&c.tls.peer, c.ip, c.ip_len)
            if verdict != ADMIT:
                if verdict != DENIED:           # over the connections per source: 429, then closed
                    client_send(c, PyBytes_AS_STRING(self.too_many_close), len(self.too_many_close))
                self.close_client(c)
                return
            c.counted = 1
        if c.tls.alpn == ALPN_H2:
            if self.h2_mode == H2_ENGINE and h2_start(self, c):
                h2_flush(self, c)           # the server's SETTINGS first
                if c.kind == IS_CLIENT:
                    h2_readable(self, c)
                return
            # HTTP/2 (fastlb/http2/connection.py) over the tunnel from its first byte; the Python side is
            # told ALPN's choice, which its end of the socketpair cannot tell.
            self.adopt(c, NULL, 0, HAND_H2)
            return
        self.on_client_readable(c)

    cdef void unlink(self, Client *c):
        if c.prev != NULL:
            c.prev.next = c.next
        else:
            self.clients = c.next
        if c.next != NULL:
            c.next.prev = c.prev
        c.prev = c.next = NULL
        self.live -= 1
        if self.live == 0 and self.on_idle is not None:
            self.on_idle()

    cdef void free_client(self, Client *c):
        """Frees c now, or after the batch of events being handled (one of them may still name it)."""
        if c.kind == IS_STREAM:
            h2_retire(self, c)          # kept for the next stream (_eh2.pxi)
            return
        free(c.buf)
        free(c.pending)
        c.buf = c.pending = NULL
        if c.tls != NULL:
            free(c.tls.tls_block)
            free(c.tls.up)
            c.tls.tls_block = c.tls.up = NULL
            c.tls.tunnel.kind = IS_FREED
        if c.caps != NULL:
            Py_XDECREF(c.caps.session)
            Py_XDECREF(c.caps.learned)
            c.caps.session = c.caps.learned = NULL
        c.kind = IS_FREED
        if self.in_batch:
            c.next = self.dead_clients
            self.dead_clients = c
        else:
            free(c)

    cdef void free_backend(self, Backend *b):
        b.kind = IS_FREED
        if self.in_batch:
            b.next_idle = self.dead_backends
            self.dead_backends = b
        else:
            free(b)

    cdef void bury(self):
        cdef Client *c
        cdef Backend *b
        if self.h2_retired != NULL:
            h2_bury(self)
        while self.dead_clients != NULL:
            c = self.dead_clients
            self.dead_clients = c.next
            free(c)
        while self.dead_backends != NULL:
            b = self.dead_backends
            self.dead_backends = b.next_idle
            free(b)

    cdef void close_client(self, Client *c):
        """Ends a client connection the engine holds (whatever its state)."""
        cdef Backend *b = c.backend
        cdef object backend
        if b != NULL and c.state == RELAYING:
            self.end_relay(c, False)     # (which comes back here with no backend)
            return
        if c.h2 != NULL:
            h2_end(self, c)
        self.unlink(c)
        tls_end(c, c.state != HANDSHAKE)
        close(c.fd)            # accepted by the engine, no duplicate: closing takes it out of the epoll set
        c.fd = -1
        if c.counted:
            c.counted = 0
            self.limiter.leave(c.ip, c.ip_len)
        if b != NULL:
            # Mid-request: the backend connection is out of step; its slot goes back (as abandon() does).
            c.backend = NULL
            self.close_backend(b)
            backend = self.backends[c.slot]
            self.finish(c.slot, self.now - c.sent_at, True, 0, self.request_size(c), 0)
        if c.state == CONNECTING:
            c.gone = 1             # Python holds its address until connected() / connect_failed()
        else:
            self.free_client(c)

    cdef void close_backend(self, Backend *b):
        self.forget(b.fd)
        self.free_backend(b)

    cdef bint watch(self, int fd, void *owner):
        """Adds a socket to the epoll set, once for its life: edge-triggered, both directions."""
        cdef epoll_event ev
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.ptr = owner
        return epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) == 0

    cdef void forget(self, int fd):
        """Closes a socket of the epoll set. Removed first: the socket may be a dup whose original
        uvloop has not closed yet, and epoll forgets a socket only when its last descriptor closes."""
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)
        close(fd)

    cdef void adopt(self, Client *c, const char *data, Py_ssize_t size, int reason, bint limits_checked=False):
        """Hands the client (and the backend connection of its request in flight, if any) to the Python
        path with `data`: bytes read from the client (no request in flight) or from the backend (with
        one); reason: HAND_*, counted. The sockets leave the epoll set first: uvloop registers them in
        its own. limits_checked: the request was counted by the rate limits here (always so for one in
        flight): the Python path does not count it again."""
        cdef Backend *b = c.backend
        cdef object inflight = None
        cdef object tls = None
        cdef int fd = c.fd
        cdef int pair[2]
        cdef bint tunneled
        if c.kind == IS_STREAM:
            h2_handed(self, c, data, size, reason, limits_checked)
            return
        if c.tls != NULL:
            # The SSL state cannot leave: the engine keeps the connection and relays the decrypted bytes
            # over a socketpair whose other end the Python path takes as if it were the client's socket.
            if socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, pair) < 0:
                self.close_client(c)
                return
            fd = pair[1]
            tls = (c.bind, PyBytes_FromStringAndSize(c.ip, c.ip_len),
                   PyBytes_FromStringAndSize(c.tls.tls_block, c.tls.tls_block_len) if c.tls.tls_block_len else b"",
                   c.tls.alpn == ALPN_H2, False)
        self.unlink(c)
        if c.tls == NULL:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)
        if b != NULL:
            limits_checked = self.limiter is not None      # the request in flight passed them already
            inflight = self.inflight(c, data, size)
            data = NULL
            size = 0
        pending = PyBytes_FromStringAndSize(data, size) if size else b""
        tunneled = c.tls != NULL and self.start_tunnel(c, pair[0])
        if c.tls == NULL:
            self.free_client(c)
        self.adopted += 1
        self.handed[reason] += 1
        self.glue.adopt(fd, pending, inflight, limits_checked, tls)
        if tunneled:
            self.pump(c)            # records OpenSSL holds already: no edge will announce them

    cdef object inflight(self, Client *c, const char *data, Py_ssize_t size):
        """adopt()'s request in flight, for the Python path: its backend connection leaves the epoll set
        (and the engine) with how much of the request reached it: all of it, part, or nothing (a send
        failed); data: what was read of the response."""
        cdef Backend *b = c.backend
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, b.fd, NULL)
        inflight = (self.backends[c.slot], b.fd,
                    PyBytes_FromStringAndSize(c.buf, c.req_len),
                    PyBytes_FromStringAndSize(data, size), c.sent_at,
                    c.head_sent == c.head_len, c.head_sent > 0, bool(b.reused))
        self.free_backend(b)
        c.backend = NULL
        return inflight

    # ---- TLS connections the Python path serves: the tunnel ----------------------------------------

    cdef bint start_tunnel(self, Client *c, int fd):
        """c (unlinked from the clients) relays between its TLS client and the socketpair end fd; the
        Python path counts the connection (admission too) from now on. False: it could not (closed)."""
        free(c.buf)
        free(c.pending)
        c.buf = c.pending = NULL
        c.buf_cap = c.pending_len = c.pending_off = 0
        c.state = TUNNEL
        c.counted = 0
        c.deadline_kind = WAIT_NONE
        c.tls.tunnel.kind = IS_TUNNEL_END
        c.tls.tunnel.fd = fd
        c.prev = NULL
        c.next = self.tunnels
        if self.tunnels != NULL:
            self.tunnels.prev = c
        self.tunnels = c
        if not self.watch(fd, &c.tls.tunnel):
            self.end_tunnel(c, False)
            return False
        return True

    cdef void end_tunnel(self, Client *c, bint clean):
        if c.prev != NULL:
            c.prev.next = c.next
        else:
            self.tunnels = c.next
        if c.next != NULL:
            c.next.prev = c.prev
        c.prev = c.next = NULL
        tls_end(c, clean)
        close(c.fd)
        c.fd = -1
        self.forget(c.tls.tunnel.fd)
        c.tls.tunnel.fd = -1
        self.free_client(c)

    cdef void pump(self, Client *c):
        """Any event on a tunnel's sockets: the Python side's bytes to the client, then the client's to
        the Python side, each until a socket would block (edge-triggered)."""
        if c.kind == IS_STREAM:
            h2_from_python(self, c)         # an HTTP/2 stream the Python path serves (_eh2.pxi)
            return
        if self.pump_down(c):
            self.pump_up(c)

    cdef bint pump_down(self, Client *c):
        """Python side -> client; False when the tunnel ended."""
        cdef ssize_t n, w
        while True:
            while c.pending != NULL:
                w = client_send(c, c.pending + c.pending_off, c.pending_len - c.pending_off)
                if w == FAILED:
                    self.end_tunnel(c, False)
                    return False
                if w == 0:
                    return True
                c.pending_off += <uint32_t>w
                if c.pending_off == c.pending_len:
                    free(c.pending)
                    c.pending = NULL
                    c.pending_len = c.pending_off = 0
            if c.tls.down_ended:
                self.end_tunnel(c, True)
                return False
            n = recv(c.tls.tunnel.fd, self.scratch, SCRATCH, 0)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    return True
                self.end_tunnel(c, False)
                return False
            if n == 0:
                # The Python side closed: what it wrote goes out first, within the keep-alive timeout.
                c.tls.down_ended = 1
                c.deadline = self.now + self.keepalive_timeout
                c.deadline_kind = WAIT_TUNNEL_FLUSH
                continue
            w = client_send(c, self.scratch, n)
            if w == FAILED:
                self.end_tunnel(c, False)
                return False
            if w < n:
                c.pending = <char *>malloc(n - w)
                if c.pending == NULL:
                    self.end_tunnel(c, False)
                    return False
                memcpy(c.pending, self.scratch + w, n - w)
                c.pending_len = <uint32_t>(n - w)
                c.pending_off = 0
                return True

    cdef void pump_up(self, Client *c):
        """Client -> Python side."""
        cdef ssize_t n, w
        while True:
            while c.tls.up != NULL:
                w = send(c.tls.tunnel.fd, c.tls.up + c.tls.up_off, c.tls.up_len - c.tls.up_off, MSG_NOSIGNAL)
                if w < 0:
                    if errno == EINTR:
                        continue
                    if errno != EAGAIN:
                        self.end_tunnel(c, False)
                    return
                c.tls.up_off += <uint32_t>w
                if c.tls.up_off == c.tls.up_len:
                    free(c.tls.up)
                    c.tls.up = NULL
                    c.tls.up_len = c.tls.up_off = 0
            if c.tls.up_ended:
                return
            n = client_recv(c, self.scratch, SCRATCH)
            if n == WOULD_BLOCK:
                return
            if n == 0 or n == FAILED:
                # The client's end: the Python side reads its EOF (and closes, which ends the tunnel).
                c.tls.up_ended = 1
                shutdown(c.tls.tunnel.fd, SHUT_WR)
                return
            while True:
                w = send(c.tls.tunnel.fd, self.scratch, n, MSG_NOSIGNAL)
                if w >= 0 or errno != EINTR:
                    break
            if w < 0:
                if errno != EAGAIN:
                    self.end_tunnel(c, False)
                    return
                w = 0
            if w < n:
                c.tls.up = <char *>malloc(n - w)
                if c.tls.up == NULL:
                    self.end_tunnel(c, False)
                    return
                memcpy(c.tls.up, self.scratch + w, n - w)
                c.tls.up_len = <uint32_t>(n - w)
                c.tls.up_off = 0
                return

    # ---- events ------------------------------------------------------------------------------------

    def on_ready(self):
        """uvloop's reader callback for the epoll set: every ready socket, in batches."""
        self.in_batch = True
        try:
            self.handle_events()
            if self.h2_due_count:
                h2_flush_due(self)
            if self.h2b_due_count or self.h2b_dead != NULL:
                h2b_flush_due(self)         # HTTP/2 to backends (_eh2b.pxi)
        finally:
            self.in_batch = False
            self.h2_due_count = 0
            self.bury()

    cdef void handle_events(self):
        cdef epoll_event events[MAX_EVENTS]
        cdef int n, i, kind
        cdef uint32_t ev
        cdef Client *c
        cdef Backend *b
        while True:
            n = epoll_wait(self.epfd, events, MAX_EVENTS, 0)
            if n <= 0:
                if n < 0 and errno == EINTR:
                    continue
                return
            self.now = monotonic_now()
            for i in range(n):
                ev = events[i].events
                kind = (<Client *>events[i].data.ptr).kind
                if kind == IS_FREED:
                    continue                # closed or adopted earlier in this batch
                if kind == IS_LISTENER:
                    self.on_listener_ready(<Listener *>events[i].data.ptr)
                elif kind == IS_TUNNEL_END:
                    self.pump((<TunnelEnd *>events[i].data.ptr).client)
                elif kind == IS_H2_UPSTREAM:
                    h2b_event(self, <H2Up *>events[i].data.ptr, ev)     # _eh2b.pxi
                elif kind == IS_CLIENT:
                    c = <Client *>events[i].data.ptr
                    if c.state == HANDSHAKE:
                        self.handshake(c)
                        continue
                    if c.state == TUNNEL:
                        self.pump(c)
                        continue
                    if c.h2 != NULL:
                        h2_event(self, c, ev)
                        continue
                    if ev & (EPOLLRDHUP | EPOLLHUP):
                        c.hung_up = 1           # no further edge will say so: checked after each answer
                    # (TLS: a write may wait for a read, so any event retries it)
                    if (c.state == WRITING or c.state == RELAYING) and (ev & EPOLLOUT or c.tls != NULL):
                        self.flush_client(c)
                    # (each step may have closed or handed over c: its kind says so)
                    if c.kind == IS_CLIENT and ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                        self.on_client_readable(c)
                else:
                    b = <Backend *>events[i].data.ptr
                    if ev & EPOLLOUT and b.client != NULL and b.client.head_sent < b.client.head_len:
                        self.send_head(b.client)
                    if b.kind == IS_BACKEND and ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                        self.on_backend_readable(b)
            if n < MAX_EVENTS:
                return

    cdef void on_client_readable(self, Client *c):
        cdef ssize_t n
        if c.state == TUNNEL:
            self.pump(c)
            return
        if c.h2 != NULL:
            h2_readable(self, c)
            return
        if c.state != WAITING:
            c.read_pending = 1      # read once the request in flight is answered
            return
        c.read_pending = 0
        n = client_recv(c, self.scratch, SCRATCH)
        if n == WOULD_BLOCK:
            return
        if n <= 0:
            self.close_client(c)
            return
        if self.scratch[0] == 80 and h2_preface(self, c, n):      # 'P': maybe HTTP/2's preface
            return
        if n == SCRATCH or not self.parse_request(c, <const unsigned char *>self.scratch, n):
            self.adopt(c, self.scratch, n, HAND_REQUEST)
            return
        self.dispatch(c)

    # ---- requests ----------------------------------------------------------------------------------

    cdef int header_action(self, const unsigned char *name, Py_ssize_t n):
        cdef int i
        for i in range(self.nrules):
            if self.rules[i].length == n and lower_equals(name, n, self.rules[i].name, n):
                return self.rules[i].action
        return H_FORWARD

    cdef bint reserve(self, Client *c, Py_ssize_t size):
        cdef char *grown
        if c.buf == NULL and self.spare_bufs != NULL:
            c.buf = self.spare_bufs
            self.spare_bufs = (<char **>c.buf)[0]
            c.buf_cap = (<uint32_t *>(c.buf + sizeof(char *)))[0]
            self.spare_bytes -= c.buf_cap
        if size <= c.buf_cap:
            return True
        grown = <char *>realloc(c.buf, size)
        if grown == NULL:
            return False
        c.buf = grown
        c.buf_cap = <uint32_t>size
        return True

    cdef bint parse_request(self, Client *c, const unsigned char *p, Py_ssize_t n):
        """A request the engine serves: the head alone, whole, in p[:n]. Then c.buf holds the client's
        bytes followed by the head for the backend, and True. False for anything else (nothing kept)."""
        cdef Py_ssize_t pos = 0, method_end, url_start, url_end, name_start, name_end, value_start, i
        cdef Py_ssize_t host_start = -1, host_end = -1, header_size = 0, header_count = 0
        cdef char *h = self.headbuf
        cdef Py_ssize_t hlen = 0
        cdef int action
        cdef bint close_after = False
        cdef Py_ssize_t length_start = -1, length_end = -1, length = 0, body_start
        cdef char *lines = h + SCRATCH // 2     # header lines, moved behind the Host line at the end
        cdef Py_ssize_t lines_len = 0
        cdef uint32_t key_start[MAX_KEY_HEADERS]
        cdef int32_t key_len[MAX_KEY_HEADERS]
        cdef uint32_t cap_start[MAX_CAPTURES]
        cdef int32_t cap_len[MAX_CAPTURES]
        cdef CookieEntry *cookie = NULL
        cdef object forwarded
        for i in range(self.nkeys):
            key_len[i] = -1
        for i in range(self.ncaps):
            cap_len[i] = -1
        if n > MAX_FAST_HEAD or (c.forward_len + len(self.request_block)
                                 + (c.tls.tls_block_len if c.tls != NULL else 0) > MAX_FAST_HEAD):
            return False                                    # keeps every part below within headbuf
        # Request line: a common method, an origin-form target, HTTP/1.1.
        if n >= 4 and memcmp(p, b"GET ", 4) == 0:
            method_end = 3
        elif n >= 5 and memcmp(p, b"POST ", 5) == 0:
            method_end = 4
        elif n >= 4 and memcmp(p, b"PUT ", 4) == 0:
            method_end = 3
        elif n >= 6 and memcmp(p, b"PATCH ", 6) == 0:
            method_end = 5
        elif n >= 7 and memcmp(p, b"DELETE ", 7) == 0:
            method_end = 6
        elif n >= 8 and memcmp(p, b"OPTIONS ", 8) == 0:
            method_end = 7
        else:
            return False
        url_start = pos = method_end + 1
        if pos >= n or p[pos] != 47:                       # '/'
            return False
        while pos < n and 33 <= p[pos] <= 126:
            pos += 1
        url_end = pos
        if url_end - url_start > self.max_uri_length:
            return False
        if n - pos < 10 or memcmp(p + pos, b" HTTP/1.1\r\n", 11) != 0:
            return False
        pos += 11
        # The head for the backend: request line first; the Host line once it is known.
        memcpy(h, p, url_end)
        memcpy(h + url_end, b" HTTP/1.1\r\nHost: ", 17)
        hlen = url_end + 17
        while True:
            if pos + 1 >= n:
                return False
            if p[pos] == 13:
                if p[pos + 1] != 10:
                    return False
                body_start = pos + 2
                if n - body_start != length:
                    return False          # a body not whole in this read, or a pipelined request after it
                break
            name_start = pos
            while pos < n and CLASS[p[pos]] & 1:
                pos += 1
            name_end = pos
            if name_end == name_start or pos >= n or p[pos] != 58:
                return False
            pos += 1
            while pos < n and (p[pos] == 32 or p[pos] == 9):
                pos += 1
            value_start = pos
            while pos < n and p[pos] != 13:
                if p[pos] == 127 or (p[pos] < 32 and p[pos] != 9):
                    return False
                pos += 1
            if pos + 1 >= n or p[pos + 1] != 10:
                return False
            header_size += name_end - name_start + pos - value_start + 4
            header_count += 1
            if header_size > self.max_header_size or header_count > self.max_headers:
                return False
            action = self.header_action(p + name_start, name_end - name_start)
            if action >= H_KEY:
                # A rate limit's key: forwarded as it is; a repeated one is the Python path's (it joins them).
                if key_len[action - H_KEY] >= 0:
                    return False
                key_start[action - H_KEY] = <uint32_t>value_start
                key_len[action - H_KEY] = <int32_t>(pos - value_start)
                action = H_FORWARD
            elif action >= H_CAPTURE:
                # Kept for a hashing key or a sticky rule; a repeated one is the Python path's (it joins them).
                i = action - H_CAPTURE
                if cap_len[i] >= 0:
                    return False
                cap_start[i] = <uint32_t>value_start
                cap_len[i] = <int32_t>(pos - value_start)
                action = H_SKIP if i == self.cap_cookie and self.cookie_held else H_FORWARD
            if action == H_FORWARD:
                lines_len = put(lines, lines_len, p + name_start, name_end - name_start)
                lines_len = put_line(lines, lines_len, b": ", 2, p + value_start, pos - value_start)
            elif action == H_IS_HOST:
                if host_start >= 0 or not valid_simple_host(p + value_start, pos - value_start):
                    return False
                host_start, host_end = value_start, pos
            elif action == H_IS_CONNECTION:
                if lower_equals(p + value_start, pos - value_start, b"close", 5):
                    close_after = True
                elif not lower_equals(p + value_start, pos - value_start, b"keep-alive", 10):
                    return False                            # other options, or header names to drop
            elif action == H_IS_LENGTH:
                # One Content-Length of 1-15 digits (llhttp refuses the rest; the Python path answers).
                if length_start >= 0 or pos == value_start or pos - value_start > 15:
                    return False
                for i in range(value_start, pos):
                    if not 48 <= p[i] <= 57:
                        return False
                    length = length * 10 + (p[i] - 48)
                if self.max_body_size and length > self.max_body_size:
                    return False                            # 413: the Python path's answer
                length_start, length_end = value_start, pos
            elif action == H_ADOPT:
                return False
            pos += 2
        if host_start < 0:
            return False
        hlen = put_line(h, hlen, b"", 0, p + host_start, host_end - host_start)      # after "Host: "
        hlen = put(h, hlen, lines, lines_len)
        if self.cookie_cache != NULL and self.cap_cookie >= 0 and cap_len[self.cap_cookie] >= 0:
            cookie = self.cookie_entry(p + cap_start[self.cap_cookie], cap_len[self.cap_cookie])
            if cookie == NULL:
                return False
        if self.cookie_held and cap_len[self.cap_cookie] >= 0:
            # Re-emitted after the other lines, as the sticky rule forwards it (protocol.py's order).
            if cookie != NULL and cookie.forwarded != NULL:
                forwarded = <object>cookie.forwarded
                if len(forwarded):
                    hlen = put_line(h, hlen, b"Cookie: ", 8, PyBytes_AS_STRING(forwarded), len(forwarded))
            elif cap_len[self.cap_cookie]:
                hlen = put_line(h, hlen, b"Cookie: ", 8, p + cap_start[self.cap_cookie], cap_len[self.cap_cookie])
        if self.forwarded_for:
            hlen = put(h, hlen, c.forward, c.forward_len)
            hlen = put_line(h, hlen, b"X-Forwarded-Host: ", 18, p + host_start, host_end - host_start)
        hlen = put(h, hlen, PyBytes_AS_STRING(self.request_block), len(self.request_block))
        if c.tls != NULL and c.tls.tls_block_len:
            hlen = put(h, hlen, c.tls.tls_block, c.tls.tls_block_len)
        if length_start >= 0:
            hlen = put_line(h, hlen, b"Content-Length: ", 16, p + length_start, length_end - length_start)
        hlen = put(h, hlen, b"\r\n", 2)
        hlen = put(h, hlen, p + body_start, length)
        if not self.reserve(c, n + hlen):
            return False
        memcpy(c.buf, p, n)
        memcpy(c.buf + n, h, hlen)
        c.req_len = <uint32_t>n
        c.started = self.now
        c.header_size = <uint32_t>header_size
        c.url_start = <uint32_t>url_start
        c.url_end = <uint32_t>url_end
        c.host_start = <uint32_t>host_start
        c.host_end = <uint32_t>host_end
        c.method_len = <uint32_t>method_end
        c.body_len = <uint32_t>length
        c.head_len = <uint32_t>hlen
        c.head_sent = 0
        c.close_after = close_after
        for i in range(self.nkeys):
            c.caps.key_start[i] = key_start[i]
            c.caps.key_len[i] = key_len[i]
        for i in range(self.ncaps):
            c.caps.cap_start[i] = cap_start[i]
            c.caps.cap_len[i] = cap_len[i]
        self.pin_by_cookie(c, cookie)
        return True

    cdef CookieEntry *cookie_entry(self, const unsigned char *p, Py_ssize_t n):
        """What the Cookie header p[:n] means to the sticky rule: from the cache, or asked of the rule
        once (Sticky.cookie_facts) and cached. NULL: the rule failed, or the header is too long to cache
        (the Python path's)."""
        cdef uint64_t h = self.cookie_seed ^ (<uint64_t>n * 0x9E3779B97F4A7C15ULL)
        cdef uint64_t word
        cdef Py_ssize_t i = 0
        cdef CookieEntry *e
        cdef object facts, session, prefixed
        if n > MAX_CACHED_COOKIE:
            return NULL
        # Eight bytes a step (multiply, xor-shift), seeded per process: entries cannot be aimed at.
        while i + 8 <= n:
            memcpy(&word, p + i, 8)
            h = (h ^ word) * 0xFF51AFD7ED558CCDULL
            h ^= h >> 32
            i += 8
        word = 0
        memcpy(&word, p + i, n - i)
        h = (h ^ word) * 0xC4CEB9FE1A85EC53ULL
        h ^= h >> 29
        e = &self.cookie_cache[h % COOKIE_CACHE]
        if e.key != NULL and e.hash == h and e.key_len == n and memcmp(e.key, p, n) == 0:
            return e
        try:
            facts = self.cookie_facts(PyBytes_FromStringAndSize(<const char *>p, n))
        except Exception:
            return NULL
        self.forget_cookie(e)
        e.key = <char *>malloc(n + 1)
        if e.key == NULL:
            return NULL
        memcpy(e.key, p, n)
        e.key_len = <uint32_t>n
        e.hash = h
        session, prefixed, forwarded, learned = facts
        e.pin_slot = -1
        if session is not None:
            e.session = <PyObject *>session
            Py_INCREF(session)
            e.pin_slot = self.slot_of(session[0])
            e.first = session[1]
            e.last = session[2]
        elif prefixed is not None:
            e.pin_slot = self.slot_of(prefixed)
        if forwarded is not None:
            e.forwarded = <PyObject *>forwarded
            Py_INCREF(forwarded)
        e.learned = <PyObject *>learned
        Py_INCREF(learned)
        return e

    cdef void forget_cookie(self, CookieEntry *e):
        free(e.key)
        e.key = NULL
        Py_XDECREF(e.session)
        Py_XDECREF(e.forwarded)
        Py_XDECREF(e.learned)
        e.session = e.forwarded = e.learned = NULL

    cdef void pin_by_cookie(self, Client *c, CookieEntry *e):
        """The request's pin as Sticky.pin gives it for its Cookie header: the backend its unexpired
        insert session or prefix cookie names, the session (insert) for the response's cookie, the
        learned id (learn:NAME). The client holds references until the next request."""
        cdef double now
        if c.caps == NULL:
            return                          # no sticky rule (nor a cookie to read)
        Py_XDECREF(c.caps.session)
        Py_XDECREF(c.caps.learned)
        c.caps.session = c.caps.learned = NULL
        c.caps.pin_slot = -1
        if e == NULL:
            return
        if e.session != NULL:
            if self.maxlife or self.maxidle:
                now = wall_now()
                if self.maxlife and now - e.first > self.maxlife or self.maxidle and now - e.last > self.maxidle:
                    return                  # expired: balanced, and the response starts a new session
            c.caps.session = e.session
            Py_INCREF(<object>c.caps.session)
        c.caps.pin_slot = e.pin_slot
        c.caps.learned = e.learned
        Py_INCREF(<object>c.caps.learned)

    cdef int slot_of(self, backend) except -1:
        cdef object slot = self.slots.get(backend)
        cdef object pool
        cdef int size
        if slot is not None:
            return slot
        size = len(self.backends)
        if size == self.slot_capacity:
            self.slot_capacity = self.slot_capacity * 2 if self.slot_capacity else 16
            self.idle = <Backend **>realloc(self.idle, sizeof(Backend *) * self.slot_capacity)
            self.idle_count = <int *>realloc(self.idle_count, sizeof(int) * self.slot_capacity)
            self.attempts = <int *>realloc(self.attempts, sizeof(int) * self.slot_capacity)
            self.fresh_line = <PyObject **>realloc(self.fresh_line, sizeof(PyObject *) * self.slot_capacity)
            self.fresh_second = <long long *>realloc(self.fresh_second, sizeof(long long) * self.slot_capacity)
            self.slot_tls = <unsigned char *>realloc(self.slot_tls, self.slot_capacity)
            self.counts = <SlotCounts *>realloc(self.counts, sizeof(SlotCounts) * self.slot_capacity)
            if (self.idle == NULL or self.idle_count == NULL or self.attempts == NULL or self.fresh_line == NULL
                    or self.fresh_second == NULL or self.slot_tls == NULL or self.counts == NULL):
                raise MemoryError()
        self.idle[size] = NULL
        self.idle_count[size] = 0
        pool = backend.pool
        self.attempts[size] = pool.attempts
        self.slot_done.append(pool.response_done)
        self.slot_tls[size] = backend.ssl_context is not None
        self.slot_hsts.append(self.glue.hsts_block(backend))
        self.fresh_line[size] = NULL
        self.fresh_second[size] = -1
        memset(&self.counts[size], 0, sizeof(SlotCounts))
        h2b_slot(self, size, backend)          # HTTP/2 to backends (_eh2b.pxi)
        self.backends.append(backend)
        self.slots[backend] = size
        self.slot_count = size + 1
        return size

    cdef void dispatch(self, Client *c):
        """A parsed request: to an idle connection of the backend the pool picks, else Python connects."""
        cdef object backend
        cdef object key = None
        cdef object picked, pinned = None, sticky_key = None
        cdef double wait
        if self.routed:
            picked = self.select_routed(
                PyBytes_FromStringAndSize(c.buf, c.method_len),
                PyBytes_FromStringAndSize(c.buf + c.url_start, c.url_end - c.url_start),
                PyBytes_FromStringAndSize(c.buf + c.host_start, c.host_end - c.host_start),
                PyBytes_FromStringAndSize(c.ip, c.ip_len), c.body_len)
            if picked is None:
                # (select_routed checked the rate limits first: the Python path must not count it again)
                self.adopt(c, c.buf, c.req_len, HAND_NO_BACKEND, self.limiter is not None)
                return
            if type(picked) is float:         # over a rate limit (admission control): the 429
                self.answer(c, self.limited_response(picked, c.close_after))
                return
            backend, key = picked
            self.place(c, backend, key)
            return
        if self.limiter is not None and self.limiter.has_request_rules:
            # (no ClientCaptures: no key headers, nkeys 0, so check_engine reads no key)
            wait = self.limiter.check_engine(self.limit_pool, c.ip, c.ip_len, c.buf,
                                             c.caps.key_start if c.caps != NULL else NULL,
                                             c.caps.key_len if c.caps != NULL else NULL, self.now)
            if wait > 0.0:
                self.answer(c, self.limited_response(wait, c.close_after))
                return
        key = self.hash_key(c)
        if self.sticky_kind == STICKY_NONE:
            backend = self.select(key, None)
        elif self.sticky_kind == STICKY_COOKIE_INSERT or self.sticky_kind == STICKY_COOKIE_PREFIX:
            pinned = self.backends[c.caps.pin_slot] if c.caps.pin_slot >= 0 else None
            backend = self.select(key, pinned)
        else:
            # A learned or source key: the pool's table (Sticky.pinned_by_key) is read by select_sticky.
            if self.sticky_kind == STICKY_SOURCE:
                sticky_key = PyBytes_FromStringAndSize(c.ip, c.ip_len)
            elif self.sticky_kind == STICKY_LEARN_COOKIE:
                sticky_key = (<object>c.caps.learned if c.caps.learned != NULL and len(<object>c.caps.learned)
                              else None)
            elif c.caps.cap_len[self.cap_sticky] > 0:       # learn:header:NAME (Sticky.pin: an empty one is none)
                sticky_key = PyBytes_FromStringAndSize(c.buf + c.caps.cap_start[self.cap_sticky],
                                                       c.caps.cap_len[self.cap_sticky])
            if sticky_key is None:
                backend = self.select(key, None)
            elif self.table_hit(sticky_key) >= 0:
                # In the local table and fresh: its backend preferred; another pick sticks from now on.
                pinned = self.backends[self.table_hit_slot]
                backend = self.select(key, pinned)
                if backend is not None and backend is not pinned:
                    self.record(sticky_key, backend)
            else:
                picked = self.select_sticky(key, sticky_key)
                if picked is self.store_miss:
                    # Not in the local table, and the shared store is up: Python asks it (bounded, as the
                    # Python path does), then connects; the request stays the engine's.
                    self.go_connect(c, None, key, None, sticky_key)
                    return
                backend, pinned = picked
        if backend is None:
            # Nothing to pick now (every backend down or full, a queue): the Python path waits or answers
            # (the rate limits were checked above: it must not count the request again).
            self.adopt(c, c.buf, c.req_len, HAND_NO_BACKEND, self.limiter is not None)
            return
        self.place(c, backend, key, pinned, sticky_key)

    cdef object select(self, object key, object pinned):
        """The single pool's pick with its slot taken (FastPath._take's rules), or None: nothing to pick
        now, or a backend that speaks TLS (added at run time: the engine relays plain bytes)."""
        cdef object backend = self.select_now(key, self.no_tries, pinned)
        if backend is not None and self.slot_tls[self.slot_of(backend)]:
            self.glue.pool.release(backend)
            return None
        return backend

    cdef void finish(self, int slot, double seconds, bint ok, int status, long long bytes_in,
                     long long bytes_out):
        """The request's slot goes back with its outcome (its pool's response_done: the Python path's
        BackendConnection.release rules), and its counts when metrics are on (status 0: the client
        left first: not counted, as Observer.http_request)."""
        cdef SlotCounts *k
        cdef int bucket = 0
        if self.counting and status:
            k = &self.counts[slot]
            k.requests += 1
            if 100 <= status < 600:
                k.responses[status // 100 - 1] += 1
            k.bytes_in += bytes_in
            k.bytes_out += bytes_out
            while bucket < self.nbounds and self.latency_bounds[bucket] < seconds:
                bucket += 1             # bisect_left, as Histogram.observe
            k.latency[bucket] += 1
            k.latency_sum += seconds
            k.dirty = 1
        (<object>PyList_GET_ITEM(self.slot_done, slot))(<object>PyList_GET_ITEM(self.backends, slot), seconds,
                                                        ok, status)

    def flush_counts(self):
        """Adds what the engine counted since the last call to its backends' Traffic (observe.Observer
        .count_request's counters): called before they are read (Observer.collect)."""
        cdef SlotCounts *k
        cdef int slot, i
        for slot in range(self.slot_count):
            k = &self.counts[slot]
            if not k.dirty:
                continue
            traffic = self.backends[slot].traffic
            traffic.requests += k.requests
            responses = traffic.responses
            for i in range(5):
                responses[i] += k.responses[i]
            traffic.bytes_in += k.bytes_in
            traffic.bytes_out += k.bytes_out
            histogram = traffic.response_time
            latency = histogram.counts
            for i in range(self.nbounds + 1):
                latency[i] += k.latency[i]
            histogram.sum += k.latency_sum
            memset(k, 0, sizeof(SlotCounts))

    cdef int table_hit(self, object key):
        """StickTable.get + Sticky.pinned_by_key for the common case, in place: key's entry, unexpired,
        naming a backend of the pool, with no store TTL refresh due, moved to the LRU end; its slot (also
        in table_hit_slot). -1 for anything else: then Python's own code runs (expiry, refresh, miss)."""
        cdef PyObject *entry = PyDict_GetItem(self.table_entries, key)
        cdef PyObject *slot
        cdef double left
        self.table_hit_slot = -1
        if entry == NULL:
            return -1
        left = PyFloat_AS_DOUBLE(<object>PyList_GET_ITEM(<object>entry, 1)) - monotonic_now()
        if left <= 0.0 or left < self.touch_before:
            return -1
        slot = PyDict_GetItem(self.ident_slots, <object>PyList_GET_ITEM(<object>entry, 0))
        if slot == NULL:
            return -1
        self.table_touch(key)
        self.table_hit_slot = <int><object>slot
        return self.table_hit_slot

    cdef object hash_key(self, Client *c):
        """The request's hashing key, as RoutePool.key gives it (None: no key)."""
        cdef uint32_t end
        cdef int slot
        if self.key_kind == KEY_SOURCE:
            return PyBytes_FromStringAndSize(c.ip, c.ip_len)
        if self.key_kind == KEY_URI:
            return PyBytes_FromStringAndSize(c.buf + c.url_start, c.url_end - c.url_start)
        if self.key_kind == KEY_PATH:
            end = c.url_start
            while end < c.url_end and c.buf[end] != 63:          # '?'
                end += 1
            return PyBytes_FromStringAndSize(c.buf + c.url_start, end - c.url_start)
        if self.key_kind == KEY_HEADER:
            slot = self.cap_hash
            if c.caps.cap_len[slot] < 0:
                return None
            return PyBytes_FromStringAndSize(c.buf + c.caps.cap_start[slot], c.caps.cap_len[slot])
        if self.key_kind == KEY_COOKIE:
            slot = self.cap_cookie
            if c.caps.cap_len[slot] <= 0:
                return None
            return cookie_key(<const unsigned char *>c.buf + c.caps.cap_start[slot], c.caps.cap_len[slot],
                              PyBytes_AS_STRING(self.key_name), len(self.key_name))
        if self.key_kind == KEY_QUERY:
            return query_key(<const unsigned char *>c.buf + c.url_start, c.url_end - c.url_start,
                             PyBytes_AS_STRING(self.key_name), len(self.key_name), self.decoded)
        return None

    cdef void place(self, Client *c, object backend, object key, object pinned=None, object sticky_key=None):
        """The request goes to `backend` (its slot taken): on an idle connection, or Python connects
        (pinned, sticky_key: the request's sticky pin and key, for the pool's retries and the record)."""
        cdef int slot = self.slot_of(backend)
        cdef Backend *b = self.idle[slot]
        c.slot = slot
        if h2b_place(self, c, backend, slot):
            return                  # HTTP/2 to backends (_eh2b.pxi), or the Python path's
        if b != NULL:
            self.unpark(b)
            self.attach(c, b)
            return
        self.go_connect(c, backend, key, pinned, sticky_key)

    cdef void go_connect(self, Client *c, object backend, object key, object pinned, object sticky_key):
        """Python connects a backend for c (`backend`: the pick, its slot taken; None: the pool picks
        after asking the session store for sticky_key) and hands the socket back (connected())."""
        c.state = CONNECTING
        c.deadline_kind = WAIT_NONE
        self.connects += 1
        self.glue.connect(<uintptr_t>c, backend, key, pinned, sticky_key)

    cdef void attach(self, Client *c, Backend *b):
        b.client = c
        c.backend = b
        c.state = SENT
        c.sent_at = self.now
        c.deadline = self.now + self.response_timeout
        c.deadline_kind = WAIT_BACKEND
        self.send_head(c)

    cdef bint send_head(self, Client *c):
        """Writes what is left of the head to the backend; False when the client was adopted."""
        cdef ssize_t n
        while c.head_sent < c.head_len:
            n = send(c.backend.fd, c.buf + c.req_len + c.head_sent, c.head_len - c.head_sent, MSG_NOSIGNAL)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    return True             # EPOLLOUT on the backend socket resumes it
                # The backend connection is broken: the Python path sees it fail and retries.
                self.adopt(c, NULL, 0, HAND_BACKEND_FAILED)
                return False
            c.head_sent += <uint32_t>n
        return True

    cdef Backend *new_backend(self, object backend, int fd) except? NULL:
        """A backend connection the engine owns from now on, in the epoll set; NULL (fd closed) when
        epoll refuses it."""
        cdef Backend *b = <Backend *>malloc(sizeof(Backend))
        if b == NULL:
            close(fd)
            raise MemoryError()
        b.kind = IS_BACKEND
        b.fd = fd
        b.client = NULL
        b.next_idle = b.prev_idle = NULL
        b.reused = 0
        b.slot = self.slot_of(backend)
        if not self.watch(fd, b):
            self.close_backend(b)
            return NULL
        return b

    def connected(self, uintptr_t token, backend, int fd, bint reused=False):
        """Python connected a backend for the client `token` (dispatch()); the engine owns fd now.
        reused: it is a keep-alive connection the Python path had parked (the keep-alive race rules)."""
        cdef Client *c = <Client *>token
        cdef Backend *b = self.new_backend(backend, fd)
        if b != NULL:
            b.reused = reused
        self.now = monotonic_now()
        if c.gone:
            # The client left while we connected: the slot goes back, the connection waits for the next.
            self.finish(self.slot_of(backend), 0.0, True, 0, 0, 0)
            self.free_client(c)
            if b != NULL:
                self.park(b)
            return
        c.slot = b.slot if b != NULL else c.slot
        if b == NULL:
            self.finish(self.slot_of(backend), 0.0, True, 0, 0, 0)
            self.answer(c, self.glue.bad_gateway[c.close_after])
            return
        self.attach(c, b)

    def connect_failed(self, uintptr_t token, bytes keep, bytes close, int status=0, bytes pool=b"-"):
        """Python could not connect a backend for `token` (of the pool named `pool`): its answer
        (status: 503/502) goes to the client, in the form with `Connection: close` when the client's
        connection ends after it."""
        cdef Client *c = <Client *>token
        cdef bytes data
        if c.gone:
            self.free_client(c)
            return
        self.now = monotonic_now()
        data = close if c.close_after else keep
        if self.access_log is not None and status:
            self.log_request(c, -1, pool, status, self.request_size(c), len(data), 0.0)
        self.answer(c, data)

    cdef void answer(self, Client *c, bytes data):
        """An answer of fastlb's own; the connection stays for the next request unless it was to close."""
        cdef iovec iov[1]
        iov[0].iov_base = PyBytes_AS_STRING(data)
        iov[0].iov_len = len(data)
        c.slot = -1
        self.write_answer(c, iov, 1)

    # ---- responses ---------------------------------------------------------------------------------

    cdef void on_backend_readable(self, Backend *b):
        cdef Client *c = b.client
        cdef ssize_t n
        cdef PlainResponse found
        cdef iovec iov[MAX_IOV]
        cdef int count = 0, i
        cdef bint close
        cdef object backend, cookie_line, hsts = None
        if c == NULL:
            # An idle connection readable: the backend closed it (or sent bytes nobody asked for).
            self.unpark(b)
            self.close_backend(b)
            return
        if c.state == RELAYING:
            if c.pending == NULL:      # (else the client's EPOLLOUT resumes the relay once it drained)
                self.relay_body(c, b)
            return
        n = recv(b.fd, self.scratch, SCRATCH, 0)
        if n < 0 and (errno == EAGAIN or errno == EINTR):
            return
        # Closed, failed, a response the engine does not forward itself (or that carries a header the
        # sticky rule reads), or one --retry-on names for a request that may go to another backend:
        # Python's from here, which retries or answers by the same rules.
        if n <= 0:
            self.adopt(c, self.scratch, 0, HAND_BACKEND_FAILED)
            return
        if self.hsts_on and c.tls != NULL and c.tls.ssl != NULL:     # (a stream of h2c has a ClientTls, no SSL)
            # The pool's HSTS replaces the backend's own line (upstream.py's on_header and fast path).
            hsts = <object>PyList_GET_ITEM(self.slot_hsts, c.slot)
            if not len(hsts):
                hsts = None
        # A body still to come is relayed by the engine (relay_body) for an HTTP/1.1 client; an HTTP/2
        # stream's goes to the Python path, which frames it.
        if (not scan_plain(<const unsigned char *>self.scratch, n, self.response_watch,
                           self.hsts_dropped if hsts is not None else self.response_dropped, &found)
                or found.body_start > self.max_response_header_size
                or (found.body_left and c.kind == IS_STREAM)):
            self.adopt(c, self.scratch, n, HAND_RESPONSE)
            return
        if self.retry_status[found.status] and self.may_send_again(c):
            self.adopt(c, self.scratch, n, HAND_RETRY)
            return
        close = c.close_after or self.draining
        for i in range(found.nspans):
            iov[count].iov_base = self.scratch + found.spans[i].start
            iov[count].iov_len = found.spans[i].end - found.spans[i].start
            count += 1
        if close:
            iov[count].iov_base = <char *>b"Connection: close\r\n"
            iov[count].iov_len = 19
            count += 1
        if len(self.response_block):
            iov[count].iov_base = PyBytes_AS_STRING(self.response_block)
            iov[count].iov_len = len(self.response_block)
            count += 1
        if hsts is not None:
            iov[count].iov_base = PyBytes_AS_STRING(hsts)
            iov[count].iov_len = len(hsts)
            count += 1
        if self.sticky_kind == STICKY_COOKIE_INSERT:
            cookie_line = self.insert_cookie(c)
            if len(cookie_line):
                iov[count].iov_base = PyBytes_AS_STRING(cookie_line)
                iov[count].iov_len = len(cookie_line)
                count += 1
        iov[count].iov_base = <char *>b"\r\n"
        iov[count].iov_len = 2
        count += 1
        if n > found.body_start:
            iov[count].iov_base = self.scratch + found.body_start
            iov[count].iov_len = n - found.body_start
            count += 1
        c.close_after = close
        b.status = found.status
        b.response_bytes = n + found.body_left
        b.closing = found.backend_close
        if found.body_left:
            # The rest of the body follows: the head and what came of the body go out now, the rest as
            # it comes (relay_body), and the backend connection stays this client's until its end.
            b.body_left = found.body_left
            c.state = RELAYING
            c.deadline = self.now + self.response_timeout
            c.deadline_kind = WAIT_BACKEND
            if self.send_answer(c, iov, count) == ANSWER_SENT:
                self.relay_body(c, b)
            return
        self.response_done(c, b)
        self.write_answer(c, iov, count)

    cdef void response_done(self, Client *c, Backend *b):
        """The response is read in full (by its Content-Length, nothing after it): the slot goes back,
        and the connection is reusable at once if the request was also written whole (a backend may
        answer before reading all of it: then it still expects the rest)."""
        c.backend = NULL
        b.client = NULL
        if may_reuse(c.head_sent == c.head_len, True, not b.closing, self.draining):
            self.park(b)
        else:
            self.close_backend(b)
        self.served += 1
        self.finish(c.slot, self.now - c.sent_at, b.status < 500, b.status, self.request_size(c),
                    b.response_bytes)
        if self.access_log is not None:
            self.log_request(c, c.slot, None, b.status, self.request_size(c), b.response_bytes,
                             max(0.0, c.sent_at - c.started))

    cdef void relay_body(self, Client *c, Backend *b):
        """The rest of a response body, backend -> client, RELAY_BYTES at a time: only what the body still
        owes is read (the connection stays in step), and a client that does not keep up stops the
        reading (its pending bytes first; its EPOLLOUT resumes here through flush_client). The sockets
        are edge-triggered: each call reads until EAGAIN or until the client is full. Between two plain
        sockets the bytes go through the engine's pipe (splice: no copy to user space and back), else
        through relay_buf (TLS clients)."""
        cdef bint through_pipe = c.tls == NULL and self.relay_pipe[0] >= 0
        cdef size_t size
        cdef ssize_t n, w
        while b.body_left > 0:
            size = <size_t>min(<long long>RELAY_BYTES, b.body_left)
            if through_pipe:
                n = splice(b.fd, NULL, self.relay_pipe[1], NULL, size, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            else:
                n = recv(b.fd, self.relay_buf, size, 0)
            if n < 0 and errno == EINTR:
                continue
            if n < 0 and errno == EAGAIN:
                return
            if n <= 0:
                # The backend closed or failed mid-body: the client has a head that promised more, so
                # its connection ends too (as the Python path cuts it).
                self.end_relay(c, True)
                return
            b.body_left -= n
            c.deadline = self.now + self.response_timeout
            w = self.relay_step_out(c, n, through_pipe)
            if w == FAILED or (w < n and not self.keep_rest(c, w, n, through_pipe)):
                if through_pipe:
                    self.empty_relay_pipe()
                self.end_relay(c, False)
                return
            if w < n:
                return
        self.response_done(c, b)
        self.answered(c)

    cdef ssize_t relay_step_out(self, Client *c, ssize_t n, bint through_pipe):
        """Writes the n bytes relay_body just took to the client: how many it took now, or FAILED."""
        cdef ssize_t w = 0, m
        if not through_pipe:
            return client_send(c, self.relay_buf, n)
        while w < n:
            m = splice(self.relay_pipe[0], NULL, c.fd, NULL, <size_t>(n - w), SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if m > 0:
                w += m
            elif m < 0 and errno == EINTR:
                continue
            elif m < 0 and errno == EAGAIN:
                break
            else:
                return FAILED
        return w

    cdef bint keep_rest(self, Client *c, ssize_t w, ssize_t n, bint through_pipe):
        """Bytes w..n of the step, which the client did not take, into c.pending (out of the pipe: it is
        empty again for the next relay); False when out of memory."""
        cdef ssize_t m, got = 0
        c.pending = <char *>malloc(n - w)
        if c.pending == NULL:
            return False
        if through_pipe:
            while got < n - w:
                m = read(self.relay_pipe[0], c.pending + got, <size_t>(n - w - got))
                if m > 0:
                    got += m
                elif not (m < 0 and errno == EINTR):
                    break              # (cannot happen: the pipe holds those bytes)
        else:
            memcpy(c.pending, self.relay_buf + w, n - w)
        c.pending_len = <uint32_t>(n - w)
        c.pending_off = 0
        return True

    cdef void empty_relay_pipe(self):
        """Drops what a failed step left in the pipe (non-blocking: until it is empty)."""
        cdef ssize_t m
        while True:
            m = read(self.relay_pipe[0], self.relay_buf, RELAY_BYTES)
            if m <= 0 and not (m < 0 and errno == EINTR):
                return

    cdef void end_relay(self, Client *c, bint backend_failed):
        """A relayed body cut short (the backend or the client failed, or a timeout): both connections
        end; the access log says what came of it. backend_failed: the backend closed, failed or stalled
        (passive health counts it); else the client left or did not read (the backend is not at fault)."""
        cdef Backend *b = c.backend
        c.backend = NULL
        b.client = NULL
        self.close_backend(b)
        self.finish(c.slot, self.now - c.sent_at, not backend_failed, b.status, self.request_size(c),
                    b.response_bytes - b.body_left)
        if self.access_log is not None:
            self.log_request(c, c.slot, None, b.status, self.request_size(c), b.response_bytes - b.body_left,
                             max(0.0, c.sent_at - c.started))
        self.close_client(c)

    cdef bint may_send_again(self, Client *c):
        """reuse.may_send_again for the engine's request, its first attempt: nothing of a response
        reached the client, the engine holds every byte of it (replayable while as small as the Python
        path keeps), and it is idempotent or none of it was written."""
        return may_send_again_on(False, self.request_size(c) <= self.replay_limit,
                                 PyBytes_FromStringAndSize(c.buf, c.method_len) in IDEMPOTENT_METHODS,
                                 c.head_sent > 0, 1, self.attempts[c.slot])

    cdef object insert_cookie(self, Client *c):
        """The Set-Cookie line (cookie insert) naming the backend that answered, as
        Sticky.response_block gives it: the client's session re-sent while fresh (b"" when indirect),
        else a new session's line, made once per backend per second."""
        cdef object session
        cdef long long second
        cdef object line
        if c.caps.session != NULL and c.caps.pin_slot == c.slot:
            session = <object>c.caps.session
            if not self.refresh_after or wall_now() - <double>session[2] < self.refresh_after:
                return <object>PyTuple_GET_ITEM(session, 3)
            return self.cookie_line(session, self.backends[c.slot])
        second = <long long>wall_now()
        if self.fresh_second[c.slot] != second:
            line = self.cookie_line(None, self.backends[c.slot])
            Py_XDECREF(self.fresh_line[c.slot])
            self.fresh_line[c.slot] = <PyObject *>line
            Py_INCREF(line)
            self.fresh_second[c.slot] = second
        return <object>self.fresh_line[c.slot]

    cdef void write_answer(self, Client *c, iovec *iov, int count):
        """Writes an answer to the client; what the socket does not take now waits in c.pending."""
        if c.kind == IS_STREAM:
            h2_answer(self, c, iov, count)
        elif self.send_answer(c, iov, count) == ANSWER_SENT:
            self.answered(c)

    cdef int send_answer(self, Client *c, iovec *iov, int count):
        """Writes iov to an HTTP/1.1 client: ANSWER_SENT, ANSWER_PENDING (the rest waits in c.pending for
        EPOLLOUT: flush_client) or ANSWER_FAILED (the client is closed)."""
        cdef ssize_t n, total = 0, left
        cdef int i
        cdef bint whole_to_pending = False
        for i in range(count):
            total += iov[i].iov_len
        if count > 1 and total <= SCRATCH:
            # One contiguous send: cheaper in the kernel than writev's iovec import and per-segment copy.
            left = 0
            for i in range(count):
                memcpy(self.headbuf + left, iov[i].iov_base, iov[i].iov_len)
                left += iov[i].iov_len
            iov[0].iov_base = self.headbuf
            iov[0].iov_len = total
            count = 1
        if count == 1:
            n = client_send(c, <char *>iov[0].iov_base, iov[0].iov_len)
        elif c.tls != NULL:
            n = 0                   # TLS writes one buffer: the pending one, written at once below
            whole_to_pending = True
        else:
            while True:
                n = writev(c.fd, iov, count)
                if n >= 0 or errno != EINTR:
                    break
            if n < 0:
                n = 0 if errno == EAGAIN else FAILED
        if n == FAILED:
            self.close_client(c)
            return ANSWER_FAILED
        if n < total:
            left = total - n
            c.pending = <char *>malloc(left)
            if c.pending == NULL:
                self.close_client(c)
                return ANSWER_FAILED
            c.pending_len = <uint32_t>left
            c.pending_off = 0
            left = 0
            for i in range(count):
                if n >= <ssize_t>iov[i].iov_len:
                    n -= iov[i].iov_len
                    continue
                memcpy(c.pending + left, <char *>iov[i].iov_base + n, iov[i].iov_len - n)
                left += iov[i].iov_len - n
                n = 0
            if c.state != RELAYING:
                c.state = WRITING
                c.deadline = self.now + self.keepalive_timeout
                c.deadline_kind = WAIT_IDLE
            if whole_to_pending:
                self.flush_client(c)
            return ANSWER_PENDING
        return ANSWER_SENT

    cdef bint flush_client(self, Client *c):
        """EPOLLOUT while an answer waits; False when the client is gone."""
        cdef ssize_t n
        while c.pending_off < c.pending_len:
            n = client_send(c, c.pending + c.pending_off, c.pending_len - c.pending_off)
            if n == 0:
                return True
            if n == FAILED:
                self.close_client(c)
                return False
            c.pending_off += <uint32_t>n
        free(c.pending)
        c.pending = NULL
        c.pending_len = c.pending_off = 0
        if c.state == RELAYING:
            c.deadline = self.now + self.response_timeout
            self.relay_body(c, c.backend)
            return c.kind == IS_CLIENT
        return self.answered(c)

    cdef void spare_buf(self, Client *c):
        """c waits for its next request: its buffer goes to the spare list (or is freed past the bound)."""
        if c.buf == NULL:
            return
        if c.buf_cap >= SPARE_BUF_MIN and self.spare_bytes + c.buf_cap <= SPARE_BUF_BYTES:
            (<char **>c.buf)[0] = self.spare_bufs
            (<uint32_t *>(c.buf + sizeof(char *)))[0] = c.buf_cap
            self.spare_bufs = c.buf
            self.spare_bytes += c.buf_cap
        else:
            free(c.buf)
        c.buf = NULL
        c.buf_cap = 0

    cdef bint answered(self, Client *c):
        """The answer is out: close, or wait for the next request (reading what came meanwhile)."""
        if c.close_after:
            self.close_client(c)
            return False
        if c.kind == IS_CLIENT:
            self.spare_buf(c)
        c.state = WAITING
        c.slot = -1
        c.deadline = self.now + self.keepalive_timeout
        c.deadline_kind = WAIT_IDLE
        if c.read_pending or c.hung_up:
            self.on_client_readable(c)
        return True

    # ---- idle backend connections ------------------------------------------------------------------
    # One idle pool per backend, two storages: the engine's list here and the Python path's
    # `Backend.idle` deque (each path takes its own first, a uvloop transport is not rebuilt per
    # request). --backend-max-idle bounds the two together (park(), HttpRuntime.park), either path takes
    # the other's when its own is empty (take_idle_socket; the Python connect glue reads the deque), and
    # a removed backend's go at once from both (close_idle, BackendPool.remove_backend).

    def idle_count_of(self, backend):
        """How many of `backend`'s idle connections the engine holds (HttpRuntime.park's bound)."""
        cdef object slot = self.slots.get(backend)
        return 0 if slot is None else self.idle_count[<int>slot]

    def drop_oldest_idle(self, backend):
        """The Python path is at the bound with none of its own: the engine's oldest one goes."""
        cdef object slot = self.slots.get(backend)
        if slot is not None and self.idle[<int>slot] != NULL:
            self.close_oldest_idle(<int>slot)

    cdef void close_oldest_idle(self, int slot):
        # The list is newest first: walk to its tail.
        cdef Backend *oldest = self.idle[slot]
        while oldest.next_idle != NULL:
            oldest = oldest.next_idle
        self.unpark(oldest)
        self.close_backend(oldest)

    def take_idle_socket(self, backend):
        """The most recently parked connection to `backend`, for the Python path: its descriptor (the
        caller's now, out of the epoll set), or -1."""
        cdef object slot = self.slots.get(backend)
        cdef Backend *b
        cdef int fd
        if slot is None or self.idle[<int>slot] == NULL:
            return -1
        b = self.idle[<int>slot]
        self.unpark(b)
        fd = b.fd
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)
        self.free_backend(b)
        return fd

    def close_idle(self, backend):
        """A removed backend: its idle connections close now."""
        cdef object slot = self.slots.get(backend)
        cdef Backend *b
        if slot is None:
            return
        while self.idle[<int>slot] != NULL:
            b = self.idle[<int>slot]
            self.unpark(b)
            self.close_backend(b)


    cdef void park(self, Backend *b):
        cdef int slot = b.slot
        cdef object python_idle
        if self.max_idle <= 0:
            self.close_backend(b)
            return
        python_idle = (<object>self.backends[slot]).idle      # the Python path's storage (a deque)
        if self.idle_count[slot] >= self.max_idle - len(python_idle):
            # At the bound of the two storages together: the oldest of the engine's own goes first,
            # else the Python path's oldest (rare: only after a burst of requests it served).
            if self.idle[slot] != NULL:
                self.close_oldest_idle(slot)
            elif python_idle:
                python_idle.popleft().transport.close()
        b.client = NULL
        b.idle_since = self.now
        b.reused = 1
        b.prev_idle = NULL
        b.next_idle = self.idle[slot]
        if b.next_idle != NULL:
            b.next_idle.prev_idle = b
        self.idle[slot] = b
        self.idle_count[slot] += 1

    cdef void unpark(self, Backend *b):
        if b.prev_idle != NULL:
            b.prev_idle.next_idle = b.next_idle
        else:
            self.idle[b.slot] = b.next_idle
        if b.next_idle != NULL:
            b.next_idle.prev_idle = b.prev_idle
        b.next_idle = b.prev_idle = NULL
        self.idle_count[b.slot] -= 1

    # ---- timeouts, draining, shutdown --------------------------------------------------------------

    def sweep(self):
        """Called by the HTTP runtime's periodic sweep: every engine deadline and idle-connection expiry."""
        cdef Client *c = self.clients
        cdef Client *next_client
        cdef Backend *b
        cdef Backend *next_backend
        cdef int slot
        cdef double expire
        self.now = monotonic_now()
        while c != NULL:
            next_client = c.next
            if c.h2 != NULL:
                h2_sweep(self, c)
            elif c.deadline_kind != WAIT_NONE and c.deadline <= self.now:
                if c.deadline_kind == WAIT_IDLE:
                    self.close_client(c)
                elif c.deadline_kind == WAIT_HEAD:
                    client_send(c, PyBytes_AS_STRING(self.timeout_408), len(self.timeout_408))
                    self.close_client(c)
                elif c.deadline_kind == WAIT_HANDSHAKE:
                    self.handshake_failures += 1
                    self.close_client(c)
                elif c.deadline_kind == WAIT_BACKEND and c.state == RELAYING:
                    self.end_relay(c, c.pending == NULL)   # stalled: the backend's fault unless the client's
                elif c.deadline_kind == WAIT_BACKEND:
                    self.adopt(c, NULL, 0, HAND_TIMEOUT)   # Python answers 504 or retries, by its rules
            elif self.draining and c.state == WAITING and c.deadline_kind == WAIT_IDLE:
                self.close_client(c)
            c = next_client
        c = self.tunnels
        while c != NULL:
            next_client = c.next
            if c.deadline_kind == WAIT_TUNNEL_FLUSH and c.deadline <= self.now:
                self.end_tunnel(c, False)
            c = next_client
        h2b_sweep(self)             # HTTP/2 to backends (_eh2b.pxi)
        expire = self.now - self.backend_idle_timeout
        for slot in range(len(self.backends)):
            b = self.idle[slot]
            while b != NULL:
                next_backend = b.next_idle
                if b.idle_since <= expire or self.draining:
                    self.unpark(b)
                    self.close_backend(b)
                b = next_backend

    def close_all(self):
        """Cuts every client connection and idle backend connection (shutdown, grace period over)."""
        cdef Backend *b
        cdef int slot
        self.stop_listening()
        while self.clients != NULL:
            self.close_client(self.clients)
        while self.tunnels != NULL:
            self.end_tunnel(self.tunnels, False)
        h2b_close_all(self)
        for slot in range(len(self.backends)):
            while self.idle[slot] != NULL:
                b = self.idle[slot]
                self.unpark(b)
                self.close_backend(b)
