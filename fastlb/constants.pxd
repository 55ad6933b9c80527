# Named values shared by the compiled modules and Python. Cython cimports them from here
# (`from fastlb.constants cimport WAIT_IDLE`); Python imports the same names from fastlb/constants.py,
# which tests/test_constants.py holds equal to this file. Add a value here and there together.

# Sticky.kind: how a pool pins sessions (fastlb/sticky.py).
cdef enum:
    STICKY_NONE = 0            # the pool pins nothing (the HTTP engine's sticky_kind)
    STICKY_COOKIE_INSERT = 1   # cookie:NAME, a cookie fastlb inserts naming the backend
    STICKY_COOKIE_PREFIX = 2   # prefix:NAME, the application's cookie prefixed with the backend
    STICKY_LEARN_COOKIE = 3    # learn:NAME, the application's session cookie, learned from responses
    STICKY_LEARN_HEADER = 4    # learn:header:NAME, the same from a header
    STICKY_SOURCE = 5          # source, the client's address

# deadline_kind: what a client connection waits for when its deadline passes (the sweep reads it).
cdef enum:
    WAIT_NONE = 0
    WAIT_HEAD = 1              # a request head (http_request_timeout: slowloris) -> 408
    WAIT_IDLE = 2              # the next request on a keep-alive connection -> close quietly
    WAIT_BACKEND = 3           # the backend's response, or the client's body -> 504 / 408 (or a retry)
    WAIT_TUNNEL = 4            # any byte through an upgraded tunnel -> close both
    WAIT_STREAMS = 5           # an HTTP/2 connection: the sweep looks at its streams' deadlines every time
    WAIT_HANDSHAKE = 6         # the HTTP engine's TLS handshake (within connect_timeout) -> close
    WAIT_TUNNEL_FLUSH = 7      # the engine's TLS tunnel whose Python side ended: its last bytes go out in time

# Reading from a client pauses for these reasons (bits), and resumes when none is left.
cdef enum:
    PAUSE_BACKEND_FULL = 1     # the backend's write buffer is over its high-water mark
    PAUSE_QUEUE = 2            # too many pipelined requests or bytes held for them

# The hashing keys the HTTP engine computes itself (a pool's key kind -> Engine.key_kind).
cdef enum:
    KEY_NONE = 0
    KEY_SOURCE = 1
    KEY_URI = 2
    KEY_PATH = 3
    KEY_HEADER = 4             # header:NAME, cookie:NAME, query:NAME (fastlb/http/routing.py's RoutePool.key)
    KEY_COOKIE = 5
    KEY_QUERY = 6

# Rate-limit rules (fastlb/_admission.pyx): what a rule keys on, and what a request without its key
# falls under.
cdef enum:
    RATE_KEY_SOURCE = 0        # the client's address
    RATE_KEY_ROUTE = 1         # the pool the request is routed to (one bucket per pool)
    RATE_KEY_HEADER = 2
    RATE_KEY_COOKIE = 3
    RATE_KEY_QUERY = 4
    MISSING_SOURCE = 0         # the client's address: leaving the header out escapes nothing
    MISSING_SHARED = 1         # one bucket shared by every such request
    MISSING_ALLOW = 2          # no limit

# Admission verdicts (fastlb/_admission.pyx admit_*), and its limit on the headers the engine keys on.
cdef enum:
    ADMIT = 0
    DENIED = 1                 # by the deny list, or not on the allow list: closed at once
    TOO_MANY = 2               # over max_conn_per_source: tcp closes, http answers 429 and closes
    MAX_KEY_HEADERS = 4        # distinct header names `header:` rules may key on in the HTTP engine
