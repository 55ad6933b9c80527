# cython: language_level=3
"""The epoll relay engine (`--relay epoll`): established TCP connections relayed by a C thread.

One `Relay` per worker process owns a thread running its own epoll loop without the GIL. Python (the
uvloop worker) accepts, reads PROXY headers, picks and connects the backend through BackendPool, then
hands both sockets to `Relay.add()` (which takes ownership of the two fds) and hears back once per
connection, when it ends, through an eventfd it watches with `loop.add_reader`.

Per chunk (relay thread only, no allocation, no Python): one read into a per-thread scratch buffer, one
write to the peer. A partial write keeps the rest in a per-direction buffer allocated only then, stops
reading that side and waits for EPOLLOUT on the peer (backpressure both ways). A read of 0 stops
reading that side and, once its pending bytes are written, shuts the peer's write side (half-close);
both directions ended, or any error, closes both sockets. Idle connections are found by a coarse sweep
over last-activity times. Bounded: at most `capacity` connections (add() refuses beyond), a close
record per connection in a ring of `capacity` entries, one pending buffer per direction of at most
SCRATCH bytes.

Locking: `lock` guards the slot table, the close ring and the abort requests; the relay thread takes
it once per batch of closes or per sweep, never per chunk. A connection's own fields are written by
Python only before its fds are added to epoll, then only by the relay thread.

TLS termination (`listen()` with a `ServerContext`): for a TLS-terminating bind the thread itself
accepts, runs the non-blocking handshake (OpenSSL on the socket fd, no memory BIO) and then *parks*
the connection (out of epoll) and tells Python, through the same ring as the close records (a READY
record with the client's and the local address). Python picks and connects the backend as for a plain
connection and hands the backend socket over with `attach()`; the thread then relays SSL_read /
SSL_write on the client side and plain recv/send on the backend side. A client that fails or does not
finish its handshake (within `handshake_timeout`) never reaches Python and costs no backend connection.
TLS has no half-close: the client's EOF (close_notify or FIN) half-closes the backend; the backend's
EOF ends the connection with a close_notify. For the common case Python does not even connect: it takes
a free backend (BackendPool.select_now) and `connect()` has the thread connect it, the outcome coming back
as a CONNECTED or CONNECT_FAILED record.

Inline mode (`start(inline=True)`): no thread; Python runs the same engine from its event loop, calling
`poll()` when `epoll_fd` is readable. For a process that may use one CPU only, where the two threads could
only take turns, paying a context switch and an eventfd wake-up at each hand-over (four per TLS
connection).
"""
from libc.stdlib cimport malloc, free, calloc
from libc.string cimport memcpy, memset
from libc.errno cimport errno, EAGAIN, EINTR, EMFILE, ENFILE, ENOBUFS, ENOMEM, EINPROGRESS, ETIMEDOUT
from libc.stdint cimport uint64_t, uint32_t, int64_t
from posix.unistd cimport read, write, close
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from fastlb._posix cimport *

cdef extern from "<fcntl.h>" nogil:
    int fcntl(int fd, int cmd, ...)
    enum:
        F_DUPFD_CLOEXEC

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK, EFD_CLOEXEC

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_create(pthread_t *t, void *attr, void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t t, void **ret)
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)

cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    int sigfillset(sigset_t *s)
    int pthread_sigmask(int how, const sigset_t *s, sigset_t *old)
    enum:
        SIG_BLOCK, SIG_SETMASK

include "_ctls.pxi"

DEF SCRATCH = 65536
DEF MAX_EVENTS = 256
DEF MAX_LISTENERS = 64
DEF ACCEPT_BATCH = 16
DEF TLS_RECORD = 16384
DEF RING_PER_SLOT = 3

# Why a connection ended (the close records' reason).
cdef enum:
    END_BOTH = 0          # both directions finished (half-closes)
    END_CLIENT = 1        # error or reset on the client socket
    END_BACKEND = 2       # error or reset on the backend socket
    END_IDLE = 3          # idle both ways for idle_timeout
    END_ABORT = 4         # cut by Python (shutdown), or out of memory
    READY = 5             # not an end: a TLS client finished its handshake
    CONNECTED = 6         # not an end: connect() asked by Python succeeded (bytes_in: microseconds)
    CONNECT_FAILED = 7    # not an end: it failed (bytes_in: errno); the client is parked again

REASONS = ("both", "client", "backend", "idle", "abort", "ready", "connected", "connect-failed")

# A connection's phase. Plain connections (add()) start in ST_RELAY.
cdef enum:
    ST_RELAY = 0
    ST_HANDSHAKE = 1      # TLS: accepted by the thread, handshake under way
    ST_PARKED = 2         # TLS: handshake done, out of epoll until Python attaches a backend
    ST_CONNECTING = 3     # TLS: the thread connects the backend Python chose (connect())

cdef struct Conn:
    int fd[2]                 # 0: client, 1: backend
    uint32_t mask[2]          # epoll interest currently registered per fd
    char *buf[2]              # bytes read from fd[d], not yet written to fd[1-d] (NULL: none)
    uint32_t len[2]
    uint32_t off[2]
    unsigned char eof[2]      # fd[d] returned 0 (its direction ends once buf[d] is written)
    unsigned char shut[2]     # fd[1-d] had its write side shut
    unsigned char removed[2]  # fd[d] taken out of epoll (hung up while nothing was wanted from it)
    unsigned char dead        # closed in this batch; freed after it
    unsigned char reason
    int slot
    uint64_t id
    uint64_t nbytes[2]        # read from fd[d] (0: from the client = bytes_in)
    int64_t last_active       # ms, CLOCK_MONOTONIC_COARSE
    # TLS-terminated client (fd[0]); NULL for plain connections
    SSL *ssl
    unsigned char state       # ST_*
    unsigned char announced   # Python knows the connection: its end gets a close record
    unsigned char read_wants_write   # SSL_read asked for EPOLLOUT on the client (key update)
    int listener              # the Listener index it was accepted on (-1: added by Python)
    int64_t deadline          # ms: end of the handshake (or of the backend connect) allowed
    int64_t connect_start     # us, CLOCK_MONOTONIC: when connect() began
    sockaddr_in6 peer         # TLS: the client's address (AF_INET uses the start)

