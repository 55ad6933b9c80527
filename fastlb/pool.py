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

A backend's state in the core combines four sources (see `Backend.refresh`): the operator's state
(`up` / `drain`), the active health checks (`checked_up`), a passive ejection (`ejected`), and the
`full` flag. fastlb/health.py changes the health parts; this module only combines them.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from typing import Callable

from fastlb import Balancer
from fastlb.config import BackendSpec, Config, HealthSettings
from fastlb.health import CONNECT, BackendHealth
from fastlb.tls import backend_contexts

log = logging.getLogger("fastlb")


class NoBackendError(Exception):
    """No backend can take the connection: all are down, or every candidate failed to connect.
    tls_failure: a candidate's TLS handshake failed (its certificate did not verify, mostly): the HTTP
    mode answers 502 Bad Gateway then, not 503."""

    tls_failure = False


class QueueError(Exception):
    """The wait queue is full, or the connection waited longer than queue_timeout."""


class Backend:
    """One backend server. `index` is its slot in `balancer` (the primary or the backup Balancer)."""

    __slots__ = ("spec", "host", "port", "address", "index", "balancer", "is_backup", "maxconn",
                 "inflight", "send_proxy", "state", "full", "admin_state", "checked_up", "ejected",
                 "health", "full_weight", "connect_failures", "bad_responses", "ejections",
                 "returned_at", "eject_handle", "ramp_handle", "ssl_context", "server_hostname", "idle")

    def __init__(self, spec: BackendSpec, index: int, balancer: Balancer, health: HealthSettings,
                 full_weight: int) -> None:
        self.spec = spec
        self.host = spec.host
        self.port = spec.port
        self.address = spec.address
        self.index = index
        self.balancer = balancer
        self.is_backup = spec.backup
        self.maxconn = spec.maxconn
        self.inflight = 0
        self.send_proxy = spec.send_proxy
        # State: `state` is what the sources below make of it, without the full flag: "up" (can take
        # new connections), "drain" (finishes its connections, takes no new one) or "down".
        self.state = "up"
        self.admin_state = "up"     # the operator's: "up" or "drain"
        self.checked_up = True      # the active health checks' verdict
        self.ejected = False        # ejected by passive outlier detection, until eject_handle fires
        self.full = False           # at maxconn: drained in the core until a connection ends
        # Health bookkeeping (fastlb/health.py)
        self.health = health
        self.full_weight = full_weight       # the core weight when not ramping up after a return
        self.connect_failures = 0            # in a row, from live traffic
        self.bad_responses = 0               # in a row (5xx, response timeouts), fed by the HTTP mode
        self.ejections = 0                   # how many times in a row it was ejected: the n-th lasts n x base
        self.returned_at = 0.0
        self.eject_handle: asyncio.TimerHandle | None = None
        self.ramp_handle: asyncio.TimerHandle | None = None
        # TLS to the backend (set by the pool): a verification failure is a failed connect.
        self.ssl_context: ssl.SSLContext | None = None
        self.server_hostname = spec.sni or spec.host if spec.ssl else None
        # HTTP mode: idle keep-alive connections to this backend, oldest first (reused from the right,
        # expired from the left). They hold no slot: a slot is a request in flight.
        self.idle: collections.deque = collections.deque()

    @property
    def available(self) -> bool:
        """Can take new connections (ignoring the full flag, which only makes connections wait)."""
        return self.state == "up"

    def set_state(self, state: str) -> None:
        """The operator's state: "up", or "drain" (no new connections; live ones finish)."""
        if state not in ("up", "drain"):
            raise ValueError(f"operator state must be 'up' or 'drain', not {state!r}")
        self.admin_state = state
        self.refresh()

    def refresh(self) -> None:
        """Recombines the state sources and tells the core (a no-op there when nothing changed)."""
        self.state = "down" if self.ejected or not self.checked_up else self.admin_state
        self._commit()

    def _commit(self) -> None:
        effective = "drain" if self.full and self.state == "up" else self.state
        self.balancer.set_state(self.index, effective)

    def set_weight(self, weight: int) -> None:
        self.balancer.set_weight(self.index, weight)

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
        self.in_config_order: list[Backend] = []      # the index the master's health messages use
        for spec, health in zip(config.backends, settings):
            group, balancer = (self.backups, self.backup) if spec.backup else (self.primaries, self.primary)
            backend = Backend(spec, len(group), balancer, health, spec.weight * self.weight_scale)
            group.append(backend)
            self.in_config_order.append(backend)
        tls_contexts = backend_contexts(config.backends)
        for backend in self.in_config_order:
            if backend.spec.ssl:
                backend.ssl_context = tls_contexts[backend.spec.verify]
        self.last_tls_warning = 0.0
        self.health = BackendHealth(loop, self, config)

    @staticmethod
    def _balancer(config: Config, specs: list[BackendSpec], weight_scale: int) -> Balancer:
        bounded = config.bounded_load if config.algorithm in ("hash", "ketama", "maglev") else 0.0
        return Balancer([spec.address for spec in specs], algorithm=config.algorithm,
                        weights=[spec.weight * weight_scale for spec in specs], bounded_load=bounded,
                        seed=config.seed)

    def group_of(self, backend: Backend) -> list[Backend]:
        """The backends sharing backend's Balancer: the primaries or the backups."""
        return self.backups if backend.is_backup else self.primaries

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
        return self.primaries + self.backups

    # ---- slots --------------------------------------------------------------------------------

    def _select(self, key: bytes | None, tried: list[Backend]) -> Backend | object | None:
        """Picks a backend and takes a slot on it: a Backend, _FULL (wait), or None (nothing can serve).

        Primaries first, avoiding the last one that failed; backups once no untried primary is left."""
        if self.active >= self.maxconn:
            return _FULL
        backend = self._pick(self.primary, self.primaries, key, tried)
        if backend is None:
            # Primaries at their maxconn are busy, not unavailable: wait for them (HAProxy does the
            # same); backups are for when no primary is up or every one failed this connection.
            if any(b.full and b.state == "up" and b not in tried for b in self.primaries):
                return _FULL
            if self.backup is not None:
                backend = self._pick(self.backup, self.backups, key, tried)
            if backend is None:
                if any(b.full and b.state == "up" for b in self.backups):
                    return _FULL
                return None
        self._take(backend)
        return backend

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

    def select_now(self, key: bytes | None, tried: list[Backend]) -> Backend | None:
        """The synchronous fast path (HTTP mode): a backend with a slot taken, or None when the caller
        must go through `connect` (someone is queued, everything is full, or nothing can serve). The
        backend returned is the caller's to use (e.g. an idle connection from `backend.idle`), or to
        hand to `connect(..., selected=backend)` so the same pick is connected to."""
        if self.waiters or self.woken:
            return None
        backend = self._select(key, tried)
        if backend is _FULL or backend is None:
            return None
        return backend

    # ---- the connect loop: candidates, not winners --------------------------------------------

    async def connect(self, key: bytes | None, protocol_factory: Callable[[], asyncio.Protocol],
                      tried: list[Backend] | None = None, selected: Backend | None = None
                      ) -> tuple[Backend, asyncio.Transport, asyncio.Protocol]:
        """Connects to a backend, retrying the next candidate after a failed connect.

        Each failure is reported to the core (`on_response(ok=False)`) and the next pick avoids it;
        at most `retries + 1` attempts. Waits in the queue when every candidate is at its limit. The
        slot taken is the caller's to `release()` once the connection ends. Raises NoBackendError or
        QueueError; never leaves a slot taken when it raises.

        HTTP mode passes `tried` (backends that already failed this request, avoided and counted
        against the attempts) and `selected` (a backend select_now already took a slot on)."""
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
                backend = self._select(key, tried)
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
            started = loop.time()
            try:
                async with asyncio.timeout(self.connect_timeout):
                    if backend.ssl_context is None:
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
                self.release(backend)
                backend.balancer.on_response(backend.index, loop.time() - started, False)
                tried.append(backend)
                self.health.record(backend, False, CONNECT, exc)
                log.debug("connect to %s failed (%s); attempt %d of %d", backend.address,
                          exc.__class__.__name__ if isinstance(exc, TimeoutError) else exc,
                          len(tried), attempts)
                if len(tried) >= attempts:
                    error = NoBackendError(f"connect failed to {len(tried)} backend(s)")
                    error.tls_failure = tls_failure
                    raise error from None
                continue
            except BaseException:
                self.release(backend)
                raise
            backend.balancer.on_response(backend.index, loop.time() - started, True)
            backend.connect_failures = 0        # health.record(ok=True) inlined: once per connection
            return backend, transport, protocol
