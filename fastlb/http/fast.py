"""The C engine's Python side (fastlb/http/_fast.pyx): when it serves, and what it asks of Python.

`why_not` decides once per bind whether the engine may serve: only where a request needs nothing per
request from Python beyond routing it (when there are rules), picking a backend and giving its slot back
(metrics are counted when the slot goes back), and not when `FASTLB_HTTP_ENGINE=python` asks for the
Python path alone (the tests run both ways). The engine serves, with the Python path's semantics, the
access log (lines formatted in C into the same writer as the Python path's: fastlb/_accesslog.pyx),
request and response header rules (`--request-header-set/delete`, `--response-header-set/delete`,
`--via`), X-Forwarded-For, every hashing key, routing rules, TLS binds (the handshake and records in C,
on the bind's ServerTLS.native: fastlb/http/_etls.pxi), sticky sessions (without routing rules:
the engine gives the pool the backend a cookie pins, `select_sticky()` reads the stick table) and `--retry-on`
statuses, HSTS on TLS binds. A TLS client whose ALPN chose h2 is handed over right after its handshake
(HTTP/2 is fastlb/http2/'s). Still the Python path's: redirect and PROXY-protocol binds, TLS binds when the C
contexts are not built, sticky sessions and header/cookie keys with routing rules, TLS to backends
(`why_not` lists what applies; `handed_over` what the engine serving a bind still hands over because of
the config; both logged at start).

The engine accepts on the bind's listening socket itself (`listen()`). Per request it calls the pool
itself, without a frame of this module: the single pool's `select_now` (with routing rules,
`select_routed()`) and, when the response is in, the backend's pool's `response_done` (and the
observer's counters when metrics are on, kept in C and added on read: Observer.collect); rarely `connect()` (no idle backend connection: the pool
connects, with its retries, queue and timeouts, and the socket goes to the engine) and `adopt()`, which
gives a connection back to the Python path with the bytes the engine read and did not answer.
"""
from __future__ import annotations

import logging
import os
import socket

from fastlb.constants import (KEY_COOKIE, KEY_HEADER, KEY_NONE, KEY_PATH, KEY_QUERY, KEY_SOURCE, KEY_URI,
                              MAX_KEY_HEADERS)
from fastlb.http import errors
from fastlb.http.headers import H_CONNECTION, H_CONTENT_LENGTH, H_COOKIE, H_DROP, H_HOST
from fastlb.http.protocol import REPLAY_LIMIT, ClientConnection, client_subject_block
from fastlb.l4 import ACCEPT_PAUSE, DETACHED, is_ip_address
from fastlb.pool import NoBackendError, QueueError
from fastlb.tls import format_subject

log = logging.getLogger("fastlb")

ENGINE_ENV = "FASTLB_HTTP_ENGINE"      # "python": the engine stays off (tests compare both paths)
# Hashing keys the engine computes itself (RoutePool.key_kind -> Engine.key_kind).
KEY_KINDS = {None: KEY_NONE, "source": KEY_SOURCE, "uri": KEY_URI, "path": KEY_PATH, "header": KEY_HEADER,
             "cookie": KEY_COOKIE, "query": KEY_QUERY}
CAPTURED_KEYS = ("header", "cookie")   # keys on a request header: the engine keeps them without rules
STORE_MISS = object()                  # select_sticky: not in the local table, ask the shared store


