"""Content routing (HAProxy's frontend -> use_backend rules) and the hash key of a request.

A `Router` holds the named pools of a worker (each a `BackendPool` with its own algorithm, hash key and
body limit) and an ordered list of rules; the first rule whose every condition matches names the pool,
otherwise the default pool serves. Conditions: host (exact, port ignored, case-insensitive), path
prefix, path regex, method(s), header present / equal to a value. All compiled once at start-up.

The headers rules and keys need (`Router.capture`) are the only ones the client protocol keeps per
request; every other header is copied through without being looked at again.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

from fastlb.constants import STICKY_LEARN_HEADER, STICKY_SOURCE

if TYPE_CHECKING:
    from fastlb.config import RouteSpec
    from fastlb.pool import BackendPool


class RoutePool:
    """One named pool as the HTTP side sees it: the BackendPool plus how to key and limit requests."""

    __slots__ = ("name", "pool", "key_kind", "key_name", "max_body_size", "hsts_block", "sticky")

    def __init__(self, name: str, pool: "BackendPool", hash_key: str | None, max_body_size: int,
                 hsts: int = 0, sticky=None) -> None:
        self.name = name
        self.pool = pool
        self.sticky = sticky                        # fastlb.sticky.Sticky, or None
        self.max_body_size = max_body_size          # 0: no limit
        # The HSTS header line added to this pool's responses on TLS binds (b"": none).
        self.hsts_block = b"Strict-Transport-Security: max-age=%d\r\n" % hsts if hsts else b""
        kind, _, key_name = (hash_key or "").partition(":")
        self.key_kind = kind or None
        self.key_name = key_name.lower().encode("latin-1") if key_name else b""
        if kind == "query" or kind == "cookie":
            self.key_name = key_name.encode("latin-1")   # cookie and query names are case-sensitive

    def key(self, client_ip: bytes, url: bytes, captured: dict | None) -> bytes | None:
        """The hashing key of a request, or None (no key, or the algorithm does not hash)."""
        kind = self.key_kind
        if kind is None:
            return None
        if kind == "source":
            return client_ip
        if kind == "uri":
            return url
        if kind == "path":
            return url.partition(b"?")[0]
        if kind == "header":
            return captured.get(self.key_name) if captured else None
        if kind == "cookie":
            return cookie_value(captured.get(b"cookie") if captured else None, self.key_name)
        if kind == "query":
            return query_value(url, self.key_name)
        return None


def cookie_value(header: bytes | None, name: bytes) -> bytes | None:
    if not header:
        return None
    for pair in header.split(b";"):
        key, sep, value = pair.strip().partition(b"=")
        if sep and key == name:
            return value.strip(b'"') or None
    return None


def query_value(url: bytes, name: bytes) -> bytes | None:
    _, sep, query = url.partition(b"?")
    if not sep:
        return None
    for pair in query.partition(b"#")[0].split(b"&"):
        key, _, value = pair.partition(b"=")
        if key == name or unquote_to_bytes(key) == name:
            return unquote_to_bytes(value.replace(b"+", b" ")) or None
    return None


class Rule:
    __slots__ = ("host", "path_prefix", "path_regex", "methods", "header_name", "header_value", "target")

    def __init__(self, spec: "RouteSpec", target: RoutePool) -> None:
        self.host = spec.host.lower().encode("latin-1") if spec.host else None
        self.path_prefix = spec.path_prefix.encode("latin-1") if spec.path_prefix else None
        self.path_regex = re.compile(spec.path_regex.encode("latin-1")) if spec.path_regex else None
        self.methods = frozenset(m.upper().encode() for m in spec.methods) if spec.methods else None
        self.header_name = spec.header_name.lower().encode("latin-1") if spec.header_name else None
        self.header_value = spec.header_value.encode("latin-1") if spec.header_value is not None else None
        self.target = target

    def matches(self, method: bytes, path: bytes, host: bytes | None, captured: dict | None) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.host is not None and _bare_host(host) != self.host:
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        if self.path_regex is not None and self.path_regex.search(path) is None:
            return False
        if self.header_name is not None:
            value = captured.get(self.header_name) if captured else None
            if value is None or (self.header_value is not None and value != self.header_value):
                return False
        return True


def _bare_host(host: bytes | None) -> bytes | None:
    """Host without its port, lower-cased: b'Example.com:8080' -> b'example.com'."""
    if host is None:
        return None
    host = host.lower()
    if host.startswith(b"["):
        return host.partition(b"]")[0] + b"]"
    return host.partition(b":")[0]


class Router:
    __slots__ = ("pools", "rules", "default", "capture", "single")

    def __init__(self, pools: dict[str, RoutePool], rules: list[Rule], default: RoutePool) -> None:
        self.pools = pools
        self.rules = rules
        self.default = default
        self.single = default if not rules else None     # no rule: skip matching entirely
        capture: set[bytes] = set()
        for rule in rules:
            if rule.header_name:
                capture.add(rule.header_name)
        for pool in pools.values():
            if pool.key_kind == "header":
                capture.add(pool.key_name)
            elif pool.key_kind == "cookie":
                capture.add(b"cookie")
            sticky = pool.sticky
            if sticky is not None and sticky.kind != STICKY_SOURCE:     # all but source read the request
                capture.add(sticky.lname if sticky.kind == STICKY_LEARN_HEADER else b"cookie")
        capture.discard(b"host")            # always kept by the protocol itself
        self.capture = frozenset(capture)

    def route(self, method: bytes, url: bytes, host: bytes | None, captured: dict | None) -> RoutePool:
        if self.single is not None:
            return self.single
        path = url.partition(b"?")[0]
        for rule in self.rules:
            if rule.matches(method, path, host, captured):
                return rule.target
        return self.default
