"""The L4 relay: asyncio protocols that copy bytes between a client and a backend.

Hot path (one call per chunk read): `data_received` writes the chunk to the other side's transport and
sets an activity flag. Nothing else runs per chunk: no timer re-arming (the idle timeout is a coarse
periodic sweep over the flags, `TcpPath.sweep`), no logging, no allocation beyond the bytes object
uvloop hands over. `Protocol` rather than `BufferedProtocol`: uvloop keeps a reference to a partially
written buffer, so a shared read buffer would need a copy anyway, and a per-connection one would cost
64 KiB of memory per idle connection.

Per connection: a `ClientSide` (accepted socket, owns the connection's state) and a thin `BackendSide`;
until the backend is connected, a `PendingClient` holds what the client sends early (uvloop starts
reading right after `connection_made`, so pausing there would not stick) and reads PROXY headers.
Backpressure both ways: a side whose write buffer passes the high-water mark pauses reading on the other
side until it drains (uvloop's pause/resume are no-ops when already in that state). Half-close: an EOF
from either side is forwarded with `write_eof`, the other direction keeps flowing, and the connection is
closed once both directions have ended. TLS has no half-close (close_notify ends both directions): a
backend's EOF towards a TLS client closes the client connection; a client's EOF towards a TLS backend is
not passed on, and the connection ends when the backend closes (or idles out).

TLS binds, with `--relay epoll`: the relay thread accepts, handshakes and relays itself (fastlb/_crelay.pyx);
a handshake done comes back as a `NativeTLSClient`, whose backend is picked and connected here as for any
client, then handed to the thread (`EpollRelay.attach`). Other TLS binds (client certificates, TLS
backends, `--relay uvloop`): the listener's transport is uvloop's TLS transport, and `connection_made`
runs once the handshake is done, so the relay is the same (the HTTP mode gets the connection's TLS facts from
`fastlb.tls.connection_tls_info(transport)`). `sni-route` binds do not terminate TLS: `PendingClient`
reads the ClientHello's server name (fastlb/sni.py), picks the backend group, and the buffered bytes are
replayed to it.
"""
from __future__ import annotations

import asyncio
import logging
import os
from time import monotonic
from typing import TYPE_CHECKING

from fastlb._relay import RelayEnd
from fastlb import proxy_protocol, sni
from fastlb.pool import Backend, BackendPool, NoBackendError, QueueError

if TYPE_CHECKING:
    from fastlb.config import BindSpec
    from fastlb.observe import Observer

log = logging.getLogger("fastlb")

# ClientSide.eofs: which directions have ended (bits, so a repeated EOF is harmless).
CLIENT_EOF, BACKEND_EOF, BOTH_EOF = 1, 2, 3
# The relay thread's records besides ends (fastlb/_crelay.pyx REASONS): a TLS handshake done, and the
# outcome of a connect asked with `Relay.connect`.
READY, CONNECTED, CONNECT_FAILED = 5, 6, 7
NO_TRIES: list = []                 # select_now's `tried` for a first pick: never appended to


# A worker's listeners rest while it holds as many client connections as its open files allow, or when an
# accept ran out of file descriptors anyway: connections wait in the kernel's backlog meanwhile, and every
# ACCEPT_PAUSE the worker looks again (HAProxy rests 100 ms too; nginx 500 ms). Retried at once instead, a
# level-triggered listener spins a core in failing accept4 calls and starves the rest of the loop.
ACCEPT_PAUSE = 0.1
ACCEPT_PAUSE_LOG_INTERVAL = 60.0     # one warning per episode: at most one a minute


