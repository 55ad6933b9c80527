# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The access log's formatter and writer: lines formatted in C into a buffer on the event loop, written
to the file by a thread of their own, so the loop never waits for the disk.

Both HTTP data paths log through one `LogWriter` per worker: the C engine (fastlb/http/_fast.pyx) calls
`line()` with C values, the Python path (fastlb/observe.py's AccessLog) calls `add()` with the entry tuple.
The lines are byte for byte those of observe.py's reference formatters (`format_text`, `format_json`;
tests/test_observe_log.py compares them).

Buffers: the loop appends to the current buffer (BUFFER_SIZE); a full one goes to the writer thread's
queue, which writes it with write() (O_APPEND: each buffer lands whole even when workers share the
file). The thread also takes a partly filled buffer every FLUSH_SECONDS, so a quiet log is written
within that time. Memory is bounded: at most MAX_BUFFERS buffers exist; when the disk cannot keep up
and every one is waiting to be written, new lines are dropped and counted (`dropped`; the thread
says so on stderr), never queued without bound and never waited for.
"""
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from libc.stdio cimport snprintf
from libc.errno cimport errno, EINTR, EAGAIN
from posix.unistd cimport write, close
from posix.time cimport timespec, clock_gettime, CLOCK_REALTIME
from libc.time cimport time_t, tm, gmtime_r, strftime
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

import os

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    ctypedef unsigned long pthread_t
    int pthread_mutex_init(pthread_mutex_t *mutex, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)
    int pthread_cond_init(pthread_cond_t *cond, const void *attr)
    int pthread_cond_destroy(pthread_cond_t *cond)
    int pthread_cond_signal(pthread_cond_t *cond)
    int pthread_cond_timedwait(pthread_cond_t *cond, pthread_mutex_t *mutex, const timespec *abstime)
    int pthread_create(pthread_t *thread, const void *attr, void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)

cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLOUT

cdef enum:
    BUFFER_SIZE = 262144       # bytes per buffer
    MAX_BUFFERS = 16           # buffers in all (4 MiB): beyond, lines are dropped
    FIXED_PART = 320           # a line's bound without its variable fields (time, numbers, JSON keys)
    STAMP_LENGTH = 19          # YYYY-MM-DDTHH:MM:SS

FLUSH_SECONDS = 0.5            # a partly filled buffer waits at most this long (observe.ACCESS_LOG_FLUSH)
cdef long FLUSH_NANOSECONDS = 500000000


cdef struct LogState:
    pthread_mutex_t lock
    pthread_cond_t wake
    pthread_t thread
    int fd
    char *cur                  # being filled by the loop
    size_t cur_len
    char *queue[MAX_BUFFERS]   # full buffers, oldest first, for the thread
    size_t queue_len[MAX_BUFFERS]
    int queued
    char *spare[MAX_BUFFERS]   # written buffers, for reuse
    int spares
    int allocated
    unsigned long long dropped
    bint stopping
    bint flush_now


cdef char *take_buffer(LogState *s) noexcept nogil:
    """A free buffer (a spare, or a new one while fewer than MAX_BUFFERS exist); NULL: none. Locked."""
    if s.spares:
        s.spares -= 1
        return s.spare[s.spares]
    if s.allocated < MAX_BUFFERS:
        buf = <char *>malloc(BUFFER_SIZE)
        if buf != NULL:
            s.allocated += 1
        return buf
    return NULL


cdef void write_all(int fd, const char *data, size_t size) noexcept nogil:
    """Writes size bytes (waits on a full pipe or terminal: this is the writer thread)."""
    cdef ssize_t n
    cdef pollfd wait
    cdef char message[160]
    while size:
        n = write(fd, data, size)
        if n < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                wait.fd = fd
                wait.events = POLLOUT
                poll(&wait, 1, 100)
                continue
            n = snprintf(message, sizeof(message),
                         b"fastlb: access log write failed (errno %d): %lu bytes lost\n", errno, size)
            write(2, message, n)
            return
        data += n
        size -= n


cdef void *writer_main(void *arg) noexcept nogil:
    """The writer thread: full buffers as they come, a partly filled one every FLUSH_SECONDS."""
    cdef LogState *s = <LogState *>arg
    cdef char *batch[MAX_BUFFERS]
    cdef size_t sizes[MAX_BUFFERS]
    cdef int count, i
    cdef timespec deadline
    cdef unsigned long long reported = 0, dropped
    cdef char message[160]
    cdef ssize_t n
    pthread_mutex_lock(&s.lock)
    while True:
        if not s.queued and not s.stopping and not s.flush_now:
            clock_gettime(CLOCK_REALTIME, &deadline)
            deadline.tv_nsec += FLUSH_NANOSECONDS
            if deadline.tv_nsec >= 1000000000:
                deadline.tv_sec += 1
                deadline.tv_nsec -= 1000000000
            pthread_cond_timedwait(&s.wake, &s.lock, &deadline)
        if not s.queued and s.cur_len:
            # Nothing full: the partly filled buffer goes (a fresh one takes its place; with none, the
            # loop gets one or drops lines until a written one comes back).
            s.queue[0] = s.cur
            s.queue_len[0] = s.cur_len
            s.queued = 1
            s.cur = take_buffer(s)
            s.cur_len = 0
        s.flush_now = False
        count = s.queued
        for i in range(count):
            batch[i] = s.queue[i]
            sizes[i] = s.queue_len[i]
        s.queued = 0
        dropped = s.dropped
        if not count and s.stopping:
            break
        pthread_mutex_unlock(&s.lock)
        for i in range(count):
            write_all(s.fd, batch[i], sizes[i])
        if dropped != reported:
            n = snprintf(message, sizeof(message),
                         b"fastlb: access log: %llu lines dropped (the disk does not keep up)\n",
                         dropped - reported)
            write(2, message, n)
            reported = dropped
        pthread_mutex_lock(&s.lock)
        for i in range(count):
            s.spare[s.spares] = batch[i]
            s.spares += 1
    pthread_mutex_unlock(&s.lock)
    return NULL


cdef inline char *put(char *out, const char *data, Py_ssize_t size) noexcept:
    memcpy(out, data, size)
    return out + size


cdef const char *HEX = b"0123456789abcdef"


cdef inline Py_ssize_t printed(int n, int limit) noexcept:
    """snprintf's count of the bytes it wrote (it returns what it would have written)."""
    return n if 0 <= n < limit else (limit - 1 if n >= limit else 0)


