"""What the HTTP connections of one worker share: settings, router, idle backend connections, the sweep.

`HttpSettings` turns the Config into what the hot path reads: limits as ints, timeouts as floats, the
header action tables (with the operator's delete/set rules folded in) and the header blocks fastlb adds,
preformatted as bytes once. `HttpRuntime` is the state the Python path's connections (fastlb/http/
protocol.py, upstream.py) and the C engine (fastlb/http/fast.py) read: `HttpRuntime.sweep`, called by
the worker's one sweep timer, enforces every HTTP timeout and expires idle backend connections, so no
request arms or cancels a timer of its own. This module imports none of them (they cimport it): the HTTP
data path that builds them all is fastlb/http/datapath.py.
"""
from __future__ import annotations

import asyncio
import logging

from fastlb.config import Config
from fastlb.constants import STICKY_LEARN_HEADER, WAIT_IDLE
from fastlb.http.headers import (FORWARDED_SET_BY_US, H_COOKIE, H_DROP, R_DROP, R_HSTS, R_SET_COOKIE,
                                 R_STICKY_HEADER, REQUEST_SPECIAL, RESPONSE_SPECIAL, format_header_block,
                                 scan_response)
from fastlb.http.routing import Router, RoutePool, Rule
from fastlb.pool import BackendPool

log = logging.getLogger("fastlb")


class HttpSettings:
    __slots__ = (
        "http_request_timeout", "keepalive_timeout", "response_timeout", "tunnel_timeout",
        "backend_idle_timeout", "backend_max_idle", "connect_wait_timeout",
        "max_header_size", "max_headers", "max_uri_length", "max_response_header_size",
        "forwarded_for", "request_actions", "response_actions", "request_block", "response_block",
        "capture", "default_host", "fast_responses", "cookie_held", "response_watch", "response_dropped",
        "hsts_dropped",
        # retry-on (config.parse_retry_on): what re-sends an idempotent request to another backend
        "retry_statuses", "retry_empty", "retry_junk", "retry_timeout",
    )

    def __init__(self, config: Config, capture: frozenset) -> None:
        self.http_request_timeout = config.http_request_timeout
        self.keepalive_timeout = config.keepalive_timeout
        self.response_timeout = config.response_timeout
        self.tunnel_timeout = config.tunnel_timeout
        self.backend_idle_timeout = config.backend_idle_timeout
        self.backend_max_idle = config.backend_max_idle
        # A request waiting for a backend connection: the pool enforces queue and connect timeouts;
        # this is only the sweep's backstop.
        self.connect_wait_timeout = (config.queue_timeout + config.connect_timeout * (config.retries + 1)
                                     + 1.0)
        retry_on = config.retry_on
        self.retry_statuses = frozenset(int(c) for c in retry_on if c.isdigit())
        self.retry_empty = "empty-response" in retry_on
        self.retry_junk = "junk-response" in retry_on
        self.retry_timeout = "response-timeout" in retry_on
        self.max_header_size = config.max_header_size
        self.max_response_header_size = config.max_response_header_size
        self.max_headers = config.max_headers
        self.max_uri_length = config.max_uri_length
        self.forwarded_for = config.forwarded_for
        request_actions = dict(REQUEST_SPECIAL)
        response_actions = dict(RESPONSE_SPECIAL)
        if config.forwarded_for:
            for name in FORWARDED_SET_BY_US:
                request_actions[name] = H_DROP
        for name in config.request_header_delete:
            request_actions.setdefault(name.lower().encode("latin-1"), H_DROP)
        for name, _ in config.request_header_set:
            request_actions.setdefault(name.lower().encode("latin-1"), H_DROP)
        for name in config.response_header_delete:
            response_actions.setdefault(name.lower().encode("latin-1"), R_DROP)
        for name, _ in config.response_header_set:
            response_actions.setdefault(name.lower().encode("latin-1"), R_DROP)
        if config.hsts or any(pool.hsts for pool in config.pools):
            # A pool's HSTS replaces the backend's own header (on TLS binds; see upstream.on_header).
            response_actions.setdefault(b"strict-transport-security", R_HSTS)
        self.request_actions = request_actions
        self.response_actions = response_actions
        extra = list(config.request_header_set)
        response_extra = list(config.response_header_set)
        if config.via:
            extra.append(("Via", f"1.1 {config.via}"))
            response_extra.append(("Via", f"1.1 {config.via}"))
            request_actions[b"via"] = H_DROP       # replaced, not appended: simpler, and no loops
            response_actions[b"via"] = R_DROP
        # The response fast path (and the C engine) forward header lines as they are, less the ones the
        # operator's rules delete or replace (response_dropped), and append response_block.
        self.fast_responses = scan_response is not None
        self.response_dropped = tuple(name for name, action in response_actions.items()
                                      if action == R_DROP and name not in RESPONSE_SPECIAL)
        # Where a pool's HSTS applies (a TLS bind), its header line replaces the backend's own.
        self.hsts_dropped = self.response_dropped + (b"strict-transport-security",)
        self.request_block = format_header_block(extra)
        self.response_block = format_header_block(response_extra)
        self.capture = capture
        self.cookie_held = False        # the Cookie header is held back and re-emitted (sticky rewrites)
        self.response_watch = ()        # response headers the fast path leaves to the slow one (sticky)
        bind = config.binds[0] if config.binds else None
        self.default_host = bind.address.encode() if bind else b"localhost"

    def forward_block_for(self, client_ip: bytes, scheme: bytes) -> bytes:
        """X-Forwarded-For and -Proto for a connection without an incoming X-Forwarded-For."""
        if not self.forwarded_for:
            return b""
        return b"X-Forwarded-For: " + client_ip + b"\r\nX-Forwarded-Proto: " + scheme + b"\r\n"

    def watch_sticky(self, router: Router) -> None:
        """Header actions for the pools' sticky rules: added only when a rule needs them, so a balancer
        without persistence looks at no extra header."""
        for route in router.pools.values():
            sticky = route.sticky
            if sticky is None:
                continue
            if sticky.rewrites_cookie:
                self.request_actions[b"cookie"] = H_COOKIE
                self.cookie_held = True
            watch = list(self.response_watch)
            if sticky.watches_set_cookie:
                self.response_actions.setdefault(b"set-cookie", R_SET_COOKIE)
                watch.append(b"set-cookie")
            if sticky.kind == STICKY_LEARN_HEADER:
                self.response_actions.setdefault(sticky.lname, R_STICKY_HEADER)
                watch.append(sticky.lname)
            # The response fast path forwards header lines untouched and appends the insert cookie
            # itself; a response carrying a header the rule must read or rewrite (a backend's
            # Set-Cookie, the learned header) goes to the slow path, which shows it to the rule.
            self.response_watch = tuple(dict.fromkeys(watch))


