# The access log's C side (fastlb/_accesslog.pyx), cimported by the HTTP engine (fastlb/http/_fast.pyx),
# which formats its lines through `line()` without a Python call.

cdef struct LogState


cdef class LogWriter:
    cdef LogState *state
    cdef readonly bint json
    cdef long stamp_second             # the second whose text is in stamp (formatted once per second)
    cdef char stamp[24]
    cdef object own_path               # the file this writer opened (None: stdout)

    cdef void shut(self)
    cdef char *room(self, Py_ssize_t size) noexcept
    cdef void line(self, double wall, const char *client, Py_ssize_t client_len,
                   const char *pool, Py_ssize_t pool_len, const char *backend, Py_ssize_t backend_len,
                   long status, const char *status_text, Py_ssize_t status_len,
                   long long bytes_in, long long bytes_out, double connect_seconds, double total_seconds,
                   const char *method, Py_ssize_t method_len,
                   const char *target, Py_ssize_t target_len) noexcept