cdef struct CloseRecord:
    uint64_t id
    uint64_t bytes_in
    uint64_t bytes_out
    int reason
    int listener              # READY records: the Listener index

cdef struct Note:
    Conn *c
    int kind
    uint64_t value

cdef struct Listener:
    int fd                    # the relay's own dup of the listening socket (-1 once closed)
    int index
    int closed                # unlisten(): no more accepts; the thread closes fd at its next sweep
    int paused                # out of epoll while the slot table is full
    SSL_CTX *ctx              # the bind's front context (owned by its ServerContext)
    int64_t handshake_timeout # ms

cdef struct Attach:
    uint64_t id
    int fd                    # the connected backend socket; -1: connect to `addr` instead
    sockaddr_in6 addr
    socklen_t addrlen
    int64_t timeout           # ms, for the connect
    char *buf                 # to the backend first
    uint32_t len
    char *back                # to the client first (what the backend sent before the hand-over)
    uint32_t back_len
    int back_eof              # the backend already half-closed

cdef struct Engine:
    int epfd
    int wake_fd                # Python -> relay: aborts, stop
    int notify_fd              # relay -> Python: close records waiting
    pthread_mutex_t lock
    Conn **slots
    int capacity
    int count
    int *free_slots
    int nfree
    CloseRecord *ring
    int ring_head
    int ring_len
    uint64_t *aborts           # connection ids Python wants cut
    int naborts
    int abort_all
    int stop
    int64_t idle_timeout       # ms; 0: never
    int sweep_ms
    int64_t last_sweep
    char *scratch
    Conn **dead_list
    int ndead
    Note *notes                # READY / CONNECTED / CONNECT_FAILED of this batch
    int nnotes
    uint64_t next_serial
    Listener *listeners[MAX_LISTENERS]
    int nlisteners
    int npaused
    Attach *attaches           # backends Python hands to parked TLS connections
    int nattaches
    int inline                 # no thread: Python runs the engine from its event loop (poll())
    int polling                # inline, inside poll(): records are returned, not notified
    int notified               # notify_fd has a count to read


cdef inline int64_t now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)     # vDSO, no syscall; ~4 ms resolution
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef inline void set_mask(Engine *e, Conn *c, int side) noexcept nogil:
    """Registers the interest fd[side] needs now: IN while its direction may read, OUT while the other
    direction has bytes waiting for it (or, TLS client, while its SSL_read waits to write)."""
    cdef uint32_t want = 0
    cdef epoll_event ev
    if not c.eof[side] and c.buf[side] == NULL:
        want |= EPOLLIN
    if c.buf[1 - side] != NULL or (side == 0 and c.read_wants_write):
        want |= EPOLLOUT
    if c.removed[side]:
        if want:
            c.removed[side] = 0
            c.mask[side] = want
            ev.events = want
            ev.data.u64 = <uint64_t>c | <uint64_t>side
            epoll_ctl(e.epfd, EPOLL_CTL_ADD, c.fd[side], &ev)
        return
    if want != c.mask[side]:
        c.mask[side] = want
        ev.events = want
        ev.data.u64 = <uint64_t>c | <uint64_t>side
        epoll_ctl(e.epfd, EPOLL_CTL_MOD, c.fd[side], &ev)


cdef void kill_conn(Engine *e, Conn *c, int reason) noexcept nogil:
    """Closes both sockets now (pending bytes are dropped) and queues the close record."""
    cdef int d
    if c.dead:
        return
    c.dead = 1
    c.reason = reason
    if c.ssl != NULL:
        SSL_free(c.ssl)                 # does not close the fd
        c.ssl = NULL
        ERR_clear_error()               # the thread's OpenSSL error queue: nothing stale for the next
    for d in range(2):
        if c.fd[d] < 0:
            continue
        # Removed explicitly: close() alone leaves it registered while another fd (a dup, a child's
        # copy) still refers to the socket, and an event would then name freed memory.
        epoll_ctl(e.epfd, EPOLL_CTL_DEL, c.fd[d], NULL)
        close(c.fd[d])
        c.fd[d] = -1
        if c.buf[d] != NULL:
            free(c.buf[d])
            c.buf[d] = NULL
    e.dead_list[e.ndead] = c
    e.ndead += 1


cdef void resume_listeners(Engine *e) noexcept nogil:
    """Slots are free again: listeners paused while the table was full accept again."""
    cdef int i
    cdef Listener *l
    cdef epoll_event ev
    for i in range(e.nlisteners):
        l = e.listeners[i]
        if l.paused and not l.closed:
            l.paused = 0
            ev.events = EPOLLIN
            ev.data.u64 = <uint64_t>l | 2
            epoll_ctl(e.epfd, EPOLL_CTL_ADD, l.fd, &ev)
    e.npaused = 0


cdef void flush_dead(Engine *e) noexcept nogil:
    """After a batch: READY records (handshakes done) and close records to Python, slots back to the
    free list, memory freed."""
    cdef int i
    cdef Conn *c
    cdef CloseRecord *rec
    cdef uint64_t one = 1
    cdef int was_empty, queued = 0
    if e.ndead == 0 and e.nnotes == 0:
        return
    pthread_mutex_lock(&e.lock)
    was_empty = e.ring_len == 0
    for i in range(e.nnotes):
        c = e.notes[i].c
        if e.notes[i].kind == READY:
            if c.dead:
                continue                # died in the same batch: Python never hears of it
            c.announced = 1
        rec = &e.ring[(e.ring_head + e.ring_len) % (RING_PER_SLOT * e.capacity)]
        e.ring_len += 1
        queued += 1
        rec.id = c.id
        rec.bytes_in = e.notes[i].value
        # a failed connect: how long it took (bytes_in is its errno)
        rec.bytes_out = <uint64_t>(now_us() - c.connect_start) if e.notes[i].kind == CONNECT_FAILED else 0
        rec.reason = e.notes[i].kind
        rec.listener = c.listener
    e.nnotes = 0
    for i in range(e.ndead):
        c = e.dead_list[i]
        if c.announced:
            rec = &e.ring[(e.ring_head + e.ring_len) % (RING_PER_SLOT * e.capacity)]
            e.ring_len += 1
            queued += 1
            rec.id = c.id
            rec.bytes_in = c.nbytes[0]
            rec.bytes_out = c.nbytes[1]
            rec.reason = c.reason
            rec.listener = c.listener
        e.slots[c.slot] = NULL
        e.free_slots[e.nfree] = c.slot
        e.nfree += 1
        e.count -= 1
        free(c)
    e.ndead = 0
    if e.npaused:
        resume_listeners(e)
    if was_empty and queued and not e.polling:
        e.notified = 1
        write(e.notify_fd, &one, 8)
    pthread_mutex_unlock(&e.lock)


