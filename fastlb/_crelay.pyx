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
"""
from libc.stdlib cimport malloc, free, calloc
from libc.string cimport memcpy, memset
from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport uint64_t, uint32_t, int64_t
from posix.unistd cimport read, write, close
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLL_CTL_DEL, EPOLL_CLOEXEC

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK, EFD_CLOEXEC

cdef extern from "<sys/socket.h>" nogil:
    int shutdown(int fd, int how)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    enum:
        SHUT_WR, MSG_NOSIGNAL

cdef extern from "<time.h>" nogil:
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    enum:
        CLOCK_MONOTONIC_COARSE

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

DEF SCRATCH = 65536
DEF MAX_EVENTS = 256

# Why a connection ended (the close records' reason).
cdef enum:
    END_BOTH = 0          # both directions finished (half-closes)
    END_CLIENT = 1        # error or reset on the client socket
    END_BACKEND = 2       # error or reset on the backend socket
    END_IDLE = 3          # idle both ways for idle_timeout
    END_ABORT = 4         # cut by Python (shutdown), or out of memory

REASONS = ("both", "client", "backend", "idle", "abort")

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

cdef struct CloseRecord:
    uint64_t id
    uint64_t bytes_in
    uint64_t bytes_out
    int reason

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


cdef inline int64_t now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)     # vDSO, no syscall; ~4 ms resolution
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef inline void set_mask(Engine *e, Conn *c, int side) noexcept nogil:
    """Registers the interest fd[side] needs now: IN while its direction may read, OUT while the other
    direction has bytes waiting for it."""
    cdef uint32_t want = 0
    cdef epoll_event ev
    if not c.eof[side] and c.buf[side] == NULL:
        want |= EPOLLIN
    if c.buf[1 - side] != NULL:
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
    cdef CloseRecord *rec
    cdef uint64_t one = 1
    if c.dead:
        return
    c.dead = 1
    c.reason = reason
    for d in range(2):
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


cdef void flush_dead(Engine *e) noexcept nogil:
    """After a batch: close records to Python, slots back to the free list, memory freed."""
    cdef int i
    cdef Conn *c
    cdef CloseRecord *rec
    cdef uint64_t one = 1
    cdef int was_empty
    if e.ndead == 0:
        return
    pthread_mutex_lock(&e.lock)
    was_empty = e.ring_len == 0
    for i in range(e.ndead):
        c = e.dead_list[i]
        rec = &e.ring[(e.ring_head + e.ring_len) % e.capacity]
        e.ring_len += 1
        rec.id = c.id
        rec.bytes_in = c.nbytes[0]
        rec.bytes_out = c.nbytes[1]
        rec.reason = c.reason
        e.slots[c.slot] = NULL
        e.free_slots[e.nfree] = c.slot
        e.nfree += 1
        e.count -= 1
        free(c)
    e.ndead = 0
    pthread_mutex_unlock(&e.lock)
    if was_empty:
        write(e.notify_fd, &one, 8)


cdef inline int flush_pending(Engine *e, Conn *c, int d) noexcept nogil:
    """Writes buf[d] to fd[1-d]. Returns 0 ok (maybe still pending), -1 error."""
    cdef ssize_t n = send(c.fd[1 - d], c.buf[d] + c.off[d], c.len[d] - c.off[d], MSG_NOSIGNAL)
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
    both directions are done (the connection is finished)."""
    if c.eof[d] and c.buf[d] == NULL and not c.shut[d]:
        c.shut[d] = 1
        shutdown(c.fd[1 - d], SHUT_WR)
    return c.shut[0] and c.shut[1]


cdef int on_readable(Engine *e, Conn *c, int d) noexcept nogil:
    """fd[d] is readable: one read into the scratch buffer, one write to the peer. Returns -1 when the
    connection was killed."""
    cdef ssize_t n, w
    cdef uint32_t rest
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


cdef void sweep(Engine *e, int64_t now) noexcept nogil:
    """Aborts requested by Python, and (coarsely) connections idle both ways for idle_timeout."""
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
    if e.idle_timeout and now - e.last_sweep >= e.sweep_ms:
        e.last_sweep = now
        for i in range(e.capacity):
            c = e.slots[i]
            if c != NULL and not c.dead and now - c.last_active >= e.idle_timeout:
                kill_conn(e, c, END_IDLE)
    pthread_mutex_unlock(&e.lock)


