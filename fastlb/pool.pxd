# Declarations that make Backend / BackendPool extension types when pool.py is compiled: their attributes
# become C struct fields, so the per-request pick and release (select_now, response_done: called by the
# HTTP engine for every request) read and count them without a generic attribute lookup. pool.py runs
# unchanged as plain Python (tests/test_imports.py imports it either way).

cdef class Backend:
    cdef public object spec, host, port, address, send_proxy, ssl_context, server_hostname
    cdef public object balancer, state, health, traffic, idle, h2, pool
    cdef public bint is_backup, removed, full
    cdef public Py_ssize_t index, inflight, maxconn


cdef class BackendPool:
    cdef public object loop, queue_timeout, connect_timeout, waiters, primary, backup, primaries, backups
    cdef public object by_address, config, idle_keeper, tls_contexts, health
    cdef public Py_ssize_t maxconn, queue_size, attempts, active, woken, weight_scale, own_failures
    cdef public bint track_latency
    cdef public double last_tls_warning, last_own_failure_warning

    # The per-request calls (the HTTP engine's, the Python path's): C calls between them.
    cpdef object select_now(self, object key, list tried, object pinned=*)
    cpdef object _select(self, object key, list tried, object pinned=*)
    cpdef _take(self, Backend backend)
    cpdef release(self, Backend backend)
    cpdef response_done(self, Backend backend, double seconds, bint ok, int status, str detail=*)