cdef inline ssize_t tls_write(Engine *e, Conn *c, const char *buf, uint32_t n) noexcept nogil:
    """SSL_write to the client: n, 0 when the socket is full (retry later with the same bytes), -1 on
    error."""
    cdef int w = SSL_write(c.ssl, buf, <int>n)
    cdef int err
    if w > 0:
        return w
    err = SSL_get_error(c.ssl, w)
    if err == SSL_ERROR_WANT_WRITE or err == SSL_ERROR_WANT_READ:
        return 0
    ERR_clear_error()
    return -1


cdef inline int flush_pending(Engine *e, Conn *c, int d) noexcept nogil:
    """Writes buf[d] to fd[1-d]. Returns 0 ok (maybe still pending), -1 error."""
    cdef ssize_t n
    if d == 1 and c.ssl != NULL:
        n = tls_write(e, c, c.buf[d] + c.off[d], c.len[d] - c.off[d])
        if n < 0:
            return -1
    else:
        n = send(c.fd[1 - d], c.buf[d] + c.off[d], c.len[d] - c.off[d], MSG_NOSIGNAL)
        if n < 0:
            if errno == EAGAIN or errno == EINTR:
                return 0
            return -1
    c.off[d] += n
    if c.off[d] == c.len[d]:
        free(c.buf[d])
        c.buf[d] = NULL
        c.len[d] = 0
        c.off[d] = 0
    return 0


cdef inline int maybe_shut(Engine *e, Conn *c, int d) noexcept nogil:
    """Direction d read its EOF and has nothing pending: shut the peer's write side. Returns 1 when
    both directions are done (the connection is finished). TLS has no half-close: the backend's end
    ends the connection, with a close_notify to the client."""
    if c.eof[d] and c.buf[d] == NULL and not c.shut[d]:
        c.shut[d] = 1
        if d == 1 and c.ssl != NULL:
            SSL_shutdown(c.ssl)          # one try: the close_notify goes out if the socket takes it
            return 1
        shutdown(c.fd[1 - d], SHUT_WR)
    return c.shut[0] and c.shut[1]


cdef inline ssize_t tls_read(Engine *e, Conn *c) noexcept nogil:
    """SSL_read from the client into the scratch buffer: bytes read, 0 at its end (close_notify or a
    FIN), -2 when nothing is there yet, -1 on error. A full record is followed by more reads while the
    scratch buffer has room (bulk uploads: fewer epoll rounds)."""
    cdef int n, err
    cdef ssize_t total = 0
    while True:
        n = SSL_read(c.ssl, e.scratch + total, <int>(SCRATCH - total))
        if n > 0:
            total += n
            if n < TLS_RECORD or SCRATCH - total < TLS_RECORD:
                return total
            continue
        err = SSL_get_error(c.ssl, n)
        if total:
            ERR_clear_error()
            return total            # what was read goes first; the condition shows again next time
        if err == SSL_ERROR_WANT_READ:
            return -2
        if err == SSL_ERROR_ZERO_RETURN:
            return 0
        if err == SSL_ERROR_WANT_WRITE:
            c.read_wants_write = 1  # e.g. a key update's answer: retried once the socket takes it
            return -2
        ERR_clear_error()
        return -1


cdef int on_readable(Engine *e, Conn *c, int d) noexcept nogil:
    """fd[d] is readable: one read into the scratch buffer, one write to the peer. Returns -1 when the
    connection was killed."""
    cdef ssize_t n, w
    cdef uint32_t rest
    if d == 0 and c.ssl != NULL:
        n = tls_read(e, c)
        if n == -2:
            if c.read_wants_write:
                set_mask(e, c, 0)
            return 0
        if n == -1:
            kill_conn(e, c, END_CLIENT)
            return -1
    else:
        # recv/send, not read/write: the socket calls skip the VFS layer (HAProxy's choice too)
        n = recv(c.fd[d], e.scratch, SCRATCH, 0)
        if n < 0:
            if errno == EAGAIN or errno == EINTR:
                return 0
            kill_conn(e, c, END_CLIENT if d == 0 else END_BACKEND)
            return -1
    if n == 0:
        c.eof[d] = 1
        if maybe_shut(e, c, d):
            kill_conn(e, c, END_BOTH)
            return -1
        set_mask(e, c, d)
        return 0
    c.nbytes[d] += n
    if d == 1 and c.ssl != NULL:
        w = tls_write(e, c, e.scratch, <uint32_t>n)
        if w < 0:
            kill_conn(e, c, END_CLIENT)
            return -1
    else:
        w = send(c.fd[1 - d], e.scratch, n, MSG_NOSIGNAL)
        if w < 0:
            if errno != EAGAIN and errno != EINTR:
                kill_conn(e, c, END_BACKEND if d == 0 else END_CLIENT)
                return -1
            w = 0
    if w < n:
        # The peer is full: keep the rest (allocated only now), stop reading this side until it drains.
        rest = <uint32_t>(n - w)
        c.buf[d] = <char *>malloc(rest)
        if c.buf[d] == NULL:
            kill_conn(e, c, END_ABORT)
            return -1
        memcpy(c.buf[d], e.scratch + w, rest)
        c.len[d] = rest
        c.off[d] = 0
        set_mask(e, c, d)
        set_mask(e, c, 1 - d)
    return 0


cdef inline void note(Engine *e, Conn *c, int kind, uint64_t value) noexcept nogil:
    e.notes[e.nnotes].c = c
    e.notes[e.nnotes].kind = kind
    e.notes[e.nnotes].value = value
    e.nnotes += 1


cdef inline int64_t now_us() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000 + ts.tv_nsec // 1000