cdef void *relay_main(void *arg) noexcept nogil:
    cdef Engine *e = <Engine *>arg
    cdef epoll_event events[MAX_EVENTS]
    cdef int n, i, d
    cdef uint64_t tag
    cdef uint32_t ev
    cdef Conn *c
    cdef int64_t now
    cdef uint64_t counter
    cdef sigset_t all_signals
    sigfillset(&all_signals)
    pthread_sigmask(SIG_BLOCK, &all_signals, NULL)     # signals stay with the Python thread
    while True:
        n = epoll_wait(e.epfd, events, MAX_EVENTS, e.sweep_ms)
        now = now_ms()
        for i in range(n):
            tag = events[i].data.u64
            if tag == 0:
                read(e.wake_fd, &counter, 8)
                sweep(e, now)
                continue
            c = <Conn *>(tag & ~(<uint64_t>1))
            d = <int>(tag & 1)
            if c.dead:
                continue
            ev = events[i].events
            c.last_active = now
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
        if e.stop:
            break
        if e.idle_timeout and now - e.last_sweep >= e.sweep_ms:
            sweep(e, now)
            flush_dead(e)
    return NULL


cdef class Relay:
    """The relay thread of one worker. `capacity`: most connections at once; `idle_timeout` seconds
    (0: never), swept about every `sweep_interval` seconds."""

    cdef Engine *e
    cdef pthread_t thread
    cdef bint started
    cdef uint64_t next_serial

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
        e.ring = <CloseRecord *>malloc(capacity * sizeof(CloseRecord))
        e.aborts = <uint64_t *>malloc(capacity * sizeof(uint64_t))
        e.dead_list = <Conn **>malloc(capacity * sizeof(Conn *))
        e.scratch = <char *>malloc(SCRATCH)
        if (e.slots == NULL or e.free_slots == NULL or e.ring == NULL or e.aborts == NULL
                or e.dead_list == NULL or e.scratch == NULL):
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
        self.next_serial = 1

    def start(self):
        if self.started:
            return
        if pthread_create(&self.thread, NULL, relay_main, self.e) != 0:
            raise OSError("relay: cannot start thread")
        self.started = True

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
        cdef int d, slot
        if to_backend is not None:
            size = PyBytes_GET_SIZE(to_backend)
        c = <Conn *>calloc(1, sizeof(Conn))
        if c == NULL:
            return 0
        c.fd[0] = client_fd
        c.fd[1] = backend_fd
        c.last_active = now_ms()
        if size:
            c.buf[0] = <char *>malloc(size)
            if c.buf[0] == NULL:
                free(c)
                return 0
            memcpy(c.buf[0], PyBytes_AS_STRING(to_backend), size)
            c.len[0] = <uint32_t>size
        c.eof[0] = client_eof
        if client_eof and c.buf[0] == NULL:
            c.shut[0] = 1                   # nothing to send first: forward the client's EOF now
            shutdown(backend_fd, SHUT_WR)
        c.mask[0] = (EPOLLIN if not c.eof[0] and c.buf[0] == NULL else 0)
        c.mask[1] = EPOLLIN | (EPOLLOUT if c.buf[0] != NULL else 0)
        pthread_mutex_lock(&e.lock)
        if e.nfree == 0:
            pthread_mutex_unlock(&e.lock)
            if c.buf[0] != NULL:
                free(c.buf[0])
            free(c)
            return 0
        e.nfree -= 1
        slot = e.free_slots[e.nfree]
        c.slot = slot
        c.id = (self.next_serial << 32) | <uint64_t>slot
        self.next_serial += 1
        e.slots[slot] = c
        e.count += 1
        # Registered last: from here on the relay thread owns the connection.
        for d in range(2):
            ev.events = c.mask[d]
            ev.data.u64 = <uint64_t>c | <uint64_t>d
            epoll_ctl(e.epfd, EPOLL_CTL_ADD, c.fd[d], &ev)
        pthread_mutex_unlock(&e.lock)
        return c.id

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

    def closed(self):
        """The close records waiting: a list of (id, bytes_in, bytes_out, reason)."""
        cdef Engine *e = self.e
        cdef uint64_t counter
        cdef list out = []
        cdef CloseRecord rec
        read(e.notify_fd, &counter, 8)
        while True:
            pthread_mutex_lock(&e.lock)
            if e.ring_len == 0:
                pthread_mutex_unlock(&e.lock)
                break
            rec = e.ring[e.ring_head]
            e.ring_head = (e.ring_head + 1) % e.capacity
            e.ring_len -= 1
            pthread_mutex_unlock(&e.lock)
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
        free(e.slots); free(e.free_slots); free(e.ring); free(e.aborts); free(e.dead_list)
        free(e.scratch)
        pthread_mutex_destroy(&e.lock)
        free(e)