cdef char *put_integer(char *out, long long value) noexcept:
    """'%lld': value in decimal."""
    cdef char digits[24]
    cdef int n = 0
    cdef unsigned long long magnitude
    if value < 0:
        out[0] = 45
        out += 1
        magnitude = <unsigned long long>(-(value + 1)) + 1
    else:
        magnitude = <unsigned long long>value
    while True:
        digits[n] = <char>(48 + magnitude % 10)
        n += 1
        magnitude //= 10
        if magnitude == 0:
            break
    while n:
        n -= 1
        out[0] = digits[n]
        out += 1
    return out


cdef char *put_milliseconds(char *out, double seconds) noexcept:
    """'%.3f' of seconds * 1000 (glibc's and Python's: the exact value rounded, ties to even), without
    printf where that is plain: v * 1000 (the thousandths) is computed within 2**-24 of its exact value
    below 2**30, so away from a tie (over 1e-6 from .5) rounding it gives the exact value's rounding.
    Ties, negative and huge values are snprintf's."""
    cdef double ms = seconds * 1000
    cdef double thousandths = ms * 1000
    cdef long long whole
    cdef double fraction
    if not (0.0 <= thousandths < 1073741824.0):
        return out + printed(snprintf(out, 40, b"%.3f", ms), 40)
    whole = <long long>thousandths
    fraction = thousandths - whole
    if 0.499999 < fraction < 0.500001:
        return out + printed(snprintf(out, 40, b"%.3f", ms), 40)
    if fraction > 0.5:
        whole += 1
    out = put_integer(out, whole // 1000)
    out[0] = 46
    out[1] = <char>(48 + whole // 100 % 10)
    out[2] = <char>(48 + whole // 10 % 10)
    out[3] = <char>(48 + whole % 10)
    return out + 4


cdef char *put_escaped(char *out, const unsigned char *p, Py_ssize_t n) noexcept:
    """p[:n] (latin-1 text) as json.dumps writes it between its quotes (ensure_ascii): at most 6n bytes."""
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        if 32 <= c < 127 and c != 34 and c != 92:
            out[0] = c
            out += 1
        elif c == 34 or c == 92:
            out[0] = 92
            out[1] = c
            out += 2
        elif c == 10 or c == 13 or c == 9 or c == 8 or c == 12:
            out[0] = 92
            out[1] = 110 if c == 10 else 114 if c == 13 else 116 if c == 9 else 98 if c == 8 else 102   # n r t b f
            out += 2
        else:
            out = put(out, b"\\u00", 4)
            out[0] = HEX[c >> 4]
            out[1] = HEX[c & 15]
            out += 2
    return out


cdef class LogWriter:
    """One worker's access log: path (a file, appended to; "-": stdout) and fmt ("text" or "json")."""

    def __cinit__(self):
        self.state = NULL

    def __init__(self, str path, str fmt):
        cdef LogState *s = <LogState *>malloc(sizeof(LogState))
        cdef int fd
        if s == NULL:
            raise MemoryError()
        fd = 1 if path == "-" else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.own_path = None if path == "-" else path
        self.json = fmt == "json"
        self.stamp_second = -1
        s.fd = fd
        s.cur_len = 0
        s.queued = s.spares = s.allocated = 0
        s.dropped = 0
        s.stopping = s.flush_now = False
        s.cur = take_buffer(s)
        if s.cur == NULL:
            free(s)
            if self.own_path is not None:
                close(fd)
            raise MemoryError()
        pthread_mutex_init(&s.lock, NULL)
        pthread_cond_init(&s.wake, NULL)
        if pthread_create(&s.thread, NULL, writer_main, s) != 0:
            free(s.cur)
            free(s)
            raise OSError("cannot start the access log's writer thread")
        self.state = s

    @property
    def dropped(self):
        """Lines dropped because every buffer was waiting for the disk."""
        return self.state.dropped if self.state != NULL else 0

    def flush(self):
        """Asks the thread to write what is buffered now (it does not wait for the write)."""
        if self.state == NULL:
            return
        pthread_mutex_lock(&self.state.lock)
        self.state.flush_now = True
        pthread_cond_signal(&self.state.wake)
        pthread_mutex_unlock(&self.state.lock)

    def close(self):
        """Writes everything buffered, stops the thread, closes the file."""
        self.shut()

    cdef void shut(self):
        cdef LogState *s = self.state
        cdef int i
        if s == NULL:
            return
        self.state = NULL
        with nogil:
            pthread_mutex_lock(&s.lock)
            s.stopping = True
            pthread_cond_signal(&s.wake)
            pthread_mutex_unlock(&s.lock)
            pthread_join(s.thread, NULL)
        for i in range(s.spares):
            free(s.spare[i])
        free(s.cur)
        if self.own_path is not None:
            close(s.fd)
        pthread_cond_destroy(&s.wake)
        pthread_mutex_destroy(&s.lock)
        free(s)

    def __dealloc__(self):
        self.shut()

    def add(self, tuple entry):
        """observe.AccessLog's entry: (wall, client, pool, backend, status, bytes_in, bytes_out,
        connect_seconds, total_seconds, method, target), status an int or text, method None for a
        TCP connection."""
        (wall, client, pool, backend, status, bytes_in, bytes_out, connect_seconds, total_seconds,
         method, target) = entry
        cdef bytes client_b = client.encode(), pool_b = pool.encode(), backend_b = backend.encode()
        cdef bytes status_b = None, method_b = None, target_b = None
        cdef long code = 0
        if isinstance(status, int):
            code = status
        else:
            status_b = status.encode("latin-1")
        if method is not None:
            method_b = method.encode("latin-1")
            target_b = target.encode("latin-1")
        self.line(wall, PyBytes_AS_STRING(client_b), PyBytes_GET_SIZE(client_b),
                  PyBytes_AS_STRING(pool_b), PyBytes_GET_SIZE(pool_b),
                  PyBytes_AS_STRING(backend_b), PyBytes_GET_SIZE(backend_b),
                  code, PyBytes_AS_STRING(status_b) if status_b is not None else NULL,
                  PyBytes_GET_SIZE(status_b) if status_b is not None else 0,
                  bytes_in, bytes_out, connect_seconds, total_seconds,
                  PyBytes_AS_STRING(method_b) if method_b is not None else NULL,
                  PyBytes_GET_SIZE(method_b) if method_b is not None else 0,
                  PyBytes_AS_STRING(target_b) if target_b is not None else NULL,
                  PyBytes_GET_SIZE(target_b) if target_b is not None else 0)

    cdef char *room(self, Py_ssize_t size) noexcept:
        """Where a line of at most size bytes goes in the current buffer (locked); NULL: dropped."""
        cdef LogState *s = self.state
        if s.cur != NULL and s.cur_len + size <= BUFFER_SIZE:
            return s.cur + s.cur_len
        if size > BUFFER_SIZE or s.queued == MAX_BUFFERS:
            return NULL
        if s.cur != NULL:
            s.queue[s.queued] = s.cur
            s.queue_len[s.queued] = s.cur_len
            s.queued += 1
            pthread_cond_signal(&s.wake)
        s.cur = take_buffer(s)
        s.cur_len = 0
        return s.cur

    cdef void line(self, double wall, const char *client, Py_ssize_t client_len,
                   const char *pool, Py_ssize_t pool_len, const char *backend, Py_ssize_t backend_len,
                   long status, const char *status_text, Py_ssize_t status_len,
                   long long bytes_in, long long bytes_out, double connect_seconds, double total_seconds,
                   const char *method, Py_ssize_t method_len,
                   const char *target, Py_ssize_t target_len) noexcept:
        """One line, as observe.format_text / format_json write it; text fields are latin-1 bytes."""
        cdef LogState *s = self.state
        cdef long second = <long>wall
        cdef time_t t
        cdef tm parts
        cdef char *out
        cdef char *start
        cdef Py_ssize_t bound
        cdef int millis
        if s == NULL:
            return
        if second != self.stamp_second:
            self.stamp_second = second
            t = <time_t>second
            gmtime_r(&t, &parts)
            strftime(self.stamp, sizeof(self.stamp), b"%Y-%m-%dT%H:%M:%S", &parts)
        bound = (FIXED_PART + client_len + pool_len + backend_len + 6 * status_len + 6 * method_len
                 + 6 * target_len)
        pthread_mutex_lock(&s.lock)
        start = out = self.room(bound)
        if out == NULL:
            s.dropped += 1
            pthread_mutex_unlock(&s.lock)
            return
        if self.json:
            out = put(out, b'{"time":"', 9)
        out = put(out, self.stamp, STAMP_LENGTH)
        millis = <int>((wall - second) * 1000)          # '.%03dZ'
        if 0 <= millis < 1000:
            out[0] = 46
            out[1] = <char>(48 + millis // 100)
            out[2] = <char>(48 + millis // 10 % 10)
            out[3] = <char>(48 + millis % 10)
            out[4] = 90
            out += 5
        else:
            out += printed(snprintf(out, 8, b".%03dZ", millis), 8)
        if self.json:
            out = put(out, b'","client":"', 12)
            out = put(out, client, client_len)
            out = put(out, b'","pool":"', 10)
            out = put(out, pool, pool_len)
            out = put(out, b'","backend":"', 13)
            out = put(out, backend, backend_len)
            out = put(out, b'","status":', 11)
            if status_text != NULL:
                out[0] = 34
                out = put_escaped(out + 1, <const unsigned char *>status_text, status_len)
                out[0] = 34
                out += 1
            else:
                out = put_integer(out, status)
            out = put_integer(put(out, b',"bytes_in":', 12), bytes_in)
            out = put_integer(put(out, b',"bytes_out":', 13), bytes_out)
            out = put_milliseconds(put(out, b',"connect_ms":', 14), connect_seconds)
            out = put_milliseconds(put(out, b',"total_ms":', 12), total_seconds)
            if method != NULL:
                out = put(out, b',"method":"', 11)
                out = put_escaped(out, <const unsigned char *>method, method_len)
                out = put(out, b'","target":"', 12)
                out = put_escaped(out, <const unsigned char *>target, target_len)
                out[0] = 34
                out += 1
            out = put(out, b"}\n", 2)
        else:
            out[0] = 32
            out = put(out + 1, client, client_len)
            out[0] = 32
            out = put(out + 1, pool, pool_len)
            out[0] = 32
            out = put(out + 1, backend, backend_len)
            out[0] = 32
            if status_text != NULL:
                out = put(out + 1, status_text, status_len)
            else:
                out = put_integer(out + 1, status)
            out[0] = 32
            out = put_integer(out + 1, bytes_in)
            out[0] = 32
            out = put_integer(out + 1, bytes_out)
            out[0] = 32
            out = put_milliseconds(out + 1, connect_seconds)
            out[0] = 32
            out = put_milliseconds(out + 1, total_seconds)
            if method != NULL:
                out[0] = 32
                out = put(out + 1, method, method_len)
                out = put(out, b' "', 2)
                out = put_escaped(out, <const unsigned char *>target, target_len)
                out[0] = 34
                out += 1
            out[0] = 10
            out += 1
        s.cur_len += out - start
        pthread_mutex_unlock(&s.lock)
