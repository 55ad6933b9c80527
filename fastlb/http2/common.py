"""What both sides of fastlb's HTTP/2 share (fastlb/http2/connection.py: clients; fastlb/http2/backend.py:
backends), in a module that imports nothing of fastlb's (the two must not import each other)."""

# A body held for a stream beyond this: its sender is not read until the receiver takes some.
STREAM_BUFFER_HIGH = 256 * 1024
STREAM_BUFFER_LOW = 64 * 1024
# Fields HTTP/2 forbids (RFC 9113 8.2.2), dropped when an HTTP/1.1 message becomes an HTTP/2 one.
CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                 b"upgrade"))