def build_router(config: Config, loop: asyncio.AbstractEventLoop, maxconn: int,
                 default_pool: BackendPool | None = None, store=None) -> Router:
    """The worker's pools and rules. default_pool: the worker's BackendPool of the top-level backends
    (the one the active health checks feed), served as the pool named "default". store: the worker's
    fastlb.sticky.SessionStore when any pool is sticky."""
    pools: dict[str, RoutePool] = {}
    sticky_of = {spec.name: spec.sticky for spec in config.pools}
    for spec in config.pools:
        pool_config = config.pool_config(spec)     # its own health, passive detection, discovery
        pools[spec.name] = RoutePool(spec.name, BackendPool(pool_config, loop, maxconn),
                                     pool_config.hash_key,
                                     spec.max_body_size if spec.max_body_size is not None
                                     else config.max_body_size,
                                     spec.hsts if spec.hsts is not None else config.hsts)
    if config.backends or default_pool is not None:      # (a discovery source may fill it later)
        pools.setdefault("default", RoutePool("default", default_pool or BackendPool(config, loop, maxconn),
                                              config.hash_key, config.max_body_size, config.hsts))
    if store is not None:
        from fastlb.sticky import Sticky, default_secret
        secret = default_secret(config)
        for route in pools.values():
            spec = sticky_of.get(route.name) or config.sticky
            if spec is not None:
                route.sticky = Sticky(spec, route.name, route.pool, store, secret)
    default_name = config.default_pool or ("default" if "default" in pools else next(iter(pools)))
    rules = [Rule(spec, pools[spec.pool]) for spec in config.routes]
    return Router(pools, rules, pools[default_name])


