"""Malformed and hostile HTTP/1.1 requests, each with the answer fastlb must give.

Every entry is (name, raw bytes, expected), expected being a status code (the response fastlb writes
before closing) or CLOSE (the connection is closed; a 4xx before it is allowed). test_http_corpus.py
runs each against a real fastlb whose backend records what it receives: none of these may reach it.
Limits in force there: max-uri-length 2k, max-header-size 8k, max-headers 50, max-body-size 1k,
http-request-timeout 1s.

Sources of the cases: RFC 9112 (sections 2.2, 3, 5, 6, 7), the request-smuggling literature
(CL.TE, TE.CL, TE.TE obfuscations), and what llhttp's strict mode does and does not refuse.
"""
CLOSE = "close"

H = b"Host: t\r\n"


def req(head: bytes, body: bytes = b"") -> bytes:
    return head + body


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"

CASES: list[tuple[str, bytes, object]] = []


def case(name: str, data: bytes, expected: object = 400) -> None:
    CASES.append((name, data, expected))


# ---- Content-Length and Transfer-Encoding together (CL.TE / TE.CL) -------------------------------
case("cl-then-te", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX")
case("te-then-cl", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n" + SMUGGLED)
case("cl-te-smuggle", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED)
case("cl0-te", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
case("te-upper-cl", b"POST / HTTP/1.1\r\n" + H + b"TRANSFER-ENCODING: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n")
case("cl-lower-te", b"POST / HTTP/1.1\r\n" + H + b"content-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
case("te-identity-cl", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\nContent-Length: 3\r\n\r\nabc")
case("get-cl-te", b"GET / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")

# ---- Content-Length values ---------------------------------------------------------------------
case("dup-cl-different", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")
case("dup-cl-same", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc")
case("cl-list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc")
case("cl-plus", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc")
case("cl-minus", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -3\r\n\r\nabc")
case("cl-hex", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x3\r\n\r\nabc")
case("cl-space-inside", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1 2\r\n\r\nabc")
case("cl-empty", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: \r\n\r\nabc")
case("cl-letters", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: abc\r\n\r\nabc")
case("cl-decimal", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3.0\r\n\r\nabc")
case("cl-overflow", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999999\r\n\r\nabc")
case("cl-space-before-colon", b"POST / HTTP/1.1\r\n" + H + b"Content-Length : 3\r\n\r\nabc")
case("cl-nul", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\x00\r\n\r\nabc")
case("cl-obs-fold", b"POST / HTTP/1.1\r\n" + H + b"Content-Length:\r\n 3\r\n\r\nabc")
case("cl-too-large-for-limit", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5000\r\n\r\n", 413)

# ---- Transfer-Encoding other than a final chunked (TE.TE obfuscations) ----------------------------
case("te-gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nabc")
case("te-identity", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n")
case("te-chunked-gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n")
case("te-gzip-chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
case("te-chunked-chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n")
case("te-dup-headers", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
case("te-dup-identity", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n")
case("te-xchunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n")
case("te-chunked-x", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunkedx\r\n\r\n0\r\n\r\n")
case("te-quoted", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: \"chunked\"\r\n\r\n0\r\n\r\n")
case("te-param", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked;q=1\r\n\r\n0\r\n\r\n")
case("te-space-before-colon", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n")
case("te-tab-before-colon", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding\t: chunked\r\n\r\n0\r\n\r\n")
case("te-obs-fold", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n")
case("te-obs-fold-tab", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: x\r\n\tchunked\r\n\r\n0\r\n\r\n")
# Some backends (CGI, WSGI) map '_' and '-' to the same name: a framing header spelt with '_' is refused.
case("te-underscore", b"POST / HTTP/1.1\r\n" + H + b"Transfer_Encoding: chunked\r\n\r\n0\r\n\r\n")
case("cl-underscore", b"POST / HTTP/1.1\r\n" + H + b"Content_Length: 3\r\n\r\nabc")
case("te-nul", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\x00\r\n\r\n0\r\n\r\n")
case("te-vtab", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n")
case("te-http10", b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
case("te-empty", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: \r\n\r\n0\r\n\r\n")
case("te-comma-only", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: ,\r\n\r\n0\r\n\r\n")

# ---- chunk framing ----------------------------------------------------------------------------
CHUNKED = b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
case("chunk-size-not-hex", CHUNKED + b"zz\r\nabc\r\n0\r\n\r\n")
case("chunk-size-negative", CHUNKED + b"-3\r\nabc\r\n0\r\n\r\n")
case("chunk-size-0x", CHUNKED + b"0x3\r\nabc\r\n0\r\n\r\n")
case("chunk-size-overflow", CHUNKED + b"fffffffffffffffffff\r\nabc\r\n0\r\n\r\n")
case("chunk-size-empty", CHUNKED + b"\r\nabc\r\n0\r\n\r\n")
case("chunk-size-space-inside", CHUNKED + b"1 2\r\nabc\r\n0\r\n\r\n")
case("chunk-size-bare-lf", CHUNKED + b"3\nabc\r\n0\r\n\r\n")
case("chunk-size-bare-cr", CHUNKED + b"3\rabc\r\n0\r\n\r\n")
case("chunk-data-too-long", CHUNKED + b"3\r\nabcdef\r\n0\r\n\r\n")
case("chunk-data-no-crlf", CHUNKED + b"3\r\nabcX0\r\n\r\n")
case("chunk-data-bare-lf", CHUNKED + b"3\r\nabc\n0\r\n\r\n")
case("chunk-ext-bare-cr", CHUNKED + b"3;a\rb\r\nabc\r\n0\r\n\r\n")
case("chunk-ext-nul", CHUNKED + b"3;a=\x00\r\nabc\r\n0\r\n\r\n")
case("chunk-request-as-trailer", CHUNKED + b"3\r\nabc\r\n0\r\nGET /smuggled HTTP/1.1\r\n\r\n")
case("chunk-body-over-limit", CHUNKED + b"400\r\n" + b"x" * 1024 + b"\r\n400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n", 413)
case("trailer-obs-fold", CHUNKED + b"3\r\nabc\r\n0\r\nX-T: a\r\n b\r\n\r\n")
case("trailer-bad-name", CHUNKED + b"3\r\nabc\r\n0\r\nX T: a\r\n\r\n")

# ---- header syntax ----------------------------------------------------------------------------
case("obs-fold-space", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n")
case("obs-fold-tab", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n\tb\r\n\r\n")
case("obs-fold-first-line", b"GET / HTTP/1.1\r\n Host: t\r\n\r\n")
case("bare-cr-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n")
case("bare-cr-line-end", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rX-B: b\r\n\r\n")
case("bare-cr-in-name", b"GET / HTTP/1.1\r\n" + H + b"X\r-A: a\r\n\r\n")
case("bare-lf-lines", b"GET / HTTP/1.1\nHost: t\n\n")
case("bare-lf-header", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\nX-B: b\r\n\r\n")
case("nul-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n")
case("nul-in-name", b"GET / HTTP/1.1\r\n" + H + b"X-\x00A: a\r\n\r\n")
case("ctl-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n\r\n")
case("del-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x7fb\r\n\r\n")
case("esc-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: \x1b[31m\r\n\r\n")
case("space-before-colon", b"GET / HTTP/1.1\r\n" + H + b"X-A : a\r\n\r\n")
case("tab-before-colon", b"GET / HTTP/1.1\r\n" + H + b"X-A\t: a\r\n\r\n")
case("paren-in-name", b"GET / HTTP/1.1\r\n" + H + b"X(A): a\r\n\r\n")
case("at-in-name", b"GET / HTTP/1.1\r\n" + H + b"X@A: a\r\n\r\n")
case("slash-in-name", b"GET / HTTP/1.1\r\n" + H + b"X/A: a\r\n\r\n")
case("quote-in-name", b"GET / HTTP/1.1\r\n" + H + b"X\"A: a\r\n\r\n")
case("utf8-in-name", b"GET / HTTP/1.1\r\n" + H + "X-Ä: a\r\n\r\n".encode())
case("empty-name", b"GET / HTTP/1.1\r\n" + H + b": a\r\n\r\n")
case("no-colon", b"GET / HTTP/1.1\r\n" + H + b"X-A a\r\n\r\n")
case("colon-only", b"GET / HTTP/1.1\r\n" + H + b":\r\n\r\n")
case("header-space-line", b"GET / HTTP/1.1\r\n" + H + b" \r\n\r\n")

# ---- Host -------------------------------------------------------------------------------------
case("no-host-http11", b"GET / HTTP/1.1\r\n\r\n")
case("two-hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
case("two-hosts-same", b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n")
case("host-with-space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n")
case("host-with-slash", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n")
case("host-with-at", b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n")
case("host-with-backslash", b"GET / HTTP/1.1\r\nHost: a\\b\r\n\r\n")
case("host-bad-ipv6", b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n")
case("host-high-bytes", b"GET / HTTP/1.1\r\nHost: \xc3\xa4\r\n\r\n")

# ---- request line -----------------------------------------------------------------------------
case("http09", b"GET /\r\n\r\n")
case("http20", b"GET / HTTP/2.0\r\n" + H + b"\r\n")
case("http12", b"GET / HTTP/1.2\r\n" + H + b"\r\n")
case("http30", b"GET / HTTP/3.0\r\n" + H + b"\r\n")
case("lowercase-version", b"GET / http/1.1\r\n" + H + b"\r\n")
case("version-no-minor", b"GET / HTTP/1\r\n" + H + b"\r\n")
case("version-extra", b"GET / HTTP/1.1x\r\n" + H + b"\r\n")
case("unknown-method", b"FOO / HTTP/1.1\r\n" + H + b"\r\n")
case("lowercase-method", b"get / HTTP/1.1\r\n" + H + b"\r\n")
case("method-with-slash", b"GE/T / HTTP/1.1\r\n" + H + b"\r\n")
case("connect", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405)
case("space-in-url", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n")
case("tab-in-url", b"GET /a\tb HTTP/1.1\r\n" + H + b"\r\n")
case("ctl-in-url", b"GET /a\x01b HTTP/1.1\r\n" + H + b"\r\n")
case("nul-in-url", b"GET /a\x00b HTTP/1.1\r\n" + H + b"\r\n")
case("del-in-url", b"GET /a\x7fb HTTP/1.1\r\n" + H + b"\r\n")
case("high-byte-in-url", b"GET /a\xffb HTTP/1.1\r\n" + H + b"\r\n")
case("cr-in-url", b"GET /a\rb HTTP/1.1\r\n" + H + b"\r\n")
case("lf-in-url", b"GET /a\nb HTTP/1.1\r\n" + H + b"\r\n")
case("missing-url", b"GET HTTP/1.1\r\n" + H + b"\r\n")
case("missing-version", b"GET / \r\n" + H + b"\r\n")
case("tab-separators", b"GET\t/\tHTTP/1.1\r\n" + H + b"\r\n")
case("bare-cr-request-line", b"GET / HTTP/1.1\r" + H + b"\r\n")
case("uri-too-long", b"GET /" + b"u" * 3000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414)

# ---- limits, expectations, junk ---------------------------------------------------------------
case("header-too-large", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"v" * 9000 + b"\r\n\r\n", 431)
case("too-many-headers", b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(60)) + b"\r\n", 431)
case("many-small-headers-size", b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 400) for i in range(30)) + b"\r\n", 431)
case("cookie-bomb", b"GET / HTTP/1.1\r\n" + H + b"Cookie: " + b"a=b; " * 3000 + b"\r\n\r\n", 431)
case("expect-unknown", b"POST / HTTP/1.1\r\n" + H + b"Expect: 200-ok\r\nContent-Length: 0\r\n\r\n", 417)
case("tls-client-hello", bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40, CLOSE)
# With HTTP/2 on (docs/http2.md) the preface makes the connection HTTP/2: what follows is not a SETTINGS
# frame, so it ends (GOAWAY); with HTTP/2 off, a 400.
case("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"GET / HTTP/1.1\r\n" + H + b"\r\n", CLOSE)
case("binary-junk", bytes(range(256)), CLOSE)
case("only-crlf-then-junk", b"\r\n\r\n\x00\x01\x02", CLOSE)
case("slowloris-incomplete-head", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n", 408)
