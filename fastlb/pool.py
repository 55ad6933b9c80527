"""Backends around the core's indexes, connection limits, the wait queue, and the connect-retry loop.

The core (`fastlb.Balancer`) knows backends by index and decides who is next; this module owns the
`Backend` objects (address, limits, PROXY protocol choice) and the one loop that turns picks into a
connected socket: pick, connect, on failure report it and pick again avoiding the one that failed
("candidates, not winners"). L4 uses it now; the HTTP mode will use the same `BackendPool.connect`.

Limits, per worker process (like HAProxy's per-process maxconn):
- `maxconn` bounds relayed connections (those holding or acquiring a backend connection);
- a backend's `maxconn` bounds its connections: a full backend is put in the core's `drain` state, so
  picks skip it at no cost, and back to its own state when a connection ends;
- over either limit a connection waits in one FIFO queue (`queue_size` places, `queue_timeout` seconds).

Backups live in a second Balancer: they are picked only when no primary can be (every primary down,
or every primary already tried by this connection).

A backend is two objects: `Backend` (here) is who it is (address, weight, group, limits, TLS), where the
core keeps it, its slots, counters and idle connections; its `health` (fastlb/health.py's `HealthState`)
holds the sources of its state (the operator's state, the active checks' verdict, a passive ejection),
the streaks and the timers. Health publishes the effective state and the (slow-start) weight to the
`Backend` (`publish_state`, `publish_weight`); selection here only reads them, adding one thing of its
own: a backend at its maxconn (`full`) is drained in the core until a connection ends.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
from time import monotonic
from typing import Callable

from fastlb import Balancer
from fastlb.config import BackendSpec, Config, HealthSettings
from fastlb.health import CONNECT, RESPONSE, BackendHealth, HealthState, own_resource_error
from fastlb.observe import Traffic
from fastlb.tls import backend_context, backend_contexts

log = logging.getLogger("fastlb")


class NoBackendError(Exception):
    """No backend can take the connection: all are down, or every candidate failed to connect.
    tls_failure: a candidate's TLS handshake failed (its certificate did not verify, mostly): the HTTP
    mode answers 502 Bad Gateway then, not 503."""

    tls_failure = False


class QueueError(Exception):
    """The wait queue is full, or the connection waited longer than queue_timeout."""


OWN_FAILURE_LOG_INTERVAL = 1.0      # seconds between two warnings about connects failing on fastlb's limits


class Backend:
    """One backend server as selection sees it. `index` is its slot in `balancer` (the primary or the
    backup Balancer); `state` is what its health publishes; `health` is that health (only the pool's
    BackendHealth changes it)."""

    # Compiled, its attributes are the C fields that fastlb/pool.pxd declares (no others can be set).

    def __init__(self, spec: BackendSpec, index: int, balancer: Balancer) -> None:
        # Who it is
        self.spec = spec
        self.host = spec.host
        self.port = spec.port
        self.address = spec.address
        self.is_backup = spec.backup
        self.maxconn = spec.maxconn
        self.send_proxy = spec.send_proxy
        # TLS to the backend (set by the pool): a verification failure is a failed connect.
        self.ssl_context: ssl.SSLContext | None = None
        self.server_hostname = spec.sni or spec.host if spec.ssl else None
        # Where the core keeps it, and the BackendPool holding it (set by the pool)
        self.pool = None
        self.index = index
        self.balancer = balancer
        self.removed = False        # removed at run time: its core slot is gone, live connections finish
        # Published by its health: "up" (can take new connections), "drain" (finishes its connections,
        # takes no new one) or "down"
        self.state = "up"
        self.health: HealthState | None = None     # set by the pool once the backend has its core slot
        # Slots: a backend at maxconn is `full`, drained in the core until a connection ends
        self.inflight = 0
        self.full = False
        self.traffic = Traffic()
        # HTTP mode: idle keep-alive connections to this backend, oldest first (reused from the right,
        # expired from the left). They hold no slot: a slot is a request in flight.
        self.idle: collections.deque = collections.deque()
        # proto=h2: its multiplexed connections (fastlb/http2/backend.py's H2Backend, set by the pool); a
        # request's slot is taken and given back as for any other, its connection is shared.
        self.h2 = None

    def take_idle(self):
        """An idle keep-alive connection (HTTP mode) still open, the most recently parked first; None."""
        idle = self.idle
        while idle:
            upstream = idle.pop()
            if upstream.transport is not None and not upstream.transport.is_closing():
                return upstream
        return None

    # ---- what health publishes (fastlb.health.Selection) ----------------------------------------

    def publish_state(self, state: str) -> None:
        self.state = state
        self._commit()

    def publish_weight(self, weight: int) -> None:
        if not self.removed:
            self.balancer.set_weight(self.index, weight)

    def _commit(self) -> None:
        """Tells the core the published state, drained while full (a no-op there when nothing changed)."""
        if self.removed:
            return
        effective = "drain" if self.full and self.state == "up" else self.state
        self.balancer.set_state(self.index, effective)

    def __repr__(self) -> str:
        return f"<Backend {self.address} inflight={self.inflight} state={self.state}>"


MAX_CORE_WEIGHT = 256
SLOWSTART_WEIGHT_SCALE = 16      # enough for a smooth ramp, small enough for weights up to 16

_FULL = object()   # select() result: a backend exists but is at its limit: wait in the queue


class BackendPool:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, maxconn: int) -> None:
        self.loop = loop
        self.maxconn = maxconn
        self.queue_size = config.queue_size
        self.queue_timeout = config.queue_timeout
        self.connect_timeout = config.connect_timeout
        self.attempts = config.retries + 1
        self.active = 0                      # connections holding a backend slot
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.woken = 0                       # waiters told a slot is free that have not run yet
        settings = [config.health_for(spec) for spec in config.backends]
        # Slow start lowers a returning backend's weight in steps; integer weights of 1 cannot go
        # lower, so with slow start on every core weight is the configured one times weight_scale.
        self.weight_scale = 1
        if any(s.slowstart for s in settings):
            self.weight_scale = max(1, min(SLOWSTART_WEIGHT_SCALE,
                                           MAX_CORE_WEIGHT // max(1, *(b.weight for b in config.backends))))
        primaries = [spec for spec in config.backends if not spec.backup]
        backups = [spec for spec in config.backends if spec.backup]
        self.primary = self._balancer(config, primaries, self.weight_scale)
        self.backup = self._balancer(config, backups, self.weight_scale) if backups else None
        self.primaries: list[Backend] = []
        self.backups: list[Backend] = []
        self.by_address: dict[str, Backend] = {}      # what health and admin messages name
        self.config = config
        self.track_latency = False           # connect-time histogram, on when metrics are served
        # HTTP mode with the C engine running: the engine, the other storage of its backends' idle
        # keep-alive connections (one pool per backend, two storages: connect() takes the engine's when
        # Backend.idle is empty; remove_backend closes both; fastlb/http/_fast.pyx take_idle_socket).
        self.idle_keeper = None
        # Client contexts for TLS backends, one per `verify` setting (shared: they hold the session cache).
        self.tls_contexts = backend_contexts(config.backends)
        self.last_tls_warning = 0.0
        self.last_own_failure_warning = 0.0
        self.own_failures = 0                # connects that failed on fastlb's own limits since the last warning
        self.health = BackendHealth(loop, config)
        for spec, health in zip(config.backends, settings):
            self._append(spec, health)

    def _append(self, spec: BackendSpec, health: HealthSettings, added: bool = False) -> Backend:
        """A backend's objects: in the core (at once, or already there when `added` is False: the
        Balancers were built with the configured ones), in the pool's lists, and in health's keeping.
        One added at run time while the active checks are on starts down, until the checks pass."""
        if spec.backup and self.backup is None:
            self.backup = self._balancer(self.config, [], self.weight_scale)
        group, balancer = (self.backups, self.backup) if spec.backup else (self.primaries, self.primary)
        # Indexes are the core's: it never reuses a removed slot, so neither do these lists.
        backend = Backend(spec, len(group), balancer)
        backend.pool = self
        if added:
            balancer.add(spec.address, spec.weight * self.weight_scale)
        backend.health = self.health.track(backend, health, spec.weight * self.weight_scale, spec.backup,
                                           checked_up=not added or health.check == "none")
        if spec.ssl:
            context = self.tls_contexts.get(spec.verify)
            if context is None:              # a backend added at run time with a verify of its own
                context = self.tls_contexts[spec.verify] = backend_context(spec.verify)
            backend.ssl_context = context
        if spec.proto == "h2":
            from fastlb.http2.backend import H2Backend
            backend.h2 = H2Backend(backend, self.loop, self.connect_timeout)
        group.append(backend)
        self.by_address[spec.address] = backend
        return backend

    # ---- run-time changes (admin API, reload, discovery); each a no-op when nothing changes ----

    def find(self, address: str) -> Backend:
        try:
            return self.by_address[address]
        except KeyError:
            raise KeyError(f"no backend {address}") from None

    def add_backend(self, spec: BackendSpec) -> Backend | None:
        """Adds a backend (None if one with that address exists). It starts up, unless the active checks
        are on: then it starts down until the master's checks pass, as a new server should."""
        if spec.address in self.by_address:
            return None
        backend = self._append(spec, self.config.health_for(spec), added=True)
        log.info("backend %s added (weight %d%s)", spec.address, spec.weight, ", backup" if spec.backup else "")
        return backend

    def remove_backend(self, address: str) -> Backend:
        """Removes a backend from the core at once; its live connections finish."""
        backend = self.find(address)
        self.health.forget(backend.health)
        while backend.idle:                      # HTTP mode: its idle keep-alive connections go now
            backend.idle.pop().transport.close()
        if self.idle_keeper is not None:
            self.idle_keeper.close_idle(backend)
        backend.balancer.remove(backend.index)
        backend.removed = True
        backend.full = False
        del self.by_address[address]
        log.info("backend %s removed (%d live connection(s) finish)", address, backend.inflight)
        return backend

    def set_weight(self, address: str, weight: int) -> None:
        """The configured weight; a backend ramping up after slow start continues towards it."""
        backend = self.find(address)
        backend.spec.weight = weight
        self.health.set_full_weight(backend.health, weight * self.weight_scale)
        log.info("backend %s weight %d", address, weight)

    def set_admin_state(self, address: str, state: str) -> None:
        backend = self.find(address)
        if backend.health.admin_state == state:
            return
        self.health.set_admin_state(backend.health, state)
        log.info("backend %s %s by the operator", address, {"up": "enabled", "drain": "draining",
                                                            "maint": "disabled"}[state])

    @staticmethod
    def _balancer(config: Config, specs: list[BackendSpec], weight_scale: int) -> Balancer:
        bounded = config.bounded_load if config.algorithm in ("hash", "ketama", "maglev") else 0.0
        return Balancer([spec.address for spec in specs], algorithm=config.algorithm,
                        weights=[spec.weight * weight_scale for spec in specs], bounded_load=bounded,
                        seed=config.seed)

    def _tls_failure(self, backend: Backend, exc: ssl.SSLError) -> None:
        """A failed TLS handshake with a backend (a bad certificate, mostly) is a configuration or
        security problem, so it is a warning, not debug; at most one line a second."""
        now = self.loop.time()
        if now - self.last_tls_warning >= 1.0:
            self.last_tls_warning = now
            reason = getattr(exc, "verify_message", None) or exc.reason or str(exc)
            log.warning("TLS handshake with backend %s failed: %s", backend.address, reason)

    def close(self) -> None:
        """Cancels the health timers (ejections, slow-start steps)."""
        self.health.close()

    @property
    def backends(self) -> list[Backend]:
        """Every backend not removed."""
        return [b for b in self.primaries + self.backups if not b.removed]

    # ---- slots --------------------------------------------------------------------------------

    def _select(self, key: bytes | None, tried: list[Backend], pinned: Backend | None = None
                ) -> Backend | object | None:
        """Picks a backend and takes a slot on it: a Backend, _FULL (wait), or None (nothing can serve).

        A pinned backend (session persistence) is taken when it is up and this request has not failed
        on it; when it is full the request waits for it, like any other. Otherwise primaries first,
        avoiding the last one that failed; backups once no untried primary is left."""
        if self.active >= self.maxconn:
            return _FULL
        if pinned is not None and pinned.state == "up" and pinned not in tried:
            if pinned.full:
                return _FULL
            self._take(pinned)
            return pinned
        backend = self._pick(self.primary, self.primaries, key, tried)
        if backend is None:
            # Primaries at their maxconn are busy, not unavailable: wait for them (HAProxy does the
            # same); backups are for when no primary is up or every one failed this connection.
            if self._busy(self.primaries, tried):
                return _FULL
            if self.backup is not None:
                backend = self._pick(self.backup, self.backups, key, tried)
            if backend is None:
                if self._busy(self.backups, None):
                    return _FULL
                return None
        self._take(backend)
        return backend

    @staticmethod
    def _busy(backends: list[Backend], tried: list[Backend] | None) -> bool:
        """Whether one of `backends` is up but at its maxconn (and not tried): then the request waits."""
        for b in backends:
            if b.full and b.state == "up" and (tried is None or b not in tried):
                return True
        return False

    @staticmethod
    def _pick(balancer: Balancer, backends: list[Backend], key: bytes | None,
              tried: list[Backend]) -> Backend | None:
        if not backends:
            return None
        avoid = tried[-1].index if tried and tried[-1].balancer is balancer else -1
        index = balancer.pick(key, avoid)
        if index < 0:
            return None
        backend = backends[index]
        if backend in tried:
            # The core only avoids the last failure; when it hands back an earlier one, every
            # candidate it has has been tried by this connection.
            untried = [b for b in balancer.candidates(key, len(backends)) if backends[b] not in tried]
            if not untried:
                return None
            backend = backends[untried[0]]
        return backend

    def _take(self, backend: Backend) -> None:
        self.active += 1
        backend.inflight += 1
        backend.balancer.on_connect(backend.index)
        if backend.maxconn and backend.inflight >= backend.maxconn and not backend.full:
            backend.full = True
            backend._commit()

    def release(self, backend: Backend) -> None:
        """A connection that held a slot on backend has ended (or its connect failed)."""
        self.active -= 1
        backend.inflight -= 1
        if not backend.removed:
            backend.balancer.on_close(backend.index)
        if backend.full and backend.inflight < backend.maxconn:
            backend.full = False
            backend._commit()
        if self.waiters:
            self._wake_one()

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.woken += 1
                return

    async def _wait_for_slot(self, deadline: float) -> None:
        if len(self.waiters) >= self.queue_size:
            raise QueueError("wait queue full")
        waiter = self.loop.create_future()
        self.waiters.append(waiter)
        handed_a_slot = False
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
            handed_a_slot = True
        except TimeoutError:
            raise QueueError("timed out in the wait queue") from None
        finally:
            if waiter.done() and not waiter.cancelled():
                self.woken -= 1
                if not handed_a_slot:
                    self._wake_one()      # woken, then cancelled or timed out: pass the slot on
            else:
                waiter.cancel()
                try:
                    self.waiters.remove(waiter)
                except ValueError:
                    pass

    def select_now(self, key: bytes | None, tried: list[Backend], pinned: Backend | None = None
                   ) -> Backend | None:
        """The synchronous fast path (HTTP mode): a backend with a slot taken, or None when the caller
        must go through `connect` (someone is queued, everything is full, or nothing can serve). The
        backend returned is the caller's to use (e.g. an idle connection from `backend.idle`), or to
        hand to `connect(..., selected=backend)` so the same pick is connected to."""
        if self.waiters or self.woken:
            return None
        backend = self._select(key, tried, pinned)
        if backend is _FULL or backend is None:
            return None
        return backend

    # ---- the connect loop: candidates, not winners --------------------------------------------

    async def connect(self, key: bytes | None, protocol_factory: Callable[[], asyncio.Protocol],
                      tried: list[Backend] | None = None, selected: Backend | None = None,
                      pinned: Backend | None = None, from_idle_keeper: bool = True
                      ) -> tuple[Backend, asyncio.Transport, asyncio.Protocol]:
        """Connects to a backend, retrying the next candidate after a failed connect.

        Each failure is reported to the core (`on_response(ok=False)`) and the next pick avoids it;
        at most `retries + 1` attempts. Waits in the queue when every candidate is at its limit. The
        slot taken is the caller's to `release()` once the connection ends. Raises NoBackendError or
        QueueError; never leaves a slot taken when it raises.

        HTTP mode passes `tried` (backends that already failed this request, avoided and counted
        against the attempts) and `selected` (a backend select_now already took a slot on). `pinned`:
        the session's backend, preferred while it is up and has not failed this connection.
        from_idle_keeper: False for the C engine's own connects (it looked in its idle pool already)."""
        loop = self.loop
        if tried is None:
            tried = []
        queue_deadline = None
        attempts = self.attempts                 # per connection (HTTP: per request, retries included)
        tls_failure = False                      # a candidate failed its TLS handshake
        while True:
            # A connection already waiting has priority over one that just arrived.
            if selected is not None:
                backend, selected = selected, None        # a slot already taken by select_now
            elif (self.waiters or self.woken) and queue_deadline is None:
                backend = _FULL
            else:
                backend = self._select(key, tried, pinned)
            if backend is _FULL:
                if queue_deadline is None:
                    queue_deadline = loop.time() + self.queue_timeout
                await self._wait_for_slot(queue_deadline)
                continue
            if backend is None:
                error = NoBackendError("no backend available" if not tried else
                                       f"connect failed to {len(tried)} backend(s)")
                error.tls_failure = tls_failure
                raise error
            if backend.idle:
                # HTTP mode: a request that waited for its slot (or for a retry) takes a keep-alive
                # connection the request before it left, as one served at once does; connecting anew
                # would open a connection per queued request and park the old ones unused.
                upstream = backend.take_idle()
                if upstream is not None:
                    return backend, upstream.transport, upstream
            if self.idle_keeper is not None and from_idle_keeper:
                fd = self.idle_keeper.take_idle_socket(backend)
                if fd >= 0:
                    transport, upstream = await loop.create_connection(protocol_factory, sock=socket.socket(fileno=fd))
                    upstream.reused = True            # it waited idle: the keep-alive race rules apply
                    return backend, transport, upstream
            started = loop.time()
            precise_start = monotonic() if self.track_latency else 0.0   # uvloop's clock is in ms
            try:
                async with asyncio.timeout(self.connect_timeout):
                    if backend.h2 is not None:          # a stream on a shared connection (made if none)
                        transport, protocol = await backend.h2.open_stream(protocol_factory)
                    elif backend.ssl_context is None:
                        transport, protocol = await loop.create_connection(
                            protocol_factory, backend.host, backend.port)
                    else:
                        transport, protocol = await loop.create_connection(
                            protocol_factory, backend.host, backend.port, ssl=backend.ssl_context,
                            server_hostname=backend.server_hostname,
                            ssl_handshake_timeout=self.connect_timeout)
            except (OSError, TimeoutError) as exc:
                if isinstance(exc, ssl.SSLError):
                    tls_failure = True
                    self._tls_failure(backend, exc)
                if not self.connect_attempt_failed(backend, exc, loop.time() - started, tried):
                    raise NoBackendError(f"out of resources: {exc.strerror}") from None
                if len(tried) >= attempts:
                    error = NoBackendError(f"connect failed to {len(tried)} backend(s)")
                    error.tls_failure = tls_failure
                    raise error from None
                continue
            except BaseException:
                self.release(backend)
                raise
            self.connect_worked(backend, loop.time() - started,
                                monotonic() - precise_start if self.track_latency else 0.0, bool(tried))
            return backend, transport, protocol

    # ---- outcomes, wherever the connect or the request ran (here, the relay thread, the HTTP engine) --

    def connect_worked(self, backend: Backend, seconds: float, precise_seconds: float, retried: bool) -> None:
        """A connect to backend worked: the core and passive health hear it, the counters count it."""
        if not backend.removed:
            backend.balancer.on_response(backend.index, seconds, True)
        backend.health.connect_failures = 0     # health.record(ok=True) inlined: once per connection
        if retried:
            backend.traffic.retries += 1
        if self.track_latency:
            backend.traffic.connect_time.observe(precise_seconds)

    def connect_attempt_failed(self, backend: Backend, error: BaseException, seconds: float,
                               tried: list[Backend]) -> bool:
        """A connect attempt failed: its slot goes back, it counts against backend, which joins `tried`.
        False when the failure was fastlb's own (out of file descriptors: `own_resource_error`): then
        nothing counts against the backend, and trying another one would fail the same way."""
        self.release(backend)
        if own_resource_error(error):
            self._own_failure(backend, error)
            return False
        backend.traffic.connect_errors += 1
        tried.append(backend)
        if not backend.removed:
            backend.balancer.on_response(backend.index, seconds, False)
            self.health.record(backend.health, False, CONNECT, error)
        log.debug("connect to %s failed (%s); attempt %d of %d", backend.address,
                  # asyncio's timeout says nothing itself: its name does; an OSError its errno and text
                  error.__class__.__name__ if isinstance(error, TimeoutError) and not error.args else error,
                  len(tried), self.attempts)
        return True

    def _own_failure(self, backend: Backend, error: OSError) -> None:
        """A WARNING at most once a second with the count since the last one: at the limit every connect
        fails, and the log must not become the next thing to run out."""
        self.own_failures += 1
        now = self.loop.time()
        if now - self.last_own_failure_warning >= OWN_FAILURE_LOG_INTERVAL:
            self.last_own_failure_warning = now
            log.warning("connect to %s failed in fastlb, not at the backend: %s (%d time(s) since the last "
                        "report; not counted against the backend). Raise the open-files limit or lower "
                        "--maxconn.", backend.address, error.strerror or error, self.own_failures)
            self.own_failures = 0

    def response_done(self, backend: Backend, seconds: float, ok: bool, status: int, detail: str = "") -> None:
        """A request's response ended (or failed: `detail`, else its status says why): the core and passive
        health hear the outcome, and the request's slot goes back (a backend removed meanwhile has no core
        slot left to tell: its last requests end like any other)."""
        if not backend.removed:
            backend.balancer.on_response(backend.index, seconds, ok)
        if not ok:
            self.health.record(backend.health, False, RESPONSE, detail or f"status {status}")
        elif backend.health.bad_responses:
            self.health.record(backend.health, True, RESPONSE)
        self.release(backend)