class HttpRuntime:
    """What the HTTP connections of one worker read and share (the Python path's and the C engine's):
    settings, router, the live connections, idle backend connections, the sweep. Built by the HTTP data
    path (fastlb/http/datapath.py), which gives it what makes backend connections and HTTP/2 ones."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, router: Router, backend_class,
                 observer=None, h2=None) -> None:
        self.loop = loop
        self.router = router
        # fastlb/observe.py's Observer (metrics, access log), called once per finished request; None
        # when neither is configured, and then the request path does nothing for it.
        self.observer = observer
        self.settings = HttpSettings(config, router.capture)
        self.settings.watch_sticky(router)
        self.connections = set()   # the Python path's live ClientConnections
        self.draining = False
        self.now = loop.time()     # the loop's clock as last read by a protocol (one read per data_received)
        self.failures = 0
        self.last_failure_log = 0.0
        shortest = min(t for t in (config.http_request_timeout, config.keepalive_timeout,
                                   config.response_timeout, config.tunnel_timeout,
                                   config.backend_idle_timeout) if t > 0)
        # Timeouts fire between t and t + interval: at most 10 % late, checked at most 20 times a second
        # (the worker's Sweeper calls `sweep` this often).
        self.sweep_interval = min(1.0, max(0.05, shortest / 10))
        # backend_class: fastlb/http/upstream.py's BackendConnection, what BackendPool.connect makes.
        self.backend_factory = lambda: backend_class(self)
        self.fast = None               # the C engine (fastlb/http/fast.py), made for the first bind it serves
        self.admission = None          # fastlb/admission.py's Admission (use_admission), or None
        # HTTP/2 clients (fastlb/http2/connection.py's H2Settings: its limits, and `switch`), or None (off,
        # or libnghttp2 not built).
        self.h2 = h2
        self.on_idle = None            # draining: called when the last connection ends (HttpPath.start_draining)

    def use_admission(self, admission) -> None:
        """Admission control: checked per connection and request; the headers its keys read are kept."""
        self.admission = admission
        self.settings.capture = frozenset(self.settings.capture | admission.capture)

    def forget(self, connection) -> None:
        """A client connection of the Python path ended (HTTP/1.1 or HTTP/2)."""
        connections = self.connections
        connections.discard(connection)
        if not connections and self.on_idle is not None:
            self.on_idle()                      # draining, and this was the last one

    # ---- idle backend connections ----------------------------------------------------------------

    def park(self, upstream, backend) -> None:
        transport = upstream.transport
        if not transport.is_reading():
            # Paused by a slow client (pause_writing) whose resume_writing may come after the response
            # ended, and go to the request after it: an idle connection must read (a close, the next
            # response), or the next request on it would wait for ever.
            transport.resume_reading()
        idle = backend.idle
        limit = self.settings.backend_max_idle
        if self.fast is not None:
            # One bound for the backend's two storages: the engine's idle connections count too.
            limit -= self.fast.engine.idle_count_of(backend)
        if len(idle) >= limit:
            if idle:
                idle.popleft().transport.close()    # the oldest one goes first
            elif limit < self.settings.backend_max_idle:
                self.fast.engine.drop_oldest_idle(backend)
            else:                                   # backend_max_idle 0: none is kept
                transport.close()
                return
        upstream.idle_since = self.now
        idle.append(upstream)

    def unpark(self, upstream) -> None:
        backend = upstream.backend
        if backend is not None:
            try:
                backend.idle.remove(upstream)
            except ValueError:
                pass

    # ---- the sweep -------------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        self.now = now
        if self.fast is not None:
            self.fast.engine.sweep()
        for client in list(self.connections):
            if client.deadline_kind and client.deadline <= now:
                try:
                    client.on_deadline(now)
                except Exception:                   # one broken connection must not stop the sweep
                    log.exception("timeout handling failed")
                    client.transport.abort()
            elif self.draining and client.deadline_kind == WAIT_IDLE and not client.closed:
                client.transport.close()             # idle keep-alive connection: close it now
        expire = now - self.settings.backend_idle_timeout
        for route in self.router.pools.values():
            for backend in route.pool.backends:
                idle = backend.idle
                while idle and idle[0].idle_since <= expire:
                    idle.popleft().transport.close()

    def refused(self, client, reason, status: int = 503) -> None:
        """A request got fastlb's 503 (no backend), or a 502/504 (a backend failed it). Logged at most
        once a second, so a dead pool is not a log flood."""
        self.failures += 1
        now = self.loop.time()
        if now - self.last_failure_log >= 1.0:
            log.warning("%d to %s: %s (%d since last report)", status, client.client_ip.decode(),
                        reason, self.failures)
            self.failures = 0
            self.last_failure_log = now
