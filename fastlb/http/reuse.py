# cython: annotation_typing=False
"""When a backend connection may carry another request, and when a request may be sent again: the one
rule for each that both HTTP data paths follow.

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


def may_send_again(req, attempts_used):
    """Whether a request a backend failed (a broken connection, a timeout, a response retry_on names)
    may go to a backend again, `attempts_used` attempts counted: only while nothing of a response reached
    the client, fastlb still holds every byte of it, an attempt is left (`--retries`), and it is
    idempotent or none of its bytes was written, so a POST a backend may have applied is never sent
    twice. The one retry decision: `ClientConnection.backend_failed` (every failure ends there) and
    `BackendConnection.may_retry` (asked before a response is dropped unseen) both call it, and the HTTP
    engine asks its C form (`may_send_again_on`) before it hands a --retry-on status to them; what each
    failure adds (its retry_on word, the keep-alive race) is the caller's condition on top."""
    return may_send_again_on(req.response_started, req.replayable, req.idempotent, req.written, attempts_used,
                             req.route.pool.attempts)


def may_send_again_on(response_started, replayable, idempotent, written, attempts_used, attempts):
    """may_send_again on the request's facts: what the HTTP engine (fastlb/http/_fast.pyx), which holds
    no Request object, asks as a C function (reuse.pxd)."""
    return bool(not response_started and replayable and (idempotent or not written) and attempts_used < attempts)
