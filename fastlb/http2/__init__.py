"""HTTP/2 for the HTTP mode's clients: libnghttp2 (fastlb/http2/_nghttp2.pyx) under the HTTP data path
(fastlb/http2/connection.py). Built only where libnghttp2's headers are (libnghttp2-dev)."""

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"    # RFC 9113 3.4: a client's first bytes, h2c with prior knowledge


def available() -> bool:
    """Whether the libnghttp2 module is built (without it fastlb speaks HTTP/1.1 only)."""
    try:
        from fastlb.http2 import _nghttp2  # noqa: F401
    except ImportError:
        return False
    return True