cdef void connect_failed(Engine *e, Conn *c, int err) noexcept nogil:
    """The backend connect failed (or timed out): its socket goes, the client is parked again, and
    Python hears why (it counts the failure and tries the next candidate its own way)."""
    if c.fd[1] >= 0:
        epoll_ctl(e.epfd, EPOLL_CTL_DEL, c.fd[1], NULL)
        close(c.fd[1])
        c.fd[1] = -1
    c.mask[1] = 0
    c.removed[1] = 1
    if c.buf[0] != NULL:
        free(c.buf[0])
        c.buf[0] = NULL
        c.len[0] = 0
        c.off[0] = 0
    c.state = ST_PARKED
    note(e, c, CONNECT_FAILED, <uint64_t>err)


cdef void connect_done(Engine *e, Conn *c) noexcept nogil:
    """An event on a connecting backend socket: connected (relaying starts), or failed."""
    cdef int err = 0
    cdef socklen_t size = sizeof(err)
    if getsockopt(c.fd[1], SOL_SOCKET, SO_ERROR, &err, &size) < 0:
        err = errno
    if err:
        connect_failed(e, c, err)
        return
    c.state = ST_RELAY
    note(e, c, CONNECTED, <uint64_t>(now_us() - c.connect_start))
    set_mask(e, c, 0)
    set_mask(e, c, 1)
    if c.buf[0] == NULL:
        on_readable(e, c, 0)            # what the client sent after its handshake: relayed now


