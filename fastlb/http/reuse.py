# cython: annotation_typing=False
"""When a backend connection may carry another request: the one rule both HTTP data paths follow.

Request smuggling through a proxy is almost always a connection reused while one side is not at a
message boundary: the backend still owes us response bytes (which would become the next client's
response), or still expects request bytes (which the next client's request would complete, so a request
line hidden in a header value runs at the backend without fastlb ever parsing it). So a backend
connection goes back to its backend's idle pool only when *all* of these hold:

- the request was written whole: every byte of it, body included, was handed to the connection
  (a response that came early, while the client was still sending, leaves the backend owing a read);
- the response was read whole, by its own framing (Content-Length, chunked, or no body for HEAD, 204,
  304), with no byte after it and no byte where no body may be; never a response ended by the close of
  the connection, an interim-only exchange, a 101, an error or a timeout;
- the backend did not ask to close (`Connection: close`, or HTTP/1.0 without keep-alive);
- the worker is not draining.

Every other case closes the connection. The Python path (fastlb/http/upstream.py,
`BackendConnection._finish`) and the C engine (fastlb/http/_fast.pyx, `on_backend_readable`) both call
`may_reuse`; compiled, the engine calls it as a C function (reuse.pxd).
"""


def may_reuse(request_written_whole, response_read_whole, backend_keeps_alive, draining):
    """True when a backend connection may go back to the idle pool (see the module's docstring)."""
    return bool(request_written_whole and response_read_whole and backend_keeps_alive and not draining)