class AcceptGate:
    """When one worker accepts: at most `limit` client connections (what the open-files limit leaves once
    every slot has its backend connection and RESERVED_FDS are kept; config.connection_limits), and never
    in a loop of failing accepts.

    The event loop's servers listen on duplicates of the listening sockets: pausing closes the duplicate
    (the socket, its backlog and the master's copy stay), resuming listens on a new one. The C engine's
    listeners check the limit themselves and call `paused` (fastlb/http/_fast.pyx). Each pause is
    logged, once a minute at most, with the count since."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int, live, backlog: int,
                 handshake_timeout: float) -> None:
        self.loop = loop
        self.limit = limit
        self.live = live                     # () -> client connections open in the worker
        self.backlog = backlog
        self.handshake_timeout = handshake_timeout     # TLS binds the event loop terminates
        self.servers: list[list] = []        # [factory, socket, create_server options, server or None]
        self.engines: list = []              # C engines (resume_accepting())
        self.paused_now = False
        self.stopped = False
        self.pauses = 0                      # since the last warning
        self.last_log = -ACCEPT_PAUSE_LOG_INTERVAL

    async def serve(self, factory, sock, tls=None) -> list:
        """Serves sock (as loop.create_server, TLS terminated with tls.front when tls is given), resting
        at the limit. Returns the entry `stop_serving` takes."""
        def counted():
            if self.live() >= self.limit and not self.paused_now:
                self.loop.call_soon(self.paused, 0)
            return factory()
        options = {} if tls is None else {"ssl": tls.front, "ssl_handshake_timeout": self.handshake_timeout}
        entry = [counted, sock, options, None]
        self.servers.append(entry)
        await self._listen(entry)
        return entry

    async def _listen(self, entry: list) -> None:
        server = await self.loop.create_server(entry[0], sock=entry[1].dup(), backlog=self.backlog,
                                               **entry[2])
        if self.stopped or entry[1].fileno() < 0:      # drain began while it was being made
            server.close()
        else:
            entry[3] = server

    def paused(self, error: int) -> None:
        """Every listener rests (error: the accept's errno, 0 for the limit); looked at again later."""
        if self.paused_now or self.stopped:
            return
        self.paused_now = True
        for entry in self.servers:
            if entry[3] is not None:
                entry[3].close()
                entry[3] = None
        self.pauses += 1
        now = self.loop.time()
        if now - self.last_log >= ACCEPT_PAUSE_LOG_INTERVAL:
            import resource
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            why = (f"cannot accept: {os.strerror(error)}" if error else
                   f"{self.live()} client connections, the most the open-files limit leaves")
            log.warning("%s (open-files limit %d, %d client connections at most): accepting paused, new "
                        "connections wait in the listen backlog, looked at again every %gs (%d pause(s) "
                        "since the last report); raise the open-files limit for more", why, soft,
                        self.limit, ACCEPT_PAUSE, self.pauses)
            self.last_log = now
            self.pauses = 0
        self.loop.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        if self.stopped:
            return
        if self.live() >= self.limit:
            self.loop.call_later(ACCEPT_PAUSE, self._resume)
            return
        self.paused_now = False
        for engine in self.engines:
            engine.resume_accepting()
        for entry in self.servers:
            self.loop.create_task(self._listen(entry))

    def stop_serving(self, entries: list) -> None:
        """These servers stop accepting (a data path's, on drain): they close, and the listening sockets
        they were made from."""
        self.servers = [entry for entry in self.servers if not any(entry is e for e in entries)]
        for entry in entries:
            if entry[3] is not None:
                entry[3].close()
                entry[3] = None
            entry[1].close()

    def stop(self) -> None:
        """No more accepting at all (drain): what is still served stops, and nothing resumes."""
        self.stopped = True
        self.stop_serving(list(self.servers))


def is_ip_address(host: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class ListenerSettings:
    """What every tcp listener of one worker shares (its binds differ): built once by the worker's
    data-path factory (fastlb/server/datapath.py)."""

    __slots__ = ("loop", "pool", "pools", "sni_routes", "hash_source", "header_timeout", "connections",
                 "sticky", "observer", "admission", "on_idle")

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: BackendPool | None, *, header_timeout: float,
                 pools: dict[str, BackendPool] | None = None, sni_routes: dict[str, str] | None = None,
                 hash_source: bool = False, sticky=None, observer: "Observer | None" = None,
                 admission=None) -> None:
        self.loop = loop
        self.pool = pool                    # the default group's (None: no default group)
        self.pools = pools or {}            # sni-route binds: group -> pool
        self.sni_routes = sni_routes or {}
        self.hash_source = hash_source
        self.header_timeout = header_timeout    # PROXY header / ClientHello wait (connect_timeout)
        self.connections: set = set()       # the live ClientSide objects on the event loop
        # fastlb.sticky.Sticky (source) or None; it pins to backends of the default group's pool only.
        self.sticky = sticky
        self.observer = observer            # metrics / access log, once per connection; None when off
        self.admission = admission          # fastlb/admission.py: lists and connections per source
        self.on_idle = None                 # draining: called when the last of `connections` ends


class Listener:
    """What connections accepted on one bind share: the worker's ListenerSettings, copied into slots
    (the per-connection code reads them), the bind, and the relay thread that takes its established
    connections (`--relay epoll`; None: they stay on the event loop)."""

    __slots__ = ("loop", "pool", "bind", "hash_source", "header_timeout", "connections", "failures",
                 "last_failure_log", "pools", "sni_routes", "sticky", "observer", "relay", "admission", "settings")

    def __init__(self, settings: ListenerSettings, bind: "BindSpec", relay: "EpollRelay | None" = None) -> None:
        self.settings = settings
        self.loop = settings.loop
        self.admission = settings.admission
        self.relay = relay
        self.pool = settings.pool
        self.pools = settings.pools
        self.sni_routes = settings.sni_routes
        self.sticky = settings.sticky
        self.bind = bind
        self.hash_source = settings.hash_source
        self.header_timeout = settings.header_timeout
        self.connections = settings.connections
        self.failures = 0                   # client connections refused since the last log line
        self.last_failure_log = 0.0
        self.observer = settings.observer

    def protocol_factory(self):
        return lambda: ClientSide(self)

    def refused(self, client: "ClientSide", reason: Exception) -> None:
        """A client is closed because no backend took it. Logged at most once a second: a dead pool
        must not turn into a log flood."""
        self.failures += 1
        if self.observer is not None:
            self.observer.tcp_refused(client, "refused")
        now = self.loop.time()
        if now - self.last_failure_log >= 1.0:
            log.warning("closing client connection(s) from %s: %s (%d since last report)",
                        client.source[0] if client.source else "?", reason, self.failures)
            self.failures = 0
            self.last_failure_log = now


def idle_sweep_interval(idle_timeout: float) -> float:
    """How often idle tcp connections are looked for (TcpPath.sweep, and the relay thread's own sweep):
    about 10 times per idle_timeout, at most once a second and at most 50 times a second, so a connection
    is cut between idle_timeout and 1.1 x idle_timeout after its last byte. 0.0: no idle timeout."""
    return min(1.0, max(0.02, idle_timeout / 10)) if idle_timeout else 0.0


class TcpPath:
    """tcp mode on the event loop, a data path (fastlb/server/datapath.py): uvloop servers on its binds,
    ClientSide/BackendSide relaying, and the idle sweep over the flags the relay sets per chunk (one pass
    per sweep instead of a timer re-armed per chunk). With `--relay epoll` its established plaintext
    connections move to the relay thread (`EpollRelay.take`), which counts and cuts them from then on."""

    name = "tcp"

    def __init__(self, settings: ListenerSettings, gate: AcceptGate, relay: "EpollRelay | None",
                 idle_timeout: float) -> None:
        self.settings = settings
        self.connections = settings.connections
        self.gate = gate
        self.relay = relay
        self.idle_timeout = idle_timeout
        self.sweep_interval = idle_sweep_interval(idle_timeout)
        self.binds: list[tuple] = []         # (bind, listening socket, ServerTLS or None)
        self.served: list = []               # the gate's entries (stop_accepting)

    def serves(self, bind: "BindSpec", tls) -> bool:
        return True                          # any bind the relay thread does not terminate

    def add_bind(self, bind: "BindSpec", sock, tls) -> None:
        self.binds.append((bind, sock, tls))

    async def start(self) -> None:
        for bind, sock, tls in self.binds:
            # A TLS bind the event loop terminates keeps its connections: the relay thread moves raw bytes.
            listener = Listener(self.settings, bind, None if tls is not None else self.relay)
            self.served.append(await self.gate.serve(listener.protocol_factory(), sock, tls))

    def stop_accepting(self) -> None:
        self.gate.stop_serving(self.served)
        self.served = []

    def start_draining(self, on_idle) -> None:
        """Nothing to announce: a tcp connection ends when its client or backend ends it."""
        self.settings.on_idle = on_idle

    @property
    def live(self) -> int:
        return len(self.connections)

    def close_all(self) -> None:
        for client in list(self.connections):
            client.close()

    def sweep(self, now: float) -> None:
        """Cuts relayed connections with no byte either way for idle_timeout: a connection seen active
        since the last sweep is idle from now on at the earliest; one never seen active, since it began."""
        limit = self.idle_timeout
        for client in list(self.connections):
            side = client.backend_side
            if client.active or (side is not None and side.active):
                client.active = False
                if side is not None:
                    side.active = False
                client.idle_since = now
            elif client.peer is not None:
                if now - (client.idle_since or client.started) >= limit:
                    log.debug("closing idle connection from %s", client.source)
                    client.close()

    def stop(self) -> None:
        """Nothing left to release: the pools are the worker's."""


class ClientSide(RelayEnd, asyncio.Protocol):
    # RelayEnd (compiled) holds peer, peer_write and active, the per-chunk state.
    __slots__ = (
        # shared
        "listener",
        # per connection
        "transport", "pool", "backend", "backend_side", "connect_task", "source", "destination",
        "closed", "eofs",
        # accounting (fastlb/observe.py): when it started, how long the backend took, reported yet
        "started", "connect_seconds", "observed",
        # idle timeout: `active` is set per chunk; the sweep (TcpPath.sweep) notes when it last saw it set
        "idle_since",
        # `--relay epoll`: the connection's id in the relay thread once handed over (0: not)
        "relay_id",
        # bytes the event loop had already received from (client, backend) when the relay took over
        "relay_base",
        # counted in the admission table's connections per source (fastlb/admission.py)
        "admitted",
    )

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.transport = None
        self.pool: BackendPool | None = listener.pool    # sni-route binds choose it from the ClientHello
        self.backend: Backend | None = None
        self.backend_side: BackendSide | None = None
        self.connect_task = None
        self.source = None
        self.destination = None
        self.closed = False
        self.eofs = 0
        self.started = 0.0
        self.connect_seconds = 0.0
        self.observed = False
        self.idle_since = 0.0
        self.relay_id = 0
        self.relay_base = (0, 0)
        self.admitted = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.listener.connections.add(self)
        self.started = monotonic()
        # uvloop starts reading right after connection_made, whatever it did: until a backend is
        # connected, a PendingClient takes the bytes (and reads the PROXY header on accept-proxy binds).
        pending = PendingClient(self)
        transport.set_protocol(pending)
        bind = self.listener.bind
        if bind.accept_proxy or bind.sni_route:
            pending.expect_proxy = bind.accept_proxy
            pending.expect_hello = bind.sni_route
            pending.timer = self.listener.loop.call_later(self.listener.header_timeout, transport.abort)
        if not bind.accept_proxy:
            self.source = transport.get_extra_info("peername")
            if not self.admit():
                return
        if not pending.timer:
            self.start_connect()

    def admit(self) -> bool:
        """Admission control on the client's source (allow/deny lists, connections per source): False
        when it is refused, and closed."""
        admission = self.listener.admission
        if admission is None:
            return True
        if admission.admit_source(self.source[0]):
            self.admitted = True
            return True
        self.transport.abort()
        return False

    def leave(self) -> None:
        if self.admitted:
            self.admitted = False
            self.listener.admission.leave(self.source[0])

    def start_connect(self, tried: list | None = None) -> None:
        self.connect_task = self.listener.loop.create_task(self._connect(tried))

    async def _connect(self, tried: list | None = None) -> None:
        listener = self.listener
        key = self.source[0].encode() if listener.hash_source else None
        # Source persistence pins to the default group's backends: not for a connection SNI routed
        # to another group.
        sticky = listener.sticky if self.pool is listener.pool else None
        pinned = client_ip = None
        if sticky is not None:
            pinned, client_ip, _ = sticky.pin(self.source[0].encode(), None)
            if pinned is None and sticky.store.shared:
                pinned = await sticky.fetch(client_ip)     # a local miss only; bounded
        try:
            backend, transport, side = await self.pool.connect(key, self._make_backend_side, tried,
                                                               pinned=pinned)
        except (NoBackendError, QueueError) as exc:
            self.connect_task = None
            if not self.closed:
                listener.refused(self, exc)
                self._drop()
            return
        self.connect_task = None
        if sticky is not None and backend is not pinned:
            sticky.record(client_ip, backend)         # a new client, or its backend could not serve it
        if self.closed or side.lost:
            # The client left, or the backend hung up, while we were being scheduled.
            self.pool.release(backend)
            transport.close()
            self._drop()
            return
        self.backend = backend
        self.connect_seconds = monotonic() - self.started
        self._connected(transport)

    def _drop(self) -> None:
        """No backend for this client: it is closed."""
        self.transport.close()

    def _connected(self, transport) -> None:
        """The backend is connected: relaying starts (in the relay thread when it takes it)."""
        pending = self.transport.get_protocol()
        backend = self.backend
        relay = self.listener.relay
        if relay is not None and relay.take(self, transport, pending):
            return
        if backend.send_proxy:
            transport.write(self._proxy_header(backend.send_proxy))
        if pending.buffer:
            transport.write(pending.buffer)
        self.transport.set_protocol(self)
        if pending.eof:
            self.eof_received()           # reading again would only find the EOF a second time
        else:
            self.transport.resume_reading()

    def _make_backend_side(self) -> "BackendSide":
        side = self.backend_side = BackendSide(self)
        return side

    def _proxy_header(self, version: int) -> bytes:
        source = self.source[:2]
        destination = self.destination or self.transport.get_extra_info("sockname")[:2]
        if version == 2:
            return proxy_protocol.build_v2(source, destination)
        return proxy_protocol.build_v1(source, destination)

    # ---- hot path: data_received, pause_writing, resume_writing come from RelayEnd -----------

    # ---- ends --------------------------------------------------------------------------------

    def eof_received(self) -> bool:
        peer = self.peer
        if peer is None:
            return False
        forward_eof(peer, close_if_tls=False)
        self.eofs |= CLIENT_EOF
        if self.eofs == BOTH_EOF:
            self._close_both()
        # Keep our write side open (half-close); a TLS transport closes anyway, and warns when told not to.
        return self.transport.can_write_eof()

    def _observe(self, gone: str | None) -> None:
        """Once per connection, before its sockets close: counters and access log (off: one test)."""
        observer = self.listener.observer
        if observer is not None and not self.observed:
            self.observed = True
            observer.tcp_closed(self, gone)

    def _close_both(self) -> None:
        self._observe(None)
        self.transport.close()
        if self.peer is not None:
            self.peer.close()

    def close(self) -> None:
        """Ends the connection now (idle timeout, shutdown): pending bytes are dropped."""
        if self.relay_id:
            self.listener.relay.relay.abort(self.relay_id)     # its close record follows
            return
        self._observe(None)
        self.transport.abort()
        if self.peer is not None:
            self.peer.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.leave()
        connections = self.listener.connections
        connections.discard(self)
        if not connections and self.listener.settings.on_idle is not None:
            self.listener.settings.on_idle()            # draining, and this was the last one
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        if self.peer is not None:
            self._observe("client")
            self.peer.close()            # flush what the client sent, then FIN
        self._release()

    def relay_closed(self, bytes_in: int, bytes_out: int) -> None:
        """The relay thread closed both sockets (once per connection)."""
        self.closed = True
        self.relay_id = 0
        self.leave()                     # (the relay's `clients` held it, not `connections`)
        observer = self.listener.observer
        if observer is not None and not self.observed:
            self.observed = True
            observer.tcp_counted(self, bytes_in + self.relay_base[0], bytes_out + self.relay_base[1])
        self._release()

    def _release(self) -> None:
        backend = self.backend
        if backend is not None:
            self.backend = None
            self.pool.release(backend)


class BackendSide(RelayEnd, asyncio.Protocol):
    __slots__ = ("client", "transport", "lost")

    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.set_peer(client.transport)
        self.transport = None
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        client = self.client
        if client.closed:
            transport.close()
            return
        client.set_peer(transport)

    def eof_received(self) -> bool:
        client = self.client
        forward_eof(self.peer, close_if_tls=True)
        client.eofs |= BACKEND_EOF
        if client.eofs == BOTH_EOF:
            client._close_both()
        return self.transport.can_write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        client = self.client
        if not client.closed:
            client._observe("backend")
            client.transport.close()     # flush what the backend sent, then FIN
        client._release()


class NativeTLSClient(ClientSide):
    """A client whose TLS the relay thread terminates (`EpollRelay.listen`). It exists from the end of
    its handshake on, as a ClientSide after uvloop's handshake: its socket stays in the thread (parked)
    while the backend is picked and connected here, then `EpollRelay.attach` hands the backend over."""

    __slots__ = ("connecting",)

    def __init__(self, listener: Listener, conn_id: int, peer) -> None:
        super().__init__(listener)
        self.relay_id = conn_id
        self.source = peer
        self.started = monotonic()
        self.connecting: Backend | None = None    # the backend the thread is connecting to (a slot held)

    def _proxy_header(self, version: int) -> bytes:
        if self.destination is None:       # asked only for a PROXY header: one getsockname then
            local = self.listener.relay.relay.local_address(self.relay_id)
            self.destination = local[:2] if local else ("0.0.0.0", 0)
        return super()._proxy_header(version)

    def _make_backend_side(self) -> "NativeBackendSide":
        side = self.backend_side = NativeBackendSide(self)
        return side

    def _drop(self) -> None:
        self.close()                     # cut in the thread; its close record follows

    def _connected(self, transport) -> None:
        self.listener.relay.attach(self, transport)

    def relay_closed(self, bytes_in: int, bytes_out: int) -> None:
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        if self.connecting is not None:
            self.pool.release(self.connecting)
            self.connecting = None
        super().relay_closed(bytes_in, bytes_out)

    def connected(self, seconds: float) -> None:
        """The thread connected the backend (`EpollRelay.connect_here`): what BackendPool.connect does
        after a connect that worked."""
        backend, self.connecting = self.connecting, None
        self.backend = backend
        self.connect_seconds = monotonic() - self.started
        self.pool.connect_worked(backend, seconds, seconds, False)

    def connect_failed(self, error: OSError, seconds: float) -> None:
        """The thread's connect failed: what BackendPool.connect does after a failed attempt, then the
        next candidates go through it (the client is parked meanwhile), or the client is refused."""
        backend, self.connecting = self.connecting, None
        pool = self.pool
        tried: list[Backend] = []
        if not pool.connect_attempt_failed(backend, error, seconds, tried):
            self.listener.refused(self, NoBackendError(f"out of resources: {error.strerror}"))
            self.close()
            return
        if len(tried) >= pool.attempts:
            self.listener.refused(self, NoBackendError("connect failed to 1 backend(s)"))
            self.close()
            return
        self.start_connect(tried)



class NativeBackendSide(BackendSide):
    """A NativeTLSClient's backend until the hand-over: keeps what the backend sends early (a greeting),
    and its EOF; `lost` when it hangs up."""

    __slots__ = ("buffer", "eof")

    def __init__(self, client: ClientSide) -> None:
        super().__init__(client)
        self.buffer = b""
        self.eof = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.received += len(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def forward_eof(peer, close_if_tls: bool) -> None:
    """Passes an EOF on to the other side's transport. TLS has no half-close: towards a TLS client the
    backend's EOF closes the connection (flush, close_notify): the backend is done. Towards a TLS
    backend the client's EOF is not passed on: closing would lose the response still to come."""
    if peer.is_closing():
        return
    if peer.can_write_eof():
        peer.write_eof()
    elif close_if_tls:
        peer.close()


class PendingClient(asyncio.Protocol):
    """The client socket's protocol until its backend is connected: keeps what the client sends early
    (pausing reading past PENDING_LIMIT bytes) and its EOF. On `accept-proxy` binds it reads the PROXY
    header first, on `sni-route` binds the TLS ClientHello (to choose the backend group); a connection
    that sends neither in full within the header timeout is closed."""

    __slots__ = ("client", "buffer", "eof", "timer", "expect_proxy", "expect_hello")

    PENDING_LIMIT = 65536

    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.buffer = b""
        self.eof = False
        self.timer = None            # set while a PROXY header or a ClientHello is expected
        self.expect_proxy = False
        self.expect_hello = False

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.expect_proxy:
            self._read_proxy_header()
        if self.expect_hello and not self.expect_proxy and self.buffer:
            self._read_client_hello()
        if len(self.buffer) > self.PENDING_LIMIT:
            self.client.transport.pause_reading()

    def _read_client_hello(self) -> None:
        client = self.client
        listener = client.listener
        try:
            server_name = sni.client_hello_sni(self.buffer)
        except sni.NotTLS as exc:
            log.debug("closing connection from %s: %s", client.source, exc)
            client.transport.abort()
            return
        if server_name is sni.NEED_MORE:
            return
        self.expect_hello = False
        self.timer.cancel()
        self.timer = None
        group = sni.route(listener.sni_routes, server_name)
        client.pool = listener.pools.get(group)
        if client.pool is None:
            listener.refused(client, NoBackendError(f"no backend group for server name {server_name!r}"))
            client.transport.abort()
            return
        client.start_connect()

    def _read_proxy_header(self) -> None:
        client = self.client
        try:
            parsed = proxy_protocol.parse(self.buffer)
        except proxy_protocol.ProxyProtocolError as exc:
            log.debug("closing connection from %s: %s", client.transport.get_extra_info("peername"), exc)
            client.transport.abort()
            return
        if parsed is None:
            return
        length, source, destination = parsed
        self.expect_proxy = False
        if source is None:          # LOCAL / UNKNOWN: the real peer is the client
            source = client.transport.get_extra_info("peername")
        client.source = source
        client.destination = destination
        self.buffer = self.buffer[length:]
        if not client.admit():          # admission control by the address the PROXY header gives
            return
        if not self.expect_hello:
            self.timer.cancel()
            self.timer = None
            client.start_connect()

    def eof_received(self) -> bool:
        if self.timer is not None:
            return False             # no complete PROXY header / ClientHello: nothing to relay
        self.eof = True
        return self.client.transport.can_write_eof()

    def pause_writing(self) -> None:
        self.client.pause_writing()

    def resume_writing(self) -> None:
        self.client.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.client.connection_lost(exc)


class _Detached(asyncio.Protocol):
    """The protocol of a uvloop transport whose socket a C engine (the relay thread, the HTTP engine)
    took over (a dup of it)."""

    __slots__ = ()


DETACHED = _Detached()


class EpollRelay:
    """`--relay epoll`: a worker's C relay thread (fastlb/_crelay.pyx) and the connections it holds.

    Python accepts, reads PROXY headers and connects through the pool as with the uvloop relay; once the
    backend is connected, `take()` moves both sockets to the thread: each uvloop transport's socket is
    dup()ed, the transport aborted (no bytes are pending in it, else the connection stays on uvloop),
    and the dups added to the relay with what must reach the backend first (PROXY header, bytes the
    client sent early). The thread reports each connection's end once, with its byte counts, through an
    eventfd read here: then the pool slot is released and the observer told. Nothing per chunk."""

    name = "relay"

    __slots__ = ("loop", "relay", "clients", "capacity", "listeners", "stopping", "on_idle", "warned", "numeric",
                 "inline", "sweep_interval", "settings", "backends", "binds", "servers")

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int, idle_timeout: float,
                 settings: ListenerSettings, backends) -> None:
        from fastlb._crelay import Relay
        self.loop = loop
        self.capacity = capacity
        # The thread sweeps its own connections (it is another thread), as often as TcpPath sweeps its own.
        self.relay = Relay(capacity, idle_timeout, idle_sweep_interval(idle_timeout))
        self.clients: dict[int, ClientSide] = {}     # the connections it holds: its `live`
        self.listeners: dict[int, Listener] = {}     # TLS listeners the thread accepts on, by index
        self.stopping = False
        self.on_idle = None                           # draining: called when the last of `clients` ends
        self.warned = False
        self.numeric: dict[str, bool] = {}           # backend host -> an IP address (connect_here)
        self.inline = relay_inline()
        self.sweep_interval = 0.0                     # inline: the engine's, from start() on
        self.settings = settings                      # its TLS listeners'
        self.backends = backends                      # the configured ones (`terminates`)
        self.binds: list[tuple] = []                  # (bind, listening socket, ServerTLS)
        self.servers: list[NativeServer] = []

    @staticmethod
    def terminates(bind: "BindSpec", server_tls, backends) -> bool:
        """Whether the thread can terminate this TLS bind itself: a context built in C (no client
        certificates), and plaintext backends (TLS backends are the event loop's)."""
        return (server_tls is not None and server_tls.native is not None and server_tls.ca is None
                and not bind.sni_route
                and not bind.accept_proxy and not any(spec.ssl for spec in backends))

    # ---- the data path (fastlb/server/datapath.py) ---------------------------------------------------

    def serves(self, bind: "BindSpec", tls) -> bool:
        return self.terminates(bind, tls, self.backends)

    def add_bind(self, bind: "BindSpec", sock, tls) -> None:
        self.binds.append((bind, sock, tls))

    async def start(self) -> None:
        for bind, sock, tls in self.binds:
            # (the handshake gets connect_timeout, as on the event loop's TLS binds)
            self.servers.append(self.listen(Listener(self.settings, bind, self), sock, tls,
                                            self.settings.header_timeout))
        self.relay.start(self.inline)
        self.loop.add_reader(self.relay.notify_fd, self.on_closed)
        if self.inline:
            self.loop.add_reader(self.relay.epoll_fd, self.on_events)
            # The engine's sweeps (idle connections; TLS handshake and connect deadlines, known once
            # listen() ran) happen in poll(): the worker's sweep calls it at least that often.
            self.sweep_interval = self.relay.sweep_interval or 1.0

    def stop_accepting(self) -> None:
        for server in self.servers:
            server.close()
        self.servers = []

    def start_draining(self, on_idle) -> None:
        """Nothing to announce: a relayed connection ends when its client or backend ends it."""
        self.on_idle = on_idle

    @property
    def live(self) -> int:
        return len(self.clients)

    def close_all(self) -> None:
        for client in list(self.clients.values()):
            client.close()                  # cut in the thread; the close records follow

    def sweep(self, now: float) -> None:
        """Inline mode: idle connections and handshake deadlines are swept in poll()."""
        self.on_events()

    def stop(self) -> None:
        self.close()

    # ---- the thread --------------------------------------------------------------------------------

    def listen(self, listener: Listener, sock, server_tls, handshake_timeout: float) -> "NativeServer":
        """The thread accepts TLS clients on `sock` and does their handshakes; each done one comes back as
        a READY record (`on_closed`) and becomes a NativeTLSClient. Returns what stops accepting."""
        sock.setblocking(False)
        index = self.relay.listen(sock.fileno(), server_tls.native, handshake_timeout)
        self.listeners[index] = listener
        log.info("TLS on %s: terminated by the relay thread", listener.bind.address)
        return NativeServer(self.relay, index, sock)

    def attach(self, client: NativeTLSClient, backend_transport) -> None:
        """Hands a NativeTLSClient's connected backend to the thread, with what it already sent."""
        side = client.backend_side
        backend_sock = backend_transport.get_extra_info("socket")
        if backend_transport.get_extra_info("ssl_object") is not None or backend_sock is None:
            # A TLS backend added at run time: the thread relays plaintext to plain sockets only.
            if not self.warned:
                self.warned = True
                log.warning("TLS backend %s behind a TLS bind the relay thread terminates: connection "
                            "refused (use --relay uvloop for TLS on both sides)", client.backend.address)
            backend_transport.close()
            client.observed = True           # refused, not relayed: no traffic to count
            client.listener.refused(client, NoBackendError("TLS backend behind a relay-terminated bind"))
            client.close()
            return
        first = client._proxy_header(client.backend.send_proxy) if client.backend.send_proxy else None
        try:
            backend_fd = os.dup(backend_sock.fileno())
        except OSError:
            backend_transport.close()
            client.close()
            return
        client.relay_base = (0, side.received)
        backend_transport.set_protocol(DETACHED)
        backend_transport.abort()
        client.backend_side = None
        client.set_peer(None)
        self.relay.attach(client.relay_id, backend_fd, first, side.buffer or None, side.eof)

    def on_events(self) -> None:
        """Inline mode: the engine's epoll has events: run them, then handle the records."""
        records = self.relay.poll()
        if records is not None:
            self.handle(records)

    def take(self, client: ClientSide, backend_transport, pending: "PendingClient") -> bool:
        """Hands an established connection to the thread; False leaves it on uvloop (full, bytes still
        queued in a transport, or TLS on either side)."""
        client_transport = client.transport
        if (len(self.clients) >= self.capacity or client_transport.get_write_buffer_size()
                or backend_transport.get_write_buffer_size()):
            return False
        if (client_transport.get_extra_info("ssl_object") is not None
                or backend_transport.get_extra_info("ssl_object") is not None):
            return False            # TLS on either side: the relay moves raw bytes, uvloop keeps it
        client_sock = client_transport.get_extra_info("socket")
        backend_sock = backend_transport.get_extra_info("socket")
        if client_sock is None or backend_sock is None:
            return False
        first = pending.buffer
        if client.backend.send_proxy:
            first = client._proxy_header(client.backend.send_proxy) + first
        client_fd = os.dup(client_sock.fileno())
        try:
            backend_fd = os.dup(backend_sock.fileno())
        except OSError:
            os.close(client_fd)
            return False
        # What the event loop already relayed (the client's first bytes, a backend's greeting): the relay
        # thread counts only what it reads itself.
        side = client.backend_side
        client.relay_base = (len(pending.buffer), side.received if side is not None else 0)
        # uvloop lets go first (its epoll registration is removed at once), then the thread takes over:
        # no read can happen on the loop's side in between.
        client_transport.set_protocol(DETACHED)
        backend_transport.set_protocol(DETACHED)
        client_transport.abort()
        backend_transport.abort()
        client.set_peer(None)
        client.backend_side = None
        conn_id = self.relay.add(client_fd, backend_fd, first or None, pending.eof)
        if not conn_id:            # cannot happen: capacity checked above, only this thread adds
            os.close(client_fd)
            os.close(backend_fd)
            client.closed = True
            client.listener.connections.discard(client)
            client._release()
            return True
        client.relay_id = conn_id
        self.clients[conn_id] = client
        client.listener.connections.discard(client)        # counted here from now on
        return True

    def on_closed(self) -> None:
        self.handle(self.relay.closed())

    def handle(self, records: list) -> None:
        """The thread's records: handshakes done, connects' outcomes, connections ended."""
        clients = self.clients
        for record in records:
            conn_id, bytes_in, bytes_out, reason = record[:4]
            if reason == READY:
                self._ready(conn_id, bytes_in, record[4])
                continue
            if reason == CONNECTED:
                client = clients.get(conn_id)
                if client is not None:
                    client.connected(bytes_in / 1e6)
                continue
            if reason == CONNECT_FAILED:
                client = clients.get(conn_id)
                if client is not None:
                    client.connect_failed(OSError(bytes_in, os.strerror(bytes_in)), bytes_out / 1e6)
                continue
            client = clients.pop(conn_id, None)
            if client is not None:
                client.relay_closed(bytes_in, bytes_out)
        if not clients and self.on_idle is not None:
            self.on_idle()                  # draining, and the last one ended

    def _ready(self, conn_id: int, peer, index: int) -> None:
        """A TLS client finished its handshake in the thread: its backend is connected as for any."""
        listener = self.listeners.get(index)
        if peer is None:
            return                          # cut meanwhile (its close record follows, unheard of here)
        if listener is None or self.stopping:
            self.relay.abort(conn_id)
            return
        client = NativeTLSClient(listener, conn_id, peer)
        if listener.admission is not None and not listener.admission.admit_source(peer[0]):
            self.relay.abort(conn_id)
            return
        client.admitted = listener.admission is not None
        self.clients[conn_id] = client
        if not self.connect_here(client):
            client.start_connect()

    def connect_here(self, client: NativeTLSClient) -> bool:
        """The common case without a coroutine or a uvloop transport: a backend free now (`select_now`,
        a slot taken) at an IP address, connected by the thread; the outcome comes back as a record
        (`NativeTLSClient.connected` / `connect_failed`). False: BackendPool.connect decides (queueing,
        host names, source persistence, TLS backends)."""
        listener = client.listener
        if listener.sticky is not None:
            return False
        pool = client.pool
        backend = pool.select_now(client.source[0].encode() if listener.hash_source else None, NO_TRIES)
        if backend is None:
            return False
        numeric = self.numeric.get(backend.host)
        if numeric is None:
            numeric = self.numeric[backend.host] = is_ip_address(backend.host)
        if not numeric or backend.ssl_context is not None:
            pool.release(backend)
            return False
        client.connecting = backend
        first = client._proxy_header(backend.send_proxy) if backend.send_proxy else None
        self.relay.connect(client.relay_id, backend.host, backend.port, first, pool.connect_timeout)
        return True

    def close(self) -> None:
        """Stops the thread (connections still relayed are cut) and reports what ended."""
        self.stopping = True
        self.loop.remove_reader(self.relay.notify_fd)
        if self.inline:
            self.loop.remove_reader(self.relay.epoll_fd)
        self.relay.stop()
        self.on_closed()


def relay_inline() -> bool:
    """Whether the relay engine runs in the event loop's thread rather than its own: when this process
    may use a single CPU (a second thread could only take turns with the first, paying a context switch
    and an eventfd wake-up each way per connection). FASTLB_RELAY_INLINE=1 / 0 forces it either way."""
    forced = os.environ.get("FASTLB_RELAY_INLINE")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return len(os.sched_getaffinity(0)) == 1
    except (AttributeError, OSError):
        return False


class NativeServer:
    """A TLS listener the relay thread accepts on: `close()` (drain) stops accepting and closes this
    process's listening socket, as the event loop's servers do."""

    __slots__ = ("relay", "index", "sock")

    def __init__(self, relay, index: int, sock) -> None:
        self.relay = relay
        self.index = index
        self.sock = sock

    def close(self) -> None:
        self.relay.unlisten(self.index)
        self.sock.close()