cdef void start_connect(Engine *e, Conn *c, Attach *a, int64_t now) noexcept nogil:
    cdef int fd, one = 1
    cdef epoll_event ev
    c.connect_start = now_us()
    fd = socket(a.addr.sin6_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        free(a.buf)
        note(e, c, CONNECT_FAILED, <uint64_t>errno)
        return
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
    c.fd[1] = fd
    c.buf[0] = a.buf
    c.len[0] = a.len
    c.off[0] = 0
    c.state = ST_CONNECTING
    c.deadline = now + a.timeout
    if connect(fd, <sockaddr *>&a.addr, a.addrlen) < 0 and errno != EINPROGRESS:
        connect_failed(e, c, errno)
        return
    c.removed[1] = 0
    c.mask[1] = EPOLLOUT
    ev.events = EPOLLOUT
    ev.data.u64 = <uint64_t>c | 1
    epoll_ctl(e.epfd, EPOLL_CTL_ADD, fd, &ev)


cdef void handshake(Engine *e, Conn *c) noexcept nogil:
    """One step of a TLS client's handshake; done, the connection is parked (out of epoll) and
    announced to Python with a READY record."""
    cdef int r = SSL_do_handshake(c.ssl)
    cdef int err
    cdef uint32_t want
    cdef epoll_event ev
    if r == 1:
        c.state = ST_PARKED
        if not c.removed[0]:
            epoll_ctl(e.epfd, EPOLL_CTL_DEL, c.fd[0], NULL)
            c.removed[0] = 1
            c.mask[0] = 0
        note(e, c, READY, 0)
        return
    err = SSL_get_error(c.ssl, r)
    if err == SSL_ERROR_WANT_READ:
        want = EPOLLIN
    elif err == SSL_ERROR_WANT_WRITE:
        want = EPOLLOUT
    else:
        kill_conn(e, c, END_CLIENT)     # not announced: no record, Python never knew it
        return
    ev.events = want
    ev.data.u64 = <uint64_t>c
    if c.removed[0]:
        c.removed[0] = 0
        c.mask[0] = want
        epoll_ctl(e.epfd, EPOLL_CTL_ADD, c.fd[0], &ev)
    elif c.mask[0] != want:
        c.mask[0] = want
        epoll_ctl(e.epfd, EPOLL_CTL_MOD, c.fd[0], &ev)


cdef Conn *take_slot(Engine *e) noexcept nogil:
    """A zeroed connection in a free slot with a fresh id (lock held), or NULL when full / no memory."""
    cdef Conn *c
    cdef int slot
    if e.nfree == 0:
        return NULL
    c = <Conn *>calloc(1, sizeof(Conn))
    if c == NULL:
        return NULL
    e.nfree -= 1
    slot = e.free_slots[e.nfree]
    c.slot = slot
    c.id = (e.next_serial << 32) | <uint64_t>slot
    e.next_serial += 1
    e.slots[slot] = c
    e.count += 1
    c.listener = -1
    return c


cdef void on_accept(Engine *e, Listener *l, int64_t now) noexcept nogil:
    """A TLS listener is readable: accepts a batch, starts each handshake."""
    cdef int i, fd, one = 1
    cdef Conn *c
    cdef socklen_t size
    cdef sockaddr_in6 peer
    for i in range(ACCEPT_BATCH):
        if l.closed:
            return
        size = sizeof(sockaddr_in6)
        fd = accept4(l.fd, <sockaddr *>&peer, &size, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if fd < 0:
            if errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                # Out of files or memory: level-triggered, the listener would spin; it rests until a
                # connection ends or the next sweep.
                pthread_mutex_lock(&e.lock)
                if not l.paused:
                    l.paused = 1
                    e.npaused += 1
                    epoll_ctl(e.epfd, EPOLL_CTL_DEL, l.fd, NULL)
                pthread_mutex_unlock(&e.lock)
            return                      # EAGAIN (another worker was faster), or an error to retry later
        pthread_mutex_lock(&e.lock)
        c = take_slot(e)
        if c == NULL and e.nfree == 0:
            # Full: this one is refused, and the listener waits for a free slot.
            l.paused = 1
            e.npaused += 1
            epoll_ctl(e.epfd, EPOLL_CTL_DEL, l.fd, NULL)
        pthread_mutex_unlock(&e.lock)
        if c == NULL:
            close(fd)
            return
        c.fd[0] = fd
        c.fd[1] = -1
        c.peer = peer
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        c.listener = l.index
        c.state = ST_HANDSHAKE
        c.removed[0] = 1                # registered by the first handshake step that must wait
        c.last_active = now
        c.deadline = now + l.handshake_timeout
        c.ssl = SSL_new(l.ctx)
        if c.ssl == NULL or SSL_set_fd(c.ssl, fd) != 1:
            kill_conn(e, c, END_ABORT)
            continue
        SSL_set_accept_state(c.ssl)
        handshake(e, c)                 # the ClientHello is usually there already


cdef void take_attaches(Engine *e, int64_t now) noexcept nogil:
    """Backends Python connected for parked TLS connections (lock held): relaying starts."""
    cdef int i, slot
    cdef Attach *a
    cdef Conn *c
    for i in range(e.nattaches):
        a = &e.attaches[i]
        slot = <int>(a.id & 0xFFFFFFFFu)
        c = e.slots[slot] if slot < e.capacity else NULL
        if c == NULL or c.id != a.id or c.dead or c.state != ST_PARKED:
            if a.fd >= 0:
                close(a.fd)             # cut meanwhile: its close record is on its way
            free(a.buf)
            free(a.back)
            continue
        if a.fd < 0:
            start_connect(e, c, a, now)
            continue
        c.state = ST_RELAY
        c.fd[1] = a.fd
        c.buf[0] = a.buf
        c.len[0] = a.len
        c.buf[1] = a.back
        c.len[1] = a.back_len
        c.eof[1] = a.back_eof
        c.removed[1] = 1
        c.last_active = now
        if c.eof[1] and c.buf[1] == NULL:
            maybe_shut(e, c, 1)         # TLS: the backend's end is the connection's end
            kill_conn(e, c, END_BOTH)
            continue
        set_mask(e, c, 0)
        set_mask(e, c, 1)
        if c.buf[0] == NULL:
            # The client usually spoke right after its handshake: relay that now rather than after
            # another epoll round (and bytes OpenSSL may already hold would not show in epoll at all).
            on_readable(e, c, 0)
    e.nattaches = 0


cdef void sweep(Engine *e, int64_t now) noexcept nogil:
    """Aborts and attaches requested by Python, TLS handshakes out of time, and (coarsely) connections
    idle both ways for idle_timeout."""
    cdef int i, slot
    cdef Conn *c
    cdef uint64_t id
    pthread_mutex_lock(&e.lock)
    if e.abort_all:
        e.abort_all = 0
        for i in range(e.capacity):
            c = e.slots[i]
            if c != NULL and not c.dead:
                kill_conn(e, c, END_ABORT)
    for i in range(e.naborts):
        id = e.aborts[i]
        slot = <int>(id & 0xFFFFFFFFu)
        c = e.slots[slot] if slot < e.capacity else NULL
        if c != NULL and c.id == id and not c.dead:
            kill_conn(e, c, END_ABORT)
    e.naborts = 0
    take_attaches(e, now)
    for i in range(e.nlisteners):
        if e.listeners[i].closed and e.listeners[i].fd >= 0:
            # Closed here, in the only thread that accepts on it: no accept can race with the close.
            epoll_ctl(e.epfd, EPOLL_CTL_DEL, e.listeners[i].fd, NULL)
            close(e.listeners[i].fd)
            e.listeners[i].fd = -1
    if now - e.last_sweep >= e.sweep_ms and (e.idle_timeout or e.nlisteners):
        e.last_sweep = now
        if e.npaused:
            resume_listeners(e)         # paused for want of files: try again
        for i in range(e.capacity):
            c = e.slots[i]
            if c == NULL or c.dead:
                continue
            if c.state == ST_HANDSHAKE:
                if now >= c.deadline:
                    kill_conn(e, c, END_IDLE)
            elif c.state == ST_CONNECTING:
                if now >= c.deadline:
                    connect_failed(e, c, ETIMEDOUT)
            elif c.state == ST_RELAY and e.idle_timeout and now - c.last_active >= e.idle_timeout:
                kill_conn(e, c, END_IDLE)
    pthread_mutex_unlock(&e.lock)


cdef void run_events(Engine *e, epoll_event *events, int n, int64_t now) noexcept nogil:
    """One batch of epoll events, then the records it produced and, when due, a sweep."""
    cdef int i, d
    cdef uint64_t tag
    cdef uint32_t ev
    cdef Conn *c
    cdef uint64_t counter
    for i in range(n):
        tag = events[i].data.u64
        if tag == 0:
            read(e.wake_fd, &counter, 8)
            sweep(e, now)
            continue
        if tag & 2:
            on_accept(e, <Listener *>(tag & ~(<uint64_t>3)), now)
            continue
        c = <Conn *>(tag & ~(<uint64_t>1))
        d = <int>(tag & 1)
        if c.dead:
            continue
        ev = events[i].events
        c.last_active = now
        if c.state == ST_HANDSHAKE:
            handshake(e, c)
            continue
        if c.state == ST_CONNECTING:
            connect_done(e, c)          # only the backend socket is in epoll meanwhile
            continue
        if ev & EPOLLOUT:
            # fd[d] can take what the other direction kept.
            if c.buf[1 - d] != NULL:
                if flush_pending(e, c, 1 - d) < 0:
                    kill_conn(e, c, END_CLIENT if d == 0 else END_BACKEND)
                    continue
                if c.buf[1 - d] == NULL:
                    if maybe_shut(e, c, 1 - d):
                        kill_conn(e, c, END_BOTH)
                        continue
                    set_mask(e, c, d)
                    set_mask(e, c, 1 - d)
            if d == 0 and c.read_wants_write:
                c.read_wants_write = 0
                set_mask(e, c, 0)
                if on_readable(e, c, 0) < 0:
                    continue
        if ev & (EPOLLIN | EPOLLERR | EPOLLHUP):
            if c.mask[d] & EPOLLIN:
                on_readable(e, c, d)
            elif ev & EPOLLERR:
                kill_conn(e, c, END_CLIENT if d == 0 else END_BACKEND)
            elif not c.removed[d]:
                # A hang-up (both ways shut) on a side we do not read: level-triggered, it would be
                # reported again and again. What it sent may still be waiting for its peer, so the
                # connection lives on; the fd leaves epoll until it is wanted again.
                epoll_ctl(e.epfd, EPOLL_CTL_DEL, c.fd[d], NULL)
                c.removed[d] = 1
                c.mask[d] = 0
    flush_dead(e)
    if (e.idle_timeout or e.nlisteners) and now - e.last_sweep >= e.sweep_ms:
        sweep(e, now)
        flush_dead(e)


cdef void *relay_main(void *arg) noexcept nogil:
    cdef Engine *e = <Engine *>arg
    cdef epoll_event events[MAX_EVENTS]
    cdef int n
    cdef sigset_t all_signals
    sigfillset(&all_signals)
    pthread_sigmask(SIG_BLOCK, &all_signals, NULL)     # signals stay with the Python thread
    while not e.stop:
        n = epoll_wait(e.epfd, events, MAX_EVENTS, e.sweep_ms)
        run_events(e, events, n if n > 0 else 0, now_ms())
    return NULL


cdef object address(sockaddr_in6 *sa):
    """A socket address as Python's socket module gives it: (host, port) or (host, port, flow, scope)."""
    cdef char text[64]
    cdef sockaddr_in *sa4
    if sa.sin6_family == AF_INET:
        sa4 = <sockaddr_in *>sa
        inet_ntop(AF_INET, &sa4.sin_addr, text, sizeof(text))
        return (text.decode(), ntohs(sa4.sin_port))
    if sa.sin6_family == AF_INET6:
        inet_ntop(AF_INET6, &sa.sin6_addr, text, sizeof(text))
        return (text.decode(), ntohs(sa.sin6_port), ntohl(sa.sin6_flowinfo), sa.sin6_scope_id)
    return None


cdef void post_attaches(Engine *e) noexcept:
    """With e.lock held and attaches queued: the engine takes them now (inline, in this thread) or is
    woken for them (its thread); releases the lock."""
    cdef uint64_t one = 1
    if e.inline:
        take_attaches(e, now_ms())          # this thread runs the engine: no wake-up needed
        pthread_mutex_unlock(&e.lock)
        flush_dead(e)
        return
    pthread_mutex_unlock(&e.lock)
    write(e.wake_fd, &one, 8)


cdef class Relay:
    """The relay thread of one worker. `capacity`: most connections at once; `idle_timeout` seconds
    (0: never), swept about every `sweep_interval` seconds."""

    cdef Engine *e
    cdef pthread_t thread
    cdef bint started
    cdef list contexts              # the ServerContexts listeners use: alive as long as the relay

    def __cinit__(self, int capacity, double idle_timeout=0.0, double sweep_interval=1.0):
        cdef Engine *e = <Engine *>calloc(1, sizeof(Engine))
        cdef epoll_event ev
        cdef int i
        if e == NULL:
            raise MemoryError()
        self.e = e
        e.epfd = e.wake_fd = e.notify_fd = -1
        e.capacity = capacity
        e.slots = <Conn **>calloc(capacity, sizeof(Conn *))
        e.free_slots = <int *>malloc(capacity * sizeof(int))
        # A TLS connection has up to three records (READY, its connect's outcome, its end) waiting.
        e.ring = <CloseRecord *>malloc(RING_PER_SLOT * capacity * sizeof(CloseRecord))
        e.aborts = <uint64_t *>malloc(capacity * sizeof(uint64_t))
        e.dead_list = <Conn **>malloc(capacity * sizeof(Conn *))
        e.notes = <Note *>malloc(capacity * sizeof(Note))
        e.attaches = <Attach *>malloc(capacity * sizeof(Attach))
        e.scratch = <char *>malloc(SCRATCH)
        if (e.slots == NULL or e.free_slots == NULL or e.ring == NULL or e.aborts == NULL
                or e.dead_list == NULL or e.notes == NULL or e.attaches == NULL or e.scratch == NULL):
            raise MemoryError()
        for i in range(capacity):
            e.free_slots[i] = capacity - 1 - i
        e.nfree = capacity
        pthread_mutex_init(&e.lock, NULL)
        e.idle_timeout = <int64_t>(idle_timeout * 1000) if idle_timeout > 0 else 0
        e.sweep_ms = max(20, <int>(sweep_interval * 1000)) if e.idle_timeout else -1
        e.last_sweep = now_ms()
        e.epfd = epoll_create1(EPOLL_CLOEXEC)
        e.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        e.notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if e.epfd < 0 or e.wake_fd < 0 or e.notify_fd < 0:
            raise OSError(errno, "relay: epoll/eventfd")
        ev.events = EPOLLIN
        ev.data.u64 = 0
        epoll_ctl(e.epfd, EPOLL_CTL_ADD, e.wake_fd, &ev)
        e.next_serial = 1
        self.contexts = []

    cdef bint inline

    def start(self, bint inline=False):
        """Starts the relay thread; `inline`: no thread, the caller runs the engine with `poll()` when
        `epoll_fd` is readable (and about every sweep interval): on a single CPU a second thread only adds
        context switches and wake-ups between the two."""
        if self.started:
            return
        self.inline = inline
        self.e.inline = inline
        if not inline and pthread_create(&self.thread, NULL, relay_main, self.e) != 0:
            raise OSError("relay: cannot start thread")
        self.started = True

    @property
    def sweep_interval(self):
        """Seconds between sweeps (idle connections, handshake and connect deadlines); 0: none needed.
        Inline mode: how often to call poll() at least."""
        return self.e.sweep_ms / 1000.0 if self.e.sweep_ms > 0 else 0.0

    @property
    def epoll_fd(self):
        """Inline mode: readable when the engine has events to run (`poll()`)."""
        return self.e.epfd

    def poll(self):
        """Inline mode: runs the events ready (without waiting), then the sweep when due. Returns the
        records waiting (as `closed()`), or None when there are none: the common case of a batch of
        relayed chunks costs no list."""
        cdef Engine *e = self.e
        cdef epoll_event events[MAX_EVENTS]
        cdef int n
        e.polling = 1
        with nogil:
            n = epoll_wait(e.epfd, events, MAX_EVENTS, 0)
            run_events(e, events, n if n > 0 else 0, now_ms())
        e.polling = 0
        if e.ring_len == 0 and not e.notified:     # only this thread adds records in inline mode
            return None
        return self.closed()

    @property
    def notify_fd(self):
        """Readable when close records are waiting: pass to loop.add_reader, then call closed()."""
        return self.e.notify_fd

    @property
    def count(self):
        return self.e.count

    def add(self, int client_fd, int backend_fd, bytes to_backend=None, bint client_eof=False):
        """Takes ownership of two connected non-blocking sockets; returns the connection's id, or 0 when
        the relay is full (the fds are then still the caller's). `to_backend`: bytes to send the backend
        first (PROXY header, what the client sent early); `client_eof`: the client already half-closed."""
        cdef Engine *e = self.e
        cdef Conn *c
        cdef epoll_event ev
        cdef Py_ssize_t size = 0
        cdef int d
        if to_backend is not None:
            size = PyBytes_GET_SIZE(to_backend)
        cdef char *first = NULL
        if size:
            first = <char *>malloc(size)
            if first == NULL:
                return 0
            memcpy(first, PyBytes_AS_STRING(to_backend), size)
        pthread_mutex_lock(&e.lock)
        c = take_slot(e)
        if c == NULL:
            pthread_mutex_unlock(&e.lock)
            free(first)
            return 0
        c.fd[0] = client_fd
        c.fd[1] = backend_fd
        c.announced = 1
        c.last_active = now_ms()
        if size:
            c.buf[0] = first
            c.len[0] = <uint32_t>size
        c.eof[0] = client_eof
        if client_eof and c.buf[0] == NULL:
            c.shut[0] = 1                   # nothing to send first: forward the client's EOF now
            shutdown(backend_fd, SHUT_WR)
        c.mask[0] = (EPOLLIN if not c.eof[0] and c.buf[0] == NULL else 0)
        c.mask[1] = EPOLLIN | (EPOLLOUT if c.buf[0] != NULL else 0)
        # Registered last: from here on the relay thread owns the connection.
        for d in range(2):
            ev.events = c.mask[d]
            ev.data.u64 = <uint64_t>c | <uint64_t>d
            epoll_ctl(e.epfd, EPOLL_CTL_ADD, c.fd[d], &ev)
        pthread_mutex_unlock(&e.lock)
        return c.id

    def listen(self, int fd, ServerContext context, double handshake_timeout):
        """Accepts TLS clients on the listening socket `fd` (non-blocking) in the relay thread, with
        `context`; the relay works on its own duplicate of `fd`. Returns the listener's index (READY
        records name it)."""
        cdef Engine *e = self.e
        cdef Listener *l
        cdef epoll_event ev
        cdef int deadline_ms
        if e.nlisteners >= MAX_LISTENERS:
            raise ValueError("relay: too many TLS listeners")
        fd = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        if fd < 0:
            raise OSError(errno, "relay: dup of the listening socket")
        l = <Listener *>calloc(1, sizeof(Listener))
        if l == NULL:
            close(fd)
            raise MemoryError()
        l.fd = fd
        l.ctx = context.conf.front
        l.handshake_timeout = <int64_t>(handshake_timeout * 1000)
        self.contexts.append(context)
        pthread_mutex_lock(&e.lock)
        l.index = e.nlisteners
        e.listeners[e.nlisteners] = l
        e.nlisteners += 1
        # Handshake and connect deadlines are checked about 5 times per timeout (at least every second,
        # at most every 100 ms).
        deadline_ms = max(100, min(1000, <int>(handshake_timeout * 200)))
        if e.sweep_ms < 0 or e.sweep_ms > deadline_ms:
            e.sweep_ms = deadline_ms
        ev.events = EPOLLIN
        ev.data.u64 = <uint64_t>l | 2
        epoll_ctl(e.epfd, EPOLL_CTL_ADD, fd, &ev)
        pthread_mutex_unlock(&e.lock)
        return l.index

    def unlisten(self, int index):
        """Stops accepting on a listener (drain): the relay's duplicate of the socket is closed by the
        thread; connections go on."""
        cdef Engine *e = self.e
        cdef uint64_t one = 1
        pthread_mutex_lock(&e.lock)
        if 0 <= index < e.nlisteners:
            e.listeners[index].closed = 1
        pthread_mutex_unlock(&e.lock)
        if self.started:
            write(e.wake_fd, &one, 8)
        else:
            sweep(e, now_ms())

    def connect(self, uint64_t conn_id, str host, int port, bytes to_backend=None, double timeout=5.0):
        """Connects a parked TLS connection to the backend at `host` (an IPv4 or IPv6 address) and
        `port`, from the thread; `to_backend`: bytes to send it first (PROXY header). The outcome comes
        back as a CONNECTED record (relaying has started) or a CONNECT_FAILED one (the connection is
        parked again). Raises ValueError when host is not an address."""
        cdef Engine *e = self.e
        cdef Py_ssize_t size = 0 if to_backend is None else PyBytes_GET_SIZE(to_backend)
        cdef char *first = NULL
        cdef sockaddr_in6 addr
        cdef sockaddr_in *addr4 = <sockaddr_in *>&addr
        cdef socklen_t addrlen
        cdef bytes text = host.encode()
        cdef Attach *a
        memset(&addr, 0, sizeof(addr))
        if inet_pton(AF_INET, text, &addr4.sin_addr) == 1:
            addr4.sin_family = AF_INET
            addr4.sin_port = htons(port)
            addrlen = sizeof(sockaddr_in)
        elif inet_pton(AF_INET6, text, &addr.sin6_addr) == 1:
            addr.sin6_family = AF_INET6
            addr.sin6_port = htons(port)
            addrlen = sizeof(sockaddr_in6)
        else:
            raise ValueError(f"not an IP address: {host!r}")
        if size:
            first = <char *>malloc(size)
            if first == NULL:
                raise MemoryError()
            memcpy(first, PyBytes_AS_STRING(to_backend), size)
        pthread_mutex_lock(&e.lock)
        if e.nattaches >= e.capacity:
            pthread_mutex_unlock(&e.lock)
            free(first)
            raise MemoryError("relay: request queue full")
        a = &e.attaches[e.nattaches]
        a.id = conn_id
        a.fd = -1
        a.addr = addr
        a.addrlen = addrlen
        a.timeout = <int64_t>(timeout * 1000)
        a.buf = first
        a.len = <uint32_t>size
        a.back = NULL
        a.back_len = 0
        a.back_eof = 0
        e.nattaches += 1
        post_attaches(e)

    def attach(self, uint64_t conn_id, int backend_fd, bytes to_backend=None, bytes to_client=None,
               bint backend_eof=False):
        """Hands the backend socket (connected, non-blocking; ownership passes) to a parked TLS
        connection: relaying starts. `to_backend`: bytes to send it first (PROXY header); `to_client`:
        what the backend already sent (a greeting), `backend_eof`: and it half-closed. If the connection
        was cut meanwhile, the thread closes the socket (the close record is on its way)."""
        cdef Engine *e = self.e
        cdef Py_ssize_t size = 0 if to_backend is None else PyBytes_GET_SIZE(to_backend)
        cdef Py_ssize_t back = 0 if to_client is None else PyBytes_GET_SIZE(to_client)
        cdef char *first = NULL
        cdef char *greeting = NULL
        cdef Attach *a
        if size:
            first = <char *>malloc(size)
            if first == NULL:
                raise MemoryError()
            memcpy(first, PyBytes_AS_STRING(to_backend), size)
        if back:
            greeting = <char *>malloc(back)
            if greeting == NULL:
                free(first)
                raise MemoryError()
            memcpy(greeting, PyBytes_AS_STRING(to_client), back)
        pthread_mutex_lock(&e.lock)
        if e.nattaches >= e.capacity or e.naborts >= e.capacity:
            # Cannot happen (one attach per parked connection, each holding a slot): cut it, safely.
            pthread_mutex_unlock(&e.lock)
            close(backend_fd)
            free(first)
            free(greeting)
            self.abort(conn_id)
            return
        a = &e.attaches[e.nattaches]
        a.id = conn_id
        a.fd = backend_fd
        a.buf = first
        a.len = <uint32_t>size
        a.back = greeting
        a.back_len = <uint32_t>back
        a.back_eof = backend_eof
        e.nattaches += 1
        post_attaches(e)

    def abort(self, uint64_t conn_id):
        """Cuts one connection (pending bytes dropped); its close record follows."""
        cdef Engine *e = self.e
        cdef uint64_t one = 1
        pthread_mutex_lock(&e.lock)
        if e.naborts < e.capacity:
            e.aborts[e.naborts] = conn_id
            e.naborts += 1
        pthread_mutex_unlock(&e.lock)
        write(e.wake_fd, &one, 8)

    def abort_all(self):
        cdef Engine *e = self.e
        cdef uint64_t one = 1
        pthread_mutex_lock(&e.lock)
        e.abort_all = 1
        pthread_mutex_unlock(&e.lock)
        write(e.wake_fd, &one, 8)

    cdef object _peer(self, uint64_t conn_id):
        """A parked TLS connection's client address (None: gone already). Parked, the thread leaves it
        alone; the lock keeps it from being freed meanwhile."""
        cdef Conn *c = self._find(conn_id)
        cdef object peer = None
        if c != NULL:
            peer = address(&c.peer)
        pthread_mutex_unlock(&self.e.lock)
        return peer

    cdef Conn *_find(self, uint64_t conn_id):
        """The parked TLS connection `conn_id`, or NULL; returns with the lock held either way."""
        cdef Engine *e = self.e
        cdef int slot = <int>(conn_id & 0xFFFFFFFFu)
        cdef Conn *c
        pthread_mutex_lock(&e.lock)
        c = e.slots[slot] if slot < e.capacity else NULL
        if c == NULL or c.id != conn_id or c.dead or c.state != ST_PARKED:
            return NULL
        return c

    def local_address(self, uint64_t conn_id):
        """The local address of a parked TLS connection (for a PROXY header), or None."""
        cdef Conn *c = self._find(conn_id)
        cdef sockaddr_in6 local
        cdef socklen_t size = sizeof(sockaddr_in6)
        cdef object out = None
        if c != NULL and getsockname(c.fd[0], <sockaddr *>&local, &size) == 0:
            out = address(&local)
        pthread_mutex_unlock(&self.e.lock)
        return out

    def closed(self):
        """The records waiting: a list of (id, bytes_in, bytes_out, reason) for ends; for TLS handshakes
        done (reason READY, 5): (id, client address or None, None, READY, listener); for connects asked
        with connect(): (id, microseconds, 0, CONNECTED) or (id, errno, microseconds, CONNECT_FAILED)."""
        cdef Engine *e = self.e
        cdef uint64_t counter
        cdef list out = []
        cdef CloseRecord rec
        cdef int notified
        pthread_mutex_lock(&e.lock)
        notified = e.notified           # set (under the lock) only once its write is done
        e.notified = 0
        pthread_mutex_unlock(&e.lock)
        if notified:
            read(e.notify_fd, &counter, 8)
        while True:
            pthread_mutex_lock(&e.lock)
            if e.ring_len == 0:
                pthread_mutex_unlock(&e.lock)
                break
            rec = e.ring[e.ring_head]
            e.ring_head = (e.ring_head + 1) % (RING_PER_SLOT * e.capacity)
            e.ring_len -= 1
            pthread_mutex_unlock(&e.lock)
            if rec.reason == READY:
                out.append((rec.id, self._peer(rec.id), None, READY, rec.listener))
            else:
                out.append((rec.id, rec.bytes_in, rec.bytes_out, rec.reason))
        return out

    def stop(self):
        """Stops the thread; connections still relayed are closed (their records stay readable)."""
        cdef Engine *e = self.e
        cdef uint64_t one = 1
        if not self.started:
            return
        pthread_mutex_lock(&e.lock)
        e.abort_all = 1
        e.stop = 1
        pthread_mutex_unlock(&e.lock)
        if self.inline:
            sweep(e, now_ms())
            flush_dead(e)
        else:
            write(e.wake_fd, &one, 8)
            with nogil:
                pthread_join(self.thread, NULL)
        self.started = False

    def __dealloc__(self):
        cdef Engine *e = self.e
        cdef int i
        if e == NULL:
            return
        if self.started:
            self.stop()
        if e.slots != NULL:
            for i in range(e.capacity):
                if e.slots[i] != NULL:
                    kill_conn(e, e.slots[i], END_ABORT)
            e.ndead = 0
            for i in range(e.capacity):
                if e.slots[i] != NULL:
                    free(e.slots[i])
        for fd in (e.epfd, e.wake_fd, e.notify_fd):
            if fd >= 0:
                close(fd)
        for i in range(e.nattaches):
            close(e.attaches[i].fd)
            free(e.attaches[i].buf)
            free(e.attaches[i].back)
        for i in range(e.nlisteners):
            if e.listeners[i].fd >= 0:
                close(e.listeners[i].fd)
            free(e.listeners[i])
        free(e.slots); free(e.free_slots); free(e.ring); free(e.aborts); free(e.dead_list)
        free(e.notes); free(e.attaches); free(e.scratch)
        pthread_mutex_destroy(&e.lock)
        free(e)
