# Declarations that make HttpSettings / HttpRuntime extension types when runtime.py is compiled
# (typed attribute access from the protocols); runtime.py runs unchanged as plain Python.

cdef class HttpSettings:
    cdef public double http_request_timeout, keepalive_timeout, response_timeout, tunnel_timeout
    cdef public double backend_idle_timeout, connect_wait_timeout
    cdef public Py_ssize_t backend_max_idle, max_header_size, max_headers, max_uri_length
    cdef public Py_ssize_t max_response_header_size
    cdef public bint forwarded_for, fast_responses, cookie_held
    cdef public bint retry_empty, retry_junk, retry_timeout
    cdef public frozenset retry_statuses
    cdef public dict request_actions, response_actions
    cdef public bytes request_block, response_block, default_host
    cdef public object capture
    cdef public tuple response_watch, response_dropped, hsts_dropped


cdef class HttpRuntime:
    cdef public object loop, router, connections, backend_factory, observer, fast
    cdef public object admission, h2, on_idle
    cdef public HttpSettings settings
    cdef public bint draining
    cdef public Py_ssize_t failures
    cdef public double last_failure_log, sweep_interval, now

    cpdef forget(self, connection)
