"""Header names fastlb acts on, as lower-case bytes, and the small parsers for their values.

The client and backend protocols look a lower-cased name up in one dict per header (`REQUEST_SPECIAL`,
`RESPONSE_SPECIAL`); every other header is copied to the outgoing head as received, without building a
Python object per header beyond the name and value bytes httptools hands over. `scan_response` is the
compiled one-pass scanner of plain responses (fastlb/http/_head.pyx), None where it is not built: the
settings (runtime.py) and the backend side (upstream.py) both ask here.
"""
from __future__ import annotations

import re

try:
    from fastlb.http._head import scan_response     # compiled: the one-pass fast path for plain responses
except ImportError:                                   # not built: every response goes through httptools
    scan_response = None

# Actions for headers the request side handles itself (values of REQUEST_SPECIAL).
H_HOST = 1
H_CONNECTION = 2
H_DROP = 3            # hop-by-hop (RFC 9110 7.6.1) or set by fastlb itself: never forwarded
H_CONTENT_LENGTH = 4
H_TRANSFER_ENCODING = 5
H_UPGRADE = 6
H_EXPECT = 7
H_FORWARDED_FOR = 8
H_REJECT = 9          # refused outright (400)
H_COOKIE = 10         # kept aside and re-emitted (sticky cookies rewrite it): only when a pool needs it

REQUEST_SPECIAL: dict[bytes, int] = {
    b"host": H_HOST,
    b"connection": H_CONNECTION,
    b"keep-alive": H_DROP,
    b"proxy-connection": H_DROP,
    b"proxy-authenticate": H_DROP,
    b"proxy-authorization": H_DROP,
    b"te": H_DROP,
    b"trailer": H_DROP,
    b"content-length": H_CONTENT_LENGTH,
    b"transfer-encoding": H_TRANSFER_ENCODING,
    b"upgrade": H_UPGRADE,
    b"expect": H_EXPECT,
    b"x-forwarded-for": H_FORWARDED_FOR,
    # Framing headers spelt with '_': CGI/WSGI backends read them as the real ones (smuggling).
    b"content_length": H_REJECT,
    b"transfer_encoding": H_REJECT,
    # fastlb's own TLS client-certificate headers (tls.CLIENT_SUBJECT_HEADER, CLIENT_VERIFIED_HEADER):
    # always removed from what a client sends; on mTLS binds fastlb sets the subject itself.
    b"x-client-subject": H_DROP,
    b"x-client-verified": H_DROP,
}
# Set by fastlb from the connection, so a client cannot forge them.
FORWARDED_SET_BY_US = (b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip")

R_CONNECTION = 1
R_DROP = 2
R_FRAMING = 3         # Content-Length / Transfer-Encoding: fastlb writes the framing it forwards
R_UPGRADE = 4
R_SET_COOKIE = 5      # shown to the pool's sticky rule (prefix, learn, insert+indirect): only when needed
R_STICKY_HEADER = 6   # learn:header:NAME: the session id a backend names
R_HSTS = 7            # Strict-Transport-Security: replaced by fastlb's where a pool sets HSTS on a TLS bind

RESPONSE_SPECIAL: dict[bytes, int] = {
    b"connection": R_CONNECTION,
    b"keep-alive": R_DROP,
    b"proxy-connection": R_DROP,
    b"proxy-authenticate": R_DROP,
    b"te": R_DROP,
    b"trailer": R_DROP,
    b"content-length": R_FRAMING,
    b"transfer-encoding": R_FRAMING,
    b"upgrade": R_UPGRADE,
}

IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))

# RFC 9110 5.6.2 token, and a Host value (reg-name / IPv4 / [IPv6] with an optional port).
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HOST = re.compile(rb"(?:[A-Za-z0-9._~!$&'()*+,;=%-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")


def is_token(value: bytes) -> bool:
    return _TOKEN.fullmatch(value) is not None


_REG_NAME_CHARS = bytes(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~!$&'()*+,;=%-")


def valid_host(value: bytes) -> bool:
    """A Host value: reg-name or IPv4 with an optional port, or [IPv6]:port. The common case (no
    bracket, at most one colon) is one translate() instead of a regex match."""
    if b"[" not in value and value.count(b":") <= 1:
        name, _, port = value.partition(b":")
        return not name.translate(None, _REG_NAME_CHARS) and (not port or port.isdigit()) or \
            (not port and value.endswith(b":") and not name.translate(None, _REG_NAME_CHARS))
    return _HOST.fullmatch(value) is not None


def connection_tokens(value: bytes) -> list[bytes]:
    """The lower-cased options of a Connection header: 'close', 'keep-alive', 'upgrade', header names."""
    return [token.strip().lower() for token in value.split(b",") if token.strip()]


def format_header_block(headers: list[tuple[str, str]]) -> bytes:
    """`Name: value\\r\\n` lines for configured headers (checked at start-up)."""
    return b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers)