def why_not(runtime, bind, server_tls=None) -> str | None:
    """Why the engine cannot serve this bind (server_tls: a TLS bind's fastlb.tls.ServerTLS): every
    feature of the config that keeps it off, joined (None: it serves)."""
    settings = runtime.settings
    router = runtime.router
    routes = list(router.pools.values())
    if os.environ.get(ENGINE_ENV, "c") == "python":
        return f"{ENGINE_ENV}=python"
    reasons = []
    if bind.ssl:
        if server_tls is None or server_tls.native is None:
            reasons.append("TLS bind without its C contexts (fastlb._crelay not built, or OpenSSL refused the files)")
    if bind.redirect_https is not None:
        reasons.append("redirect bind")
    if bind.accept_proxy:
        reasons.append("PROXY-protocol bind")
    admission = runtime.admission
    if admission is not None and admission.python_keys:
        reasons.append(f"rate limit keyed by {', '.join(admission.python_keys)}: the engine checks source, "
                       f"route, header and cookie keys only")
    if admission is not None and admission.engine_headers:
        if router.single is None:
            reasons.append("rate limit keyed by a header or cookie, with routing rules")
        elif len(admission.engine_headers) > MAX_KEY_HEADERS or any(
                name in settings.request_actions for name in admission.engine_headers):
            reasons.append(f"rate limits keyed by more than {MAX_KEY_HEADERS} headers, or by one fastlb "
                           f"rewrites")
        elif router.capture & set(admission.engine_headers):
            reasons.append("a rate limit keyed by a header a hashing key or sticky rule also reads")
    if router.single is None:
        # With routing rules, Python routes each request (select_routed) and sees no captured header.
        if any(rule.header_name for rule in router.rules):
            reasons.append("routing rules on headers")
        if any(route.sticky is not None for route in routes):
            reasons.append("sticky sessions with routing rules")
        if any(route.key_kind in CAPTURED_KEYS for route in routes):
            reasons.append("hashing keys on a header or cookie with routing rules")
    elif any(name in settings.request_actions and name != b"cookie" for name in router.capture):
        reasons.append("a hashing key or sticky rule on a header fastlb sets or removes")
    for route in routes:
        if route.key_kind not in KEY_KINDS:
            reasons.append(f"hashing key {route.key_kind}")
    if runtime.observer is not None and runtime.observer.access_log is not None \
            and runtime.observer.access_log.writer is None:
        reasons.append("access log without its C writer (fastlb._accesslog not built)")
    if not settings.fast_responses:
        reasons.append("the response scanner is not built")
    if any(backend.ssl_context is not None for route in routes for backend in route.pool.backends):
        reasons.append("TLS to backends")
    if any(backend.h2 is not None for route in routes for backend in route.pool.backends) \
            and not h2_backends_served(runtime):
        reasons.append("HTTP/2 backends (proto=h2) other than cleartext ones at IP addresses of one pool "
                       "without routing rules, sticky sessions or response header rules, with the engine's "
                       "HTTP/2 on")
    try:
        from fastlb.http import _fast  # noqa: F401
    except ImportError:
        reasons.append("the engine is not built")
    return "; ".join(reasons) or None


def h2_backends_served(runtime) -> bool:
    """Whether the engine serves HTTP/2 clients' streams to the pool's proto=h2 backends itself
    (fastlb/http/_eh2b.pxi): one pool without routing rules or a sticky rule, its backends all proto=h2
    in cleartext at IP addresses (a name would be looked up in the engine's event loop), no response
    header rules or HSTS, the engine's HTTP/2 on. (HTTP/1.1 clients of such a pool are handed to the
    Python path per request.)"""
    try:
        from fastlb.http._fast import H2_ENGINE_ENV
    except ImportError:
        return False
    route = runtime.router.single
    settings = runtime.settings
    return (route is not None and route.sticky is None and runtime.h2 is not None
            and os.environ.get(H2_ENGINE_ENV) != "0"
            and bool(route.pool.backends)
            and all(backend.h2 is not None and backend.ssl_context is None and is_ip_address(backend.host)
                    for backend in route.pool.backends)
            and not settings.response_block and not settings.response_dropped and not route.hsts_block)


def handed_over(runtime) -> list[str]:
    """What the engine, serving a bind, still hands to the Python path because of the config (beyond
    what it hands over whatever the config: malformed or unusual requests and responses)."""
    settings = runtime.settings
    handed = []
    watch = [name.decode("latin-1") for name in settings.response_watch]
    if watch:
        handed.append(f"responses with {', '.join(watch)} (a sticky rule reads them)")
    if settings.retry_statuses:
        handed.append(f"responses with a --retry-on status ({', '.join(map(str, sorted(settings.retry_statuses)))}) "
                      f"to a request that may be sent again")
    if settings.cookie_held or runtime.router.capture:
        handed.append("requests repeating a header a hashing key or sticky rule reads, or a Cookie header "
                      "over 4096 bytes")
    return handed


class EngineStream(ClientConnection):
    """An HTTP/2 stream of a connection the engine serves (fastlb/http/_eh2.pxi), handed to the Python
    path: its one HTTP/1.1 request comes over a socketpair, its response goes back over it. The engine
    counts the connection (admission): the stream neither enters nor leaves the count."""

    __slots__ = ()

    def connection_made(self, transport) -> None:
        self.head_started = -1.0            # (a stream's request is never a connection preface)
        super().connection_made(transport)
        self.admitted = False


class FastPath:
    """One worker's engine and the Python it calls."""

    def __init__(self, runtime, bind) -> None:
        from fastlb.http._fast import Engine
        self.runtime = runtime
        self.loop = runtime.loop
        self.bind = bind
        self.binds: list = []                 # by the engine's listener index: the bind a client came on
        self.router = runtime.router
        # One pool without rules: the engine hashes and checks the body size itself, and picks with the
        # pool's select_now (Engine.select). With rules: select_routed() routes each request; a backend's
        # connect and release go to the pool holding it (Backend.pool).
        self.route = runtime.router.single
        self.pool = self.route.pool if self.route is not None else None
        self.sticky = self.route.sticky if self.route is not None else None
        self.STORE_MISS = STORE_MISS
        self.replay_limit = REPLAY_LIMIT
        self.no_tries: list = []              # select_now's `tried`: never appended to
        self.bad_gateway = (errors.response(502, False), errors.response(502, True))   # by close
        self.adopting = 0                     # connections between the engine and the Python path
        self.observer = runtime.observer      # metrics; the access log's C writer goes to the engine
        access_log = self.observer.access_log if self.observer is not None else None
        self.access_log = access_log.writer if access_log is not None else None
        self.wall_offset = self.observer.wall_offset if self.observer is not None else 0.0
        self.gate = None                      # the worker's AcceptGate (fastlb/l4.py), set when it has one
        self.h2_backends_served = h2_backends_served(runtime)
        self.hsts_on = any(route.hsts_block for route in runtime.router.pools.values())
        self.engine = Engine(self, self.loop, runtime.settings, self.route is None,
                             self.route.max_body_size if self.route is not None else 0,
                             KEY_KINDS[self.route.key_kind] if self.route is not None else 0,
                             runtime.settings.request_actions,
                             {"drop": H_DROP, "host": H_HOST, "connection": H_CONNECTION,
                              "content-length": H_CONTENT_LENGTH, "cookie": H_COOKIE},
                             errors.response(408, True), runtime.admission,
                             runtime.admission.pool_ids.get(self.route.name, -3)
                             if runtime.admission is not None and self.route is not None else -1)

    def start(self) -> None:
        if self.observer is not None:
            self.observer.collectors.append(self.engine.flush_counts)
        self.loop.add_reader(self.engine.fileno, self.engine.on_ready)

    def stop(self) -> None:
        self.loop.remove_reader(self.engine.fileno)
        self.engine.close_all()
        if self.observer is not None and self.engine.flush_counts in self.observer.collectors:
            self.engine.flush_counts()
            self.observer.collectors.remove(self.engine.flush_counts)

    @property
    def live(self) -> int:
        return self.engine.live + self.adopting

    def counts(self) -> dict:
        """What the engine served itself since start (requests answered in C), what it handed to the
        Python path, by reason (Engine.HANDED_REASONS), and its TLS handshakes that failed or timed out:
        the worker's snapshot (/stats.json "engine", the fastlb_http_engine_* metrics)."""
        engine = self.engine
        return {"requests": engine.served, "handed_over": engine.handed_over(),
                "tls_handshake_failures": engine.handshake_failures, "h2_connections": engine.h2_connections,
                "h2_backend_streams": engine.h2_backend_streams}

    def listen(self, sock, bind, server_tls=None, handshake_timeout: float = 0.0) -> None:
        """The engine accepts the bind's connections itself (on a duplicate of its listening socket); a
        TLS bind's (server_tls: its fastlb.tls.ServerTLS) handshakes end within handshake_timeout."""
        self.binds.append(bind)
        self.engine.listen(os.dup(sock.fileno()), len(self.binds) - 1,
                           server_tls.native if server_tls is not None else None, handshake_timeout)
        handed = handed_over(self.runtime)
        if handed:
            log.info("%s: HTTP engine hands to the Python path: %s", bind.address, "; ".join(handed))

    # ---- called by the engine ----------------------------------------------------------------------

    def select_sticky(self, key, sticky_key):
        """A learned or source sticky key (the pool without routing rules): (backend with a slot taken
        or None, the backend its local table pins or None), as the Python path picks and records it;
        STORE_MISS when not in the local table while the shared store is up (then connect() asks it)."""
        sticky = self.sticky
        pinned = sticky.pinned_by_key(sticky_key)
        if pinned is None and sticky.store.shared and sticky.store.up:
            return STORE_MISS
        backend = self._take(self.pool, key, pinned)
        if backend is not None and sticky.sticks(pinned, backend):
            sticky.record(sticky_key, backend)
        return backend, pinned

    def _take(self, pool, key, pinned=None):
        """pool's pick with its slot taken; None when nothing can be picked now, or the pick speaks TLS
        (a backend added at run time: the engine relays plain bytes). Engine.select is the same in C."""
        backend = pool.select_now(key, self.no_tries, pinned)
        if backend is not None and backend.ssl_context is not None:
            pool.release(backend)
            return None
        return backend

    def select_routed(self, method: bytes, url: bytes, host: bytes, client_ip: bytes, length: int):
        """With routing rules: (backend with a slot taken, hashing key), the seconds to wait (a float:
        over a rate limit, the engine answers 429 in the form the connection needs), or None for the
        Python path (nothing to pick now, a body over the routed pool's limit: 413)."""
        route = self.router.route(method, url, host, None)
        admission = self.runtime.admission
        if admission is not None and admission.specs:        # first: a None below means checked
            wait = admission.check_request(client_ip, url, None, route.name)
            if wait:
                return float(wait)
        if route.max_body_size and length > route.max_body_size:
            return None
        key = route.key(client_ip, url, None) if route.key_kind else None
        backend = self._take(route.pool, key)
        if backend is None:
            return None
        return backend, key

    def accept_paused(self, error: int) -> None:
        """The engine's listeners rest: at the client limit (error 0) or out of files. The worker's
        AcceptGate resumes them."""
        if self.gate is not None:
            self.gate.paused(error)
        else:
            self.loop.call_later(ACCEPT_PAUSE, self.engine.resume_accepting)

    def subject_block(self, subject: tuple) -> bytes:
        """The client-subject header line of a verified client certificate (its subject as
        getpeercert() gives it), once per mTLS connection: the Python path's own."""
        return client_subject_block(format_subject(subject))

    def route_of(self, pool):
        return next(route for route in self.router.pools.values() if route.pool is pool)

    def route_name(self, pool) -> str:
        return self.route_of(pool).name

    def hsts_block(self, backend) -> bytes:
        """The Strict-Transport-Security line of the backend's pool (b"": none), for its TLS clients."""
        return self.route_of(backend.pool).hsts_block

    def log_names(self, backend) -> tuple[bytes, bytes]:
        """The access log's pool and backend names for a backend the engine serves (once per backend)."""
        return self.route_name(backend.pool).encode(), backend.address.encode()

    def connect(self, token: int, backend, key, pinned=None, sticky_key=None) -> None:
        self.loop.create_task(self._connect(token, backend, key, pinned, sticky_key))

    async def _connect(self, token: int, backend, key, pinned, sticky_key) -> None:
        """Connects `backend` (its slot taken; the pool tries others if it fails) for the engine's
        request `token`; backend None: a sticky key not in the local table, the shared store is asked
        first (Sticky.fetch, bounded) and the pool picks. The key then records the backend connected,
        as the Python path does."""
        runtime = self.runtime
        selected = backend
        pool = self.pool
        try:
            if backend is None:
                pinned = await self.sticky.fetch(sticky_key)
            else:
                pool = backend.pool
            # from_idle_keeper False: the engine looked in its idle pool already
            backend, transport, protocol = await pool.connect(key, lambda: DETACHED, [], backend, pinned, False)
        except (NoBackendError, QueueError) as exc:
            runtime.failures += 1
            status = 502 if getattr(exc, "tls_failure", False) else 503
            name = self.route_name(pool)
            if self.observer is not None and status == 503:
                self.observer.count_refused(name)
            self.engine.connect_failed(token, errors.response(status, False), errors.response(status, True),
                                       status, name.encode())
            return
        except BaseException:
            self.engine.connect_failed(token, errors.response(503, True), errors.response(503, True))
            raise
        try:
            fd = os.dup(transport.get_extra_info("socket").fileno())
        except OSError:
            transport.abort()
            pool.release(backend)
            self.engine.connect_failed(token, errors.response(503, False), errors.response(503, True))
            return
        transport.abort()                  # its protocol is DETACHED: nothing is told of the abort
        if sticky_key is not None and backend is not selected and self.sticky.sticks(pinned, backend):
            self.sticky.record(sticky_key, backend)
        # Not DETACHED: a keep-alive connection the Python path had parked in Backend.idle.
        self.engine.connected(token, backend, fd, protocol is not DETACHED)

    def adopt(self, fd: int, data: bytes, inflight, limits_checked: bool = False, tls=None) -> None:
        self.adopting += 1
        self.loop.create_task(self._adopt(fd, data, inflight, limits_checked, tls))

    async def _adopt(self, fd: int, data: bytes, inflight, limits_checked: bool = False, tls=None) -> None:
        """The client socket becomes a uvloop transport of a ClientConnection that is fed `data` (or the
        request in flight, attached to its backend connection, which is fed the response bytes read).
        tls: a TLS client's (bind index, client address, client-subject header line, ALPN chose h2, False):
        fd is then the Python end of the socketpair the engine relays the decrypted stream over; or an
        HTTP/2 stream's the engine serves the connection of (..., False, True): its one HTTP/1.1 request
        arrives and its response leaves over the socketpair (fastlb/http/_eh2.pxi), and the connection
        is counted (admission) by the engine, not here."""
        loop = self.loop
        backend_sock = None
        try:
            if tls is None:
                client = ClientConnection(self.runtime, self.bind)   # any plain bind will do
            else:
                bind, client_ip, subject_block, h2, stream = tls
                client = (EngineStream if stream else ClientConnection)(self.runtime, self.binds[bind])
                client.client_ip = client_ip         # the socketpair has no peer address, nor ALPN
                client.tls_block = subject_block
                client.alpn_h2 = h2
            client.admitted = self.runtime.admission is not None     # counted at the engine's accept
            client.limits_checked = limits_checked                   # its first request's rate limits too
            client_sock = socket.socket(fileno=fd)
            if inflight is None:
                client.pending_input = data
                upstream = None
            else:
                backend, backend_fd, request, response, sent_at, sent_whole, sent_any, reused = inflight
                backend_sock = socket.socket(fileno=backend_fd)
                upstream = self.runtime.backend_factory()
                upstream.pending_input = response
                upstream.reused = reused
                # sent_at: CLOCK_MONOTONIC, as loop.time()
                client.adopting = (upstream, backend, sent_at, sent_whole, sent_any)
                client.pending_input = request
            await loop.connect_accepted_socket(lambda: client, client_sock)
            if upstream is not None:
                sock, backend_sock = backend_sock, None
                await loop.connect_accepted_socket(lambda: upstream, sock)
        except Exception:
            log.exception("handing a connection to the Python path failed")
            if backend_sock is not None:
                backend_sock.close()
        finally:
            self.adopting -= 1
            if not self.adopting and self.runtime.on_idle is not None:
                self.runtime.on_idle()          # draining: a hand-over that failed may have been the last
