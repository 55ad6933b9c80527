"""Listeners, worker processes, the supervising master, signals and graceful shutdown.

`--workers 1`: the fastlb process is the worker, and runs the health checks itself. `--workers N`: a
master forks N workers; each worker binds its own listening socket with SO_REUSEPORT, so the kernel
spreads new connections over them. The master supervises: it restarts a worker that dies (with a backoff
when workers die young, so a crash loop does not spin), and on SIGTERM/SIGINT forwards SIGTERM and waits.
It also runs the active health checks, once for the whole balancer, on its own event loop, the admin bind
and discovery, and sends each verdict and change to every worker over its channel (fastlb/channel.py);
a worker it (re)starts gets the current backends, verdicts and operator states with the fork. The master
forks only while its loop is not running, and the child closes what it inherited.

Reload (SIGHUP, or the admin API): the TLS certificates reload (the master's copy, then every worker's
over its channel); backend changes apply in place everywhere; other changes start a new generation of
workers on the same listening sockets (with TLS contexts made for the new config), and the old
generation drains. A forked worker starts with SIGHUP blocked, unblocked once its loop runs with a
handler (a SIGHUP sent to a worker itself reloads that worker's certificates).

TLS binds: the contexts are made once before the workers fork (fastlb/tls.py: shared ticket keys) and
each worker's listener on its inherited socket gets its bind's front context. Backends are one pool per
backend group (tcp mode's SNI routes); verdicts and admin changes name backends by address.

A worker on SIGTERM (or SIGINT) drains: it closes its listening sockets, lets live connections finish
for up to `grace_period` seconds, then cuts what is left and exits 0.
"""
from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import os
import signal
import socket
import sys
import time

from fastlb.admin import AdminServer
from fastlb.admission import configured as admission_configured, merge_views, validate_change
from fastlb.channel import SNAPSHOT_INTERVAL, LineChannel
from fastlb.config import (RESERVED_FDS, SMALL_MAXCONN, Config, ConfigError,
                           connection_limits, open_files_limit)
from fastlb.control import (BackendTable, ChangeError, aggregate, apply_runtime, apply_to_pools, merge_snapshot,
                            reload_changes, retire, spec_from_dict)
from fastlb.discovery import Discovery
from fastlb.health import HealthChecker, check_target, check_targets
from fastlb.l4 import AcceptGate, EpollRelay, Listener
from fastlb.observe import AccessLog, Observer, pool_snapshot
from fastlb.pool import BackendPool
from fastlb.tls import (ServerTLS, TLSConfigError, alpn_for, certificate_expiry, prepare_server_tls,
                        reload_certificates)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3       # glibc mallopt() parameters
log = logging.getLogger("fastlb")

EXIT_STARTUP_FAILED = 3       # a worker that cannot start (e.g. address in use): the master gives up
PR_SET_PDEATHSIG = 1
YOUNG_WORKER_SECONDS = 1.0    # a worker dying sooner than this counts towards the restart backoff
MAX_YOUNG_DEATHS = 5          # this many young deaths in a row: a crash loop; the master gives up
MAX_RESTART_DELAY = 5.0


def setup_logging(level: str, worker_id: int | None = None) -> None:
    name = "master" if worker_id is None else f"worker {worker_id}"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"fastlb[%(process)d] {name}: %(levelname)s %(message)s"))
    root = logging.getLogger("fastlb")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def effective_limits(config: Config) -> tuple[int, int]:
    """The per-worker (maxconn, queue size) the open-files limit allows (config.connection_limits: the
    queue gets at most a fifth of the files); says so loudly when maxconn is less than asked, or small."""
    soft, hard = open_files_limit()
    maxconn, queue, capacity = connection_limits(soft, config.maxconn, config.queue_size)
    if config.maxconn is not None and config.maxconn > capacity:
        needed = 2 * config.maxconn + queue + RESERVED_FDS
        log.warning(
            "--maxconn %d cannot be honoured: each relayed connection takes 2 open files (client + "
            "backend), so %d connections plus a wait queue of %d need %d open files per worker, but the "
            "open-files limit is %d (hard limit %d). Capping maxconn at %d per worker. Raise `ulimit -n`, "
            "lower --maxconn or --queue-size, or spread the load with --workers.",
            config.maxconn, config.maxconn, queue, needed, soft, hard, capacity)
    elif config.maxconn is None and maxconn < SMALL_MAXCONN:
        log.warning("the open-files limit is %d (hard limit %d): it allows maxconn %d and a wait queue of "
                    "%d per worker; raise the limit (`ulimit -n`, LimitNOFILE= in a systemd unit, --ulimit "
                    "nofile= with docker) or spread the load with --workers.", soft, hard, maxconn, queue)
    return maxconn, queue


def client_limit(maxconn: int) -> int:
    """The client connections one worker accepts at most: its open files, less RESERVED_FDS and a
    backend connection for each of its maxconn slots (with maxconn from effective_limits: maxconn plus
    the wait queue). Beyond it new connections wait in the kernel's backlog (fastlb/l4.py AcceptGate)."""
    soft, _ = open_files_limit()
    return max(1, soft - RESERVED_FDS - maxconn)


def listen_socket(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def check_addresses_free(config: Config) -> None:
    """Fails when another process already listens on a bind address. Workers bind with SO_REUSEPORT,
    which would otherwise silently share the port with a stale fastlb: a probe bind without it does not."""
    for bind in config.binds:
        family = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((bind.host, bind.port))
            except OSError as exc:
                raise StartupError(f"cannot listen on {bind.address}: {exc.strerror}") from None


class StartupError(Exception):
    pass


class Worker:
    """One event loop's balancer: listeners, the backend pool, the idle sweep, draining.

    With a master (`channel` given) it applies the master's changes and reports its counters; alone
    (`--workers 1`) it runs the health checks, the admin bind and discovery itself (`LocalController`)."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, maxconn: int,
                 channel: socket.socket | None = None, runtime: dict | None = None,
                 listen_socks: list[socket.socket] | None = None, reload_source=None,
                 server_tls: dict[int, ServerTLS] | None = None) -> None:
        self.config = config
        self.loop = loop
        # The top-level backends, one pool per backend group: "default" (backends without group=) and
        # the groups SNI routes name (tcp mode). `pool` is the default group's: in HTTP mode the pool
        # named "default", beside any [[pool]]; None when only named pools (or only groups) are
        # configured. The active health checks, the admin API's changes, reload and discovery act on
        # these pools, naming backends by address (`apply_to_pools`).
        by_group: dict[str, list] = {"default": []} if config.has_default_pool else {}
        for spec in config.backends:
            by_group.setdefault(spec.group, []).append(spec)
        self.pools: dict[str, BackendPool] = {
            group: BackendPool(config.replace(backends=specs), loop, maxconn) for group, specs in by_group.items()
            if specs or group == "default"}
        self.pool = self.pools.get("default")
        # TLS binds' contexts, made before the fork (shared ticket keys), by bind position.
        self.server_tls: dict[int, ServerTLS] = server_tls if server_tls is not None else {}
        self.listen_socks = listen_socks          # inherited from the master; else bound here
        # Counters and the access log exist only when something reads them.
        self.observer: Observer | None = None
        if config.admin or config.access_log:
            access_log = AccessLog(loop, config.access_log, config.access_log_format) if config.access_log else None
            self.observer = Observer(loop, access_log=access_log)
        for pool in self.pools.values():
            pool.track_latency = config.admin is not None
        # The master's channel, or our own controller (checks, admin bind, discovery).
        self.channel_sock = channel
        self.channel: LineChannel | None = None
        self.snapshot_handle: asyncio.TimerHandle | None = None
        # What the master was last sent of each top-level backend, and the ones removed since: the next
        # snapshot on the channel lists only what changed (observe.pool_snapshot, control.merge_snapshot).
        self.sent: dict[str, tuple] = {}
        self.removed: list[str] = []
        self.controller: LocalController | None = None
        if channel is None:
            self.controller = LocalController(self, reload_source)
        self.connections: set = set()
        # Session persistence: the worker's tables and the way to the shared store (fastlb/sticky.py).
        self.store = None
        self.tcp_sticky = None
        from fastlb.sticky import any_sticky
        if any_sticky(config):
            from fastlb.sticky import make_store
            self.store = make_store(config, loop)
        self.http = None
        if config.mode == "http":
            from fastlb.http.runtime import HttpRuntime, build_router
            self.http = HttpRuntime(config, loop, build_router(config, loop, maxconn, self.pool, self.store),
                                    self.connections, self.observer)
            if config.admin is not None:
                for route in self.http.router.pools.values():
                    route.pool.track_latency = True
        elif config.sticky is not None and self.pool is not None:
            from fastlb.sticky import Sticky, default_secret
            self.tcp_sticky = Sticky(config.sticky, "default", self.pool, self.store, default_secret(config))
        self.servers: list = []          # what stops accepting on drain: the relay thread's TLS listeners
        # The event loop's servers and the C engine's listeners rest at `client_limit` client connections
        # (the open files left once each slot has its backend connection), or when out of files anyway.
        self.client_limit = client_limit(maxconn)
        self.accept_gate = AcceptGate(loop, self.client_limit, lambda: self.live, config.backlog)
        # HTTP's [[pool]]s by name: changes and verdicts naming a pool go to them.
        self.named_pools: dict[str, BackendPool] = {
            route.name: route.pool for route in (self.http.router.pools.values() if self.http else ())
            if route.pool is not self.pool}
        apply_runtime(self.pools, self.named_pools, runtime or {})
        # Admission control (fastlb/admission.py): one table per worker, which every data path checks.
        self.admission = None
        if admission_configured(config):
            from fastlb.admission import Admission
            self.admission = Admission(config, loop, list(self.http.router.pools) if self.http else ["default"])
            if self.http is not None:
                self.http.use_admission(self.admission)
            log.info("admission control: %s", self.admission.describe())
        self.sweep_handle: asyncio.TimerHandle | None = None
        # The idle sweep runs about 10 times per idle_timeout (at most once a second), so a connection
        # is cut between idle_timeout and 1.1 x idle_timeout after its last byte.
        idle = config.idle_timeout
        self.sweep_interval = min(1.0, max(0.02, idle / 10)) if idle and not self.http else 0.0
        self.idle_ticks = max(1, round(idle / self.sweep_interval)) if self.sweep_interval else 0
        # `--relay epoll`: a C thread relays established connections; it sweeps idle ones itself.
        self.relay: EpollRelay | None = None
        if config.mode == "tcp" and config.relay == "epoll" and self.pool is not None:
            # Room for the pool's queue too: TLS clients the thread accepts wait there like any other.
            self.relay = EpollRelay(loop, maxconn + config.queue_size, idle,
                                    min(1.0, max(0.02, idle / 10)) if idle else 1.0)
        self.stopping = False

    @property
    def live(self) -> int:
        """Client connections open: the protocols' and, in HTTP mode, the C engine's."""
        return self.http.live if self.http is not None else len(self.connections)

    @property
    def checker(self) -> HealthChecker | None:
        return self.controller.checker if self.controller is not None else None

    async def start(self) -> None:
        hash_source = self.config.hash_key == "source"
        for number, bind in enumerate(self.config.binds):
            if self.listen_socks is not None:
                sock = self.listen_socks[number]
            else:
                try:
                    sock = listen_socket(bind.host, bind.port, self.config.backlog)
                except OSError as exc:
                    raise StartupError(f"cannot listen on {bind.address}: {exc.strerror}") from None
            tls = self.server_tls.get(number)
            if self.relay is not None and EpollRelay.terminates(bind, tls, self.config.backends):
                # The relay thread accepts, handshakes and relays this TLS bind itself (fastlb/l4.py).
                listener = Listener(self.loop, self.pool, bind, hash_source, self.config.connect_timeout,
                                    self.connections, self.tcp_sticky, self.observer, relay=self.relay,
                                    admission=self.admission)
                self.servers.append(self.relay.listen(listener, sock, tls, self.config.connect_timeout))
                continue
            tls_options = {} if tls is None else {
                "ssl": tls.front, "ssl_handshake_timeout": self.config.connect_timeout}
            if self.http is not None:
                if self.http.serve_with_engine(bind, sock, self.accept_gate, tls=bool(tls_options)):
                    # The engine accepts on its own duplicate: this copy goes, so that stopping the engine
                    # (drain) stops listening (a copy left open would queue connections nobody accepts).
                    sock.close()
                    continue
                factory = self.http.protocol_factory(bind)
            else:
                factory = Listener(self.loop, self.pool, bind, hash_source, self.config.connect_timeout,
                                   self.connections, self.tcp_sticky, self.observer,
                                   self.pools if bind.sni_route else None,
                                   self.config.sni_routes,
                                   # other TLS-terminating binds stay on uvloop
                                   None if tls_options else self.relay, self.admission).protocol_factory()
            await self.accept_gate.serve(factory, sock, tls_options)
        if self.relay is not None:
            self.relay.start()
        if self.store is not None:
            await self.store.start()
        if self.admission is not None:
            self.admission.start()
        if self.channel_sock is not None:
            # Bound before connecting: the master's first message may arrive within the connect.
            self.channel = channel = LineChannel(self._on_master_message)
            await self.loop.create_unix_connection(lambda: channel, sock=self.channel_sock)
            self.channel.send({"op": "ready"})
            self.snapshot_handle = self.loop.call_later(SNAPSHOT_INTERVAL, self._send_snapshot)
            if self.store is not None and not self.store.shared:
                # --store memory with several workers: the master relays each new mapping to the others.
                self.store.relay = self._relay_stick
        if self.controller is not None:
            await self.controller.start()
        if self.sweep_interval:
            self.sweep_handle = self.loop.call_later(self.sweep_interval, self._sweep)
        if self.http is not None:
            self.http.start()     # HTTP timeouts and idle backend connections: one sweep of its own

    def snapshot(self, changes_only: bool = False) -> dict:
        """This worker's pools, JSON-ready: the top-level one ("default", with the backends of every
        SNI group: the table the controller keeps lists them all), then HTTP's named pools. changes_only:
        for the master's channel, the top-level backends that changed since the last such snapshot and
        the addresses removed since (control.merge_snapshot puts it together)."""
        pools = []
        sent = self.sent if changes_only else None
        if self.pools:
            views = [pool_snapshot("default", pool, self.observer, sent) for pool in self.pools.values()]
            merged = views[0]
            for view in views[1:]:
                merged["active"] += view["active"]
                merged["queued"] += view["queued"]
                merged["backends"] += view["backends"]
            pools.append(merged)
        if self.http is not None:
            for route in self.http.router.pools.values():
                if route.pool is not self.pool:
                    pools.append(pool_snapshot(route.name, route.pool, self.observer))
        clients = {"open": self.live}
        if self.http is not None:
            clients["accepted"] = self.http.clients_accepted
        result = {"pools": pools, "clients": clients}
        if changes_only:
            removed, self.removed = self.removed, []
            result["removed"] = removed
        if self.admission is not None:
            result["admission"] = self.admission.snapshot()
        return result

    def _relay_stick(self, namespace: bytes, key: bytes, ident: bytes) -> None:
        self.channel.send({"op": "stick", "ns": namespace.hex(), "key": key.hex(), "id": ident.hex()})

    def _on_master_message(self, message: dict) -> None:
        op = message["op"]
        if op == "stick":
            if self.store is not None:
                self.store.learn_relayed(bytes.fromhex(message["ns"]), bytes.fromhex(message["key"]),
                                         bytes.fromhex(message["id"]))
        elif op == "report":
            self.channel.send({"op": "snapshot", "id": message.get("id"), "data": self.snapshot(True)})
        elif op == "sync":
            # The changes before it are applied (the channel is ordered): no counters, so the answer
            # costs the same with 10 backends or 10,000.
            self.channel.send({"op": "synced", "id": message.get("id")})
        elif op == "certificates":
            self.reload_certificates()
        elif op == "admission":
            if self.admission is not None:
                self.admission.apply(message["change"])
        else:
            apply_to_pools(self.pools, message, self.named_pools)
            if op == "remove":
                self.removed.append(message["address"])
                self.sent.pop(message["address"], None)

    # ---- TLS hooks (reload, /metrics and the admin API call these) ---------------------------------

    def reload_certificates(self) -> list[str]:
        """Reloads every TLS bind's certificate, key and CA files: new handshakes use them, live
        connections keep theirs. Returns the errors (a bind that failed keeps its current files)."""
        errors = reload_certificates(self.server_tls)
        for error in errors:
            log.error("certificate reload: %s; keeping the current certificates", error)
        if self.server_tls and not errors:
            log.info("certificates reloaded (%d TLS bind(s))", len(self.server_tls))
        warn_expiring(self.server_tls)
        return errors

    def certificate_expiry(self) -> list[tuple[str, str, float]]:
        """(bind address, certificate file, days left) of every certificate served."""
        return certificate_expiry(self.server_tls)

    def _send_snapshot(self) -> None:
        self.snapshot_handle = None
        if self.channel is not None:
            self.channel.send({"op": "snapshot", "id": None, "data": self.snapshot(True)})
            self.snapshot_handle = self.loop.call_later(SNAPSHOT_INTERVAL, self._send_snapshot)

    def _sweep(self) -> None:
        """Cuts relayed connections with no byte either way for idle_timeout: one pass over the flags the
        relay sets per chunk, instead of a timer re-armed per chunk."""
        limit = self.idle_ticks
        for client in list(self.connections):
            side = client.backend_side
            if client.active or (side is not None and side.active):
                client.active = False
                if side is not None:
                    side.active = False
                client.idle_ticks = 0
            elif client.peer is not None:
                client.idle_ticks += 1
                if client.idle_ticks >= limit:
                    log.debug("closing idle connection from %s", client.source)
                    client.close()
        self.sweep_handle = self.loop.call_later(self.sweep_interval, self._sweep)

    async def drain(self, grace_period: float) -> None:
        """Stops accepting, waits for live connections to end, cuts them after grace_period."""
        self.stopping = True
        self.accept_gate.stop()
        for server in self.servers:
            server.close()
        if self.http is not None:
            self.http.stop_listening()
        if self.controller is not None:
            await self.controller.close()
        if self.http is not None:
            self.http.start_draining()         # responses say Connection: close; idle clients are closed
        deadline = self.loop.time() + grace_period
        if self.live:
            log.info("draining %d connection(s), grace period %.3gs", self.live, grace_period)
        while self.live and self.loop.time() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - self.loop.time())))
        if self.live:
            log.warning("grace period over: closing %d connection(s)", self.live)
            for client in list(self.connections):
                client.close()
            if self.http is not None and self.http.fast is not None:
                self.http.fast.engine.close_all()
            await asyncio.sleep(0)
        if self.relay is not None:
            self.relay.close()
        if self.sweep_handle is not None:
            self.sweep_handle.cancel()
        if self.http is not None:
            self.http.stop()
        if self.snapshot_handle is not None:
            self.snapshot_handle.cancel()
        if self.channel is not None:
            # The last counters, so the master's totals keep this worker's traffic after it exits.
            self.channel.send({"op": "snapshot", "id": None, "data": self.snapshot(True), "final": True})
            await asyncio.sleep(0)
            if self.channel.transport is not None:
                self.channel.transport.close()
        if self.observer is not None:
            self.observer.close()
        for pool in self.pools.values():
            pool.close()
        if self.store is not None:
            await self.store.close()
        if self.admission is not None:
            await self.admission.close()


class LocalController:
    """`--workers 1`: the worker is its own controller: it runs the health checks, applies changes to
    its pool at once, serves the admin bind and runs discovery."""

    def __init__(self, worker: Worker, reload_source=None) -> None:
        self.worker = worker
        self.loop = worker.loop
        self.table = BackendTable(worker.config)
        self.reload_source = reload_source
        targets = check_targets(worker.config)
        self.checker: HealthChecker | None = HealthChecker(self.loop, targets, self._on_verdict) if targets else None
        self.next_check_index = len(worker.config.backends)
        self.admin: AdminServer | None = None
        self.discovery: Discovery | None = None

    async def start(self) -> None:
        config = self.worker.config
        if self.checker is not None:
            self.checker.start()
        if config.admin:
            self.admin = AdminServer(self.loop, config, self)
            await self.admin.start()
        self.discovery = Discovery.from_config(self.loop, config, self)
        if self.discovery is not None:
            self.discovery.start()

    async def close(self) -> None:
        if self.discovery is not None:
            self.discovery.close()
        if self.admin is not None:
            await self.admin.close()
        if self.checker is not None:
            self.checker.close()

    def _on_verdict(self, index: int, up: bool, reason: str) -> None:
        apply_to_pools(self.worker.pools, self.checker.checks[index].target.change(up, reason),
                       self.worker.named_pools)

    def apply(self, change: dict) -> dict:
        change = self.table.validate(change)
        apply_to_pools(self.worker.pools, change, self.worker.named_pools)
        self.table.commit(change)
        self.next_check_index = follow_checks(self.checker, self.table, change, self.next_check_index)
        return change

    def admission_change(self, change: dict) -> dict:
        """A block / unblock (admin API): validated and applied here."""
        admission = self.worker.admission
        if admission is None:
            raise ChangeError("admission control is off: start fastlb with a limit or a list", 409)
        try:
            return admission.apply(validate_change(change, admission.specs))
        except ValueError as exc:
            raise ChangeError(str(exc)) from None

    async def snapshot(self) -> dict:
        snapshot = merge_snapshot(None, self.worker.snapshot())
        view = aggregate(self.table, [snapshot], {})
        view["admission"] = snapshot.get("admission")
        view["certificates"] = certificate_view(self.worker.certificate_expiry())
        return view

    async def sync(self) -> None:
        """Changes apply in this process at once: nothing to wait for."""

    async def reload(self) -> str:
        """Reloads the TLS certificates, and applies the re-read config's backend changes in place.
        Other settings need new workers, which one process cannot start beside itself: they are
        reported, not applied."""
        certificates = describe_certificate_reload(self.worker.server_tls, self.worker.reload_certificates())
        if self.reload_source is None:
            if certificates:
                return certificates
            raise ConfigError("no config to reload")
        _, changes, other = reread_and_apply(self)
        if other:
            log.warning("reload: %s changed; with --workers 1 only backends change in place: restart "
                        "fastlb (or run --workers 2+) to apply them", ", ".join(other))
        message = f"reloaded: {len(changes)} backend change(s)" + (f"; not applied: {', '.join(other)}"
                                                                    if other else "")
        if certificates:
            message += "; " + certificates
        log.info("%s", message)
        return message


EXPIRY_WARNING_DAYS = 14


def warn_expiring(server_tls: dict[int, ServerTLS]) -> None:
    for address, path, days in certificate_expiry(server_tls):
        if days < EXPIRY_WARNING_DAYS:
            log.warning("certificate %s of %s %s", path, address,
                        f"expired {-days:.1f} days ago" if days < 0 else f"expires in {days:.1f} days")


def certificate_view(expiry: list[tuple[str, str, float]]) -> list[dict]:
    """The certificates served, JSON-ready, for the admin API and /metrics."""
    return [{"bind": address, "file": path, "days_left": round(days, 3)} for address, path, days in expiry]


def describe_certificate_reload(server_tls: dict[int, ServerTLS], errors: list[str]) -> str:
    """The reload answer's words about certificates ("" without TLS binds)."""
    if not server_tls:
        return ""
    if errors:
        return f"TLS certificates: {len(errors)} error(s), current ones kept: {'; '.join(errors)}"
    # (Not the words each worker logs, "certificates reloaded": those count the workers that did.)
    return f"TLS certificates: reloaded for {len(server_tls)} bind(s)"


def follow_checks(checker: HealthChecker | None, table: BackendTable, change: dict, next_index: int) -> int:
    """Starts or stops the active checks of a backend added or removed at run time (in any pool)."""
    if checker is None:
        return next_index
    pool = change.get("pool")
    if change["op"] == "remove":
        checker.remove_target(change["address"], pool)
    elif change["op"] == "add":
        next_index = max(next_index, max(checker.checks, default=-1) + 1)
        target = check_target(table.of(pool).config, spec_from_dict(change["spec"]), next_index, pool)
        if target is not None:
            checker.add_target(target, up=False)
            return next_index + 1
    return next_index


def _die_with_parent() -> None:
    """A worker gets SIGTERM when the master dies, whatever killed it, so no orphan keeps the port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def run_worker(config: Config, worker_id: int | None = None, master_pid: int | None = None,
               channel: socket.socket | None = None, runtime: dict | None = None,
               listen_socks: list[socket.socket] | None = None, reload_source=None,
               server_tls: dict[int, ServerTLS] | None = None) -> int:
    """Runs one worker until SIGTERM/SIGINT. Returns the process exit status.

    channel / runtime / listen_socks / server_tls: from the master (else the worker is alone and runs
    the checks, the admin bind and discovery itself; SIGHUP then reloads config and certificates in
    place). Under a master, SIGHUP reloads this worker's certificates (the master's reloads reach it
    over the channel). server_tls: the TLS binds' contexts made before the fork (made here when None)."""
    import uvloop

    if server_tls is None:
        try:
            server_tls = prepare_server_tls(config.binds, alpn_for(config))
        except TLSConfigError as exc:
            log.error("%s", exc)
            return EXIT_STARTUP_FAILED
        warn_expiring(server_tls)
    maxconn, queue_size = effective_limits(config)
    config = config.replace(queue_size=queue_size)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    if master_pid is not None and os.getppid() != master_pid:
        return 0                                   # the master died before PDEATHSIG was set
    try:
        worker = Worker(config, loop, maxconn, channel, runtime, listen_socks, reload_source, server_tls)
    except OSError as exc:
        # A file it must open (the access log: checked by the config already, but it may have gone since).
        log.error("cannot start: %s", exc)
        loop.close()
        return EXIT_STARTUP_FAILED
    if worker.controller is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_reload_logged(worker.controller)))
    else:
        loop.add_signal_handler(signal.SIGHUP, worker.reload_certificates)

    async def serve() -> None:
        # One run of the loop from start to drain: uvloop handles signals only while it runs, so a signal
        # sent right after "listening on" must not find it stopped between two run_until_complete calls.
        # A forked worker starts with SIGHUP blocked (Master._spawn); unblocked here, with the loop running
        # and the handler above in place, a reload sent meanwhile is delivered now (unblocked before the
        # loop runs, uvloop would drop it).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        await worker.start()
        log.info("listening on %s (mode %s, %s, %d backend(s), maxconn %d, queue %d)",
                 ", ".join(b.address for b in config.binds), config.mode, config.algorithm,
                 len(config.backends), maxconn, config.queue_size)
        await stop
        await worker.drain(config.grace_period)

    try:
        loop.run_until_complete(serve())
    except StartupError as exc:
        log.error("%s", exc)
        return EXIT_STARTUP_FAILED
    finally:
        loop.close()
    log.info("stopped")
    return 0


async def _reload_logged(controller) -> None:
    try:
        await controller.reload()
    except ConfigError as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)


def reread_and_apply(controller) -> tuple[Config, list[dict], list[str]]:
    """Re-reads the config and applies its backend changes in place, through `controller.apply` (a
    worker's own controller, or the master's that fans out): (new config, changes applied, names of the
    other settings that changed). Raises ConfigError."""
    new = controller.reload_source()
    changes, other = reload_changes(controller.table, new)
    for change in changes:
        controller.apply(change)
    return new, changes, other


def keep_freed_memory() -> None:
    """Let glibc keep freed memory instead of giving it back to the OS after every large chunk.

    By default a freed block over 128 KiB is unmapped (and the heap top trimmed), so each body chunk
    a proxy reads costs fresh page faults: PERF-NOTES measured that halving a Python L7 proxy's MiB/s.
    Blocks up to 4 MiB now come from the heap, and up to 64 MiB of free heap is kept. Forked workers
    inherit the setting.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 4 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
    except (OSError, AttributeError):
        pass                              # not glibc: nothing to tune


def run(config: Config, reload_source=None) -> int:
    """Runs fastlb as configured: one worker in this process, or a master with N workers."""
    setup_logging(config.log_level, None if config.workers > 1 else 0)
    keep_freed_memory()
    try:
        check_addresses_free(config)
        if config.admin:
            check_admin_free(config)
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    if config.workers == 1:
        return run_worker(config, reload_source=reload_source)
    try:
        # Made once, before the workers fork, so they all hold the same session ticket keys.
        server_tls = prepare_server_tls(config.binds, alpn_for(config))
    except TLSConfigError as exc:
        log.error("%s", exc)
        return 1
    warn_expiring(server_tls)
    return Master(config, reload_source, server_tls).run()


def check_admin_free(config: Config) -> None:
    host, port = config.admin
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise StartupError(f"cannot listen on admin address {host}:{port}: {exc.strerror}") from None


class WorkerHandle:
    __slots__ = ("pid", "worker_id", "started", "generation", "channel", "snapshot", "ready")

    def __init__(self, pid: int, worker_id: int, generation: int) -> None:
        self.pid = pid
        self.worker_id = worker_id
        self.started = time.monotonic()
        self.generation = generation
        self.channel: LineChannel | None = None
        self.snapshot: dict | None = None
        self.ready = False


class Master:
    """Forks and supervises the workers; runs the active health checks, the admin bind and discovery
    for all of them, and sends every change to every worker over its channel.

    The master owns the listening sockets (one per bind and worker slot, SO_REUSEPORT between slots);
    a worker inherits its slot's sockets with the fork. So a worker that exits (a reload's old
    generation draining, or a crash) only drops its copy: connections waiting in the accept queue stay
    there for the next worker of that slot instead of being reset.

    Its event loop runs between forks only (`_wait` returns on a signal, a due restart or a pending
    reload), so a fork never happens inside a running loop; checks, the admin bind and discovery keep
    running while it waits."""

    def __init__(self, config: Config, reload_source=None, server_tls: dict[int, ServerTLS] | None = None
                 ) -> None:
        self.config = config
        self.reload_source = reload_source
        # The TLS binds' contexts of the current config, handed to each worker with the fork (one set of
        # session ticket keys); reloaded here too, so a worker forked later starts with the new files.
        self.server_tls = server_tls if server_tls is not None else {}
        self.table = BackendTable(config)
        self.workers: dict[int, WorkerHandle] = {}
        self.generation = 0
        self.listen_socks: dict[tuple[str, int], socket.socket] = {}    # (bind address, slot) -> socket
        self.young_deaths = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.checker: HealthChecker | None = None
        self.next_check_index = len(config.backends)
        self.admin: AdminServer | None = None
        self.discovery: Discovery | None = None
        self.signals: list[int] = []
        self.wakeup: asyncio.Future | None = None
        self.retired: dict[str, dict] = {}            # counters of workers that exited
        self.reports: dict[int, tuple[asyncio.Future, set[int]]] = {}
        self.report_id = 0
        self.pending_generation: Config | None = None
        # --store memory: the workers' session mappings, relayed to every other worker and replayed to
        # workers started later; bounded like a worker's table, entries expire after stick_ttl.
        self.sticks: collections.OrderedDict[tuple[str, str], tuple[dict, float]] = collections.OrderedDict()
        self.admission_changes: list[dict] = []      # runtime blocks, replayed to each new worker

    # ---- listening sockets -------------------------------------------------------------------------

    def _slot_sockets(self, config: Config, slot: int) -> list[socket.socket]:
        socks = []
        for bind in config.binds:
            key = (bind.address, slot)
            if key not in self.listen_socks:
                try:
                    self.listen_socks[key] = listen_socket(bind.host, bind.port, config.backlog)
                except OSError as exc:
                    raise StartupError(f"cannot listen on {bind.address}: {exc.strerror}") from None
            socks.append(self.listen_socks[key])
        return socks

    def _close_unused_sockets(self, config: Config) -> None:
        wanted = {(b.address, slot) for b in config.binds for slot in range(config.workers)}
        for key in [k for k in self.listen_socks if k not in wanted]:
            self.listen_socks.pop(key).close()

    # ---- workers -----------------------------------------------------------------------------------

    def _spawn(self, worker_id: int, config: Config | None = None) -> int:
        config = config or self.table.current_config()
        socks = self._slot_sockets(config, worker_id)
        channel, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        runtime = {"verdicts": self.checker.verdicts if self.checker is not None else {},
                   "admin": self.table.runtime_admin()}
        server_tls = self.server_tls
        # SIGHUP stays blocked in the child until its worker has a handler for it (run_worker): one sent
        # meanwhile (to the process group, say) waits instead of killing the worker.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        pid = -1
        try:
            pid = os.fork()
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        if pid == 0:
            status = 1
            try:
                self._become_worker([worker_end, *socks])
                setup_logging(config.log_level, worker_id)
                status = run_worker(config, worker_id, self.master_pid, worker_end, runtime, socks,
                                    server_tls=server_tls)
            except BaseException:
                logging.getLogger("fastlb").exception("worker crashed")
            finally:
                sys.stderr.flush()
                os._exit(status)
        worker_end.close()
        channel.setblocking(False)
        handle = self.workers[pid] = WorkerHandle(pid, worker_id, self.generation)
        handle.channel = LineChannel(lambda m, h=handle: self._on_worker_message(h, m))
        self.loop.run_until_complete(self.loop.create_unix_connection(lambda: handle.channel, sock=channel))
        log.info("worker %d started (pid %d)", worker_id, pid)
        return pid

    def _become_worker(self, keep: list[socket.socket]) -> None:
        """In a freshly forked worker: drop the master's signal handling and every file it had open
        (its event loop, other workers' channels, other slots' listeners, health-check sockets in
        flight), keeping stdio, this worker's channel and its listeners. The master's objects stay
        referenced until os._exit, so nothing closes those numbers again once they are reused."""
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        low = 3
        for fd in sorted(s.fileno() for s in keep):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, _max_fd())
        _die_with_parent()

    def _on_worker_message(self, handle: WorkerHandle, message: dict) -> None:
        op = message.get("op")
        if op == "ready":
            handle.ready = True
            now = time.monotonic()
            for message, expires in self.sticks.values():
                if expires > now:
                    handle.channel.send(message)
            for message in self.admission_changes:
                handle.channel.send(message)
            self._wake()
        elif op == "stick":
            self._relay_stick(message)
        elif op in ("snapshot", "synced"):
            if op == "snapshot":
                handle.snapshot = merge_snapshot(handle.snapshot, message["data"])
            report = self.reports.get(message.get("id"))
            if report is not None:
                future, waiting = report
                waiting.discard(handle.pid)
                if not waiting and not future.done():
                    future.set_result(None)

    def _relay_stick(self, message: dict) -> None:
        """A worker's new session mapping (--store memory): to every worker, and kept for new ones.

        The sender gets it back too: two workers pinning one new client at once would otherwise swap
        their picks and never agree. Every worker applies the master's order, so the last one wins
        everywhere (as a redispatch after a backend died must)."""
        key = (message["ns"], message["key"])
        self.sticks[key] = (message, time.monotonic() + self.config.stick_ttl)
        self.sticks.move_to_end(key)
        if len(self.sticks) > self.config.stick_table_size:
            self.sticks.popitem(last=False)
        self._send_all(message)

    def _send_all(self, message: dict) -> None:
        for handle in self.workers.values():
            if handle.channel is not None:
                handle.channel.send(message)

    def _on_verdict(self, index: int, up: bool, reason: str) -> None:
        """A health flip (the checker has logged it): every worker applies it."""
        self._send_all(self.checker.checks[index].target.change(up, reason))

    # ---- the controller interface (admin API, discovery) -----------------------------------------

    def apply(self, change: dict) -> dict:
        change = self.table.validate(change)
        self._send_all(change)
        self.table.commit(change)
        self.next_check_index = follow_checks(self.checker, self.table, change, self.next_check_index)
        if change["op"] != "health":
            log.info("applied %s to %d worker(s)", _describe(change), len(self.workers))
        return change

    def admission_change(self, change: dict) -> dict:
        """A block / unblock (admin API): to every worker, and kept for the workers started later."""
        if not admission_configured(self.config):
            raise ChangeError("admission control is off: start fastlb with a limit or a list", 409)
        try:
            change = validate_change(change, self.config.rate_limit)
        except ValueError as exc:
            raise ChangeError(str(exc)) from None
        self.admission_changes.append({"op": "admission", "change": change})
        self._send_all(self.admission_changes[-1])
        log.info("admission: %s %s", change["op"], change.get("cidr") or change.get("key"))
        return change

    async def sync(self) -> None:
        """Returns once every worker has applied the changes sent so far (or after a second): the channel
        is ordered, so a worker answering a sync sent after them has applied them."""
        await self._collect("sync")

    async def snapshot(self) -> dict:
        """Asks every worker for its counters (waiting up to a second), then sums them."""
        await self._collect()
        snapshots = [h.snapshot for h in self.workers.values() if h.snapshot is not None]
        view = aggregate(self.table, snapshots, self.retired)
        # The master's copy of the certificates: the files every worker serves (reloaded together).
        view["certificates"] = certificate_view(certificate_expiry(self.server_tls))
        view["admission"] = merge_views([s.get("admission") for s in snapshots])
        return view

    async def _collect(self, op: str = "report") -> None:
        """Sends `op` (report: a snapshot is wanted; sync: only the answer) to every worker and waits
        for their answers, a second at most."""
        self.report_id += 1
        report_id = self.report_id
        future = self.loop.create_future()
        waiting = {pid for pid, h in self.workers.items() if h.channel is not None}
        self.reports[report_id] = (future, waiting)
        self._send_all({"op": op, "id": report_id})
        try:
            if waiting:
                await asyncio.wait_for(asyncio.shield(future), 1.0)
        except TimeoutError:
            pass
        finally:
            del self.reports[report_id]

    async def reload(self) -> str:
        return self._reload()

    def _reload_certificates(self) -> str:
        """Reloads the master's copy of the certificates, then every worker's (over the channel, so it
        is ordered with the other changes and `sync` waits for it)."""
        if not self.server_tls:
            return ""
        errors = reload_certificates(self.server_tls)
        for error in errors:
            log.error("certificate reload: %s; keeping the current certificates", error)
        warn_expiring(self.server_tls)
        if not errors:
            self._send_all({"op": "certificates"})
        return describe_certificate_reload(self.server_tls, errors)

    def _reload(self) -> str:
        """Reloads the TLS certificates, and re-reads the config. Backend changes apply in place; any
        other change starts a new generation of workers with the new config beside the old one, which
        then drains. Raises ConfigError."""
        certificates = self._reload_certificates()
        if self.reload_source is None:
            if certificates:
                log.info("%s", certificates)
                return certificates
            raise ConfigError("no config to reload")
        new, changes, other = reread_and_apply(self)
        message = f"reloaded: {len(changes)} backend change(s) applied in place"
        if other:
            self.pending_generation = new
            self._wake()
            message += f"; new workers for: {', '.join(other)}"
        if certificates:
            message += "; " + certificates
        log.info("%s", message)
        return message

    # ---- supervision -------------------------------------------------------------------------------

    def _stop_requested(self) -> bool:
        """A SIGTERM or SIGINT has arrived (handled by _supervise; forking stops meanwhile)."""
        return signal.SIGTERM in self.signals or signal.SIGINT in self.signals

    def _wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    def _on_signal(self, signum: int) -> None:
        self.signals.append(signum)
        self._wake()

    async def _wait(self, timeout: float) -> None:
        """Returns after a signal, a pending reload or timeout; checks and the admin bind run meanwhile."""
        if self.signals or self.pending_generation is not None:
            return
        self.wakeup = self.loop.create_future()
        try:
            await asyncio.wait_for(self.wakeup, timeout)
        except TimeoutError:
            pass
        finally:
            self.wakeup = None

    def run(self) -> int:
        self.master_pid = os.getpid()
        # The stdlib loop, not uvloop: uvloop keeps SIGCHLD for itself, and the master's few health
        # checks per second do not need its speed.
        self.loop = loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(signum, self._on_signal, signum)
            targets = check_targets(self.config)
            if targets:
                self.checker = HealthChecker(loop, targets, self._on_verdict)
            try:
                for worker_id in range(self.config.workers):
                    if self._stop_requested():
                        break           # SIGTERM while forking: no more workers; _supervise stops these
                    self._spawn(worker_id)
            except StartupError as exc:
                log.error("%s", exc)
                self._shutdown("startup failure")
                return 1
            if self.checker is not None:
                self.checker.start()
            if self.config.admin:
                self.admin = AdminServer(loop, self.config, self)
                loop.run_until_complete(self.admin.start())
            self.discovery = Discovery.from_config(loop, self.config, self)
            if self.discovery is not None:
                self.discovery.start()
            log.info("master running %d workers%s", len(self.workers),
                     f", checking {len(targets)} backend(s)" if targets else "")
            return self._supervise()
        finally:
            if self.discovery is not None:
                self.discovery.close()
            if self.admin is not None:
                loop.run_until_complete(self.admin.close())
            if self.checker is not None:
                self.checker.close()
            for handle in self.workers.values():
                if handle.channel is not None and handle.channel.transport is not None:
                    handle.channel.transport.close()
            for sock in self.listen_socks.values():
                sock.close()
            loop.run_until_complete(asyncio.sleep(0))     # let cancelled checks unwind
            loop.close()

    def _supervise(self) -> int:
        pending_restarts: list[tuple[float, int]] = []          # (when, worker id)
        while True:
            timeout = 1.0
            if pending_restarts:
                timeout = max(0.0, min(when for when, _ in pending_restarts) - time.monotonic())
            self.loop.run_until_complete(self._wait(timeout))
            signals, self.signals = self.signals, []
            now = time.monotonic()
            for signum in signals:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    return self._shutdown(signal.Signals(signum).name)
            if signal.SIGHUP in signals:
                try:
                    self._reload()
                except ConfigError as exc:
                    log.error("reload failed, keeping the running configuration: %s", exc)
            if self.pending_generation is not None:
                config, self.pending_generation = self.pending_generation, None
                pending_restarts = [r for r in pending_restarts if r[1] < config.workers]
                self._new_generation(config)
            for worker_id, status in self._reap():
                if status == EXIT_STARTUP_FAILED:
                    log.error("worker %d could not start; stopping", worker_id)
                    self._shutdown("startup failure")
                    return 1
                if self.young_deaths >= MAX_YOUNG_DEATHS:
                    log.error("workers died %d times in a row within %gs of starting (worker %d last, status "
                              "%d): a crash loop; stopping", self.young_deaths, YOUNG_WORKER_SECONDS,
                              worker_id, status)
                    self._shutdown("crash loop")
                    return 1
                pending_restarts.append((now + self._restart_delay(), worker_id))
            for entry in [e for e in pending_restarts if e[0] <= now]:
                pending_restarts.remove(entry)
                self._spawn(entry[1])

    def _new_generation(self, config: Config) -> None:
        """Starts config.workers workers with the new config on the same sockets, waits until each
        listens, then lets the old ones drain. If the new ones do not come up, they go and the old
        ones stay."""
        try:
            server_tls = prepare_server_tls(config.binds, alpn_for(config))
        except TLSConfigError as exc:
            log.error("reload: %s; keeping the old workers", exc)
            return
        old = [h for h in self.workers.values() if h.generation == self.generation]
        old_config, old_tls = self.table.config, self.server_tls
        self.generation += 1
        self.table.config = config
        self.server_tls = server_tls
        new_pids = []
        try:
            for worker_id in range(config.workers):
                if self._stop_requested():
                    break
                new_pids.append(self._spawn(worker_id, self.table.current_config()))
        except StartupError as exc:
            log.error("reload: %s; keeping the old workers", exc)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not all(
                self.workers[p].ready for p in new_pids if p in self.workers):
            self.loop.run_until_complete(self._wait(0.1))
            if any(p not in self.workers for p in new_pids) or self._stop_requested():
                break
            self._reap_generation(new_pids)
        ready = len(new_pids) == config.workers and all(
            p in self.workers and self.workers[p].ready for p in new_pids)
        if not ready:
            log.error("reload: the new workers did not start; keeping the old ones")
            for pid in new_pids:
                _kill(pid, signal.SIGKILL)
            self.generation -= 1
            self.table.config, self.server_tls = old_config, old_tls
            return
        if self.checker is not None:
            self._renew_checker(config)
        for handle in old:
            _kill(handle.pid, signal.SIGTERM)
        self.config = config
        self.discovery = Discovery.restart(self.discovery, self.loop, config, self)
        self._close_unused_sockets(config)
        log.info("reload: %d new worker(s) running; %d old worker(s) draining", len(new_pids), len(old))

    def _reap_generation(self, pids: list[int]) -> None:
        for pid in pids:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                handle = self.workers.pop(pid, None)
                if handle is not None and handle.channel is not None and handle.channel.transport:
                    handle.channel.transport.close()

    def _renew_checker(self, config: Config) -> None:
        """New check settings: a new checker, keeping each staying backend's verdict."""
        states = self.checker.verdicts
        self.checker.close()
        targets = check_targets(self.table.current_config())
        self.checker = HealthChecker(self.loop, targets, self._on_verdict) if targets else None
        self.next_check_index = len(targets)
        if self.checker is not None:
            for check in self.checker.checks.values():
                if check.target.key in states:
                    check.up = states[check.target.key]
                    check.fresh = False
            self.checker.start()

    def _reap(self) -> list[tuple[int, int]]:
        dead = []
        while self.workers:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            handle = self.workers.pop(pid, None)
            if handle is None:
                continue
            if handle.channel is not None and handle.channel.transport is not None:
                handle.channel.transport.close()
            if handle.snapshot is not None:
                retire(self.retired, handle.snapshot)
            status = os.waitstatus_to_exitcode(wait_status)
            how = f"killed by {signal.Signals(-status).name}" if status < 0 else f"exited with status {status}"
            if handle.generation != self.generation:
                log.info("old worker %d (pid %d) %s", handle.worker_id, pid, how)
                continue
            log.warning("worker %d (pid %d) %s; restarting", handle.worker_id, pid, how)
            if time.monotonic() - handle.started < YOUNG_WORKER_SECONDS:
                self.young_deaths += 1
            else:
                self.young_deaths = 0
            dead.append((handle.worker_id, status))
        return dead

    def _restart_delay(self) -> float:
        if not self.young_deaths:
            return 0.0
        return min(MAX_RESTART_DELAY, 0.1 * 2 ** (self.young_deaths - 1))

    def _shutdown(self, reason: str) -> int:
        log.info("%s: stopping %d worker(s)", reason, len(self.workers))
        # Listening stops at once: the workers close their copies as they start draining, and a copy kept
        # here would leave new connections in the backlog for the grace period, then reset them. Closed,
        # a new client is refused at once and moves on (another balancer, keepalived's VIP).
        for sock in self.listen_socks.values():
            sock.close()
        self.listen_socks.clear()
        if self.checker is not None:
            self.checker.close()
        for pid in self.workers:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_period + 5.0
        while self.workers and time.monotonic() < deadline:
            self.loop.run_until_complete(self._wait(0.1))
            self.signals.clear()
            while self.workers:
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    self.workers.clear()
                    break
                if pid == 0:
                    break
                self.workers.pop(pid, None)
        for pid in self.workers:
            log.warning("worker pid %d did not stop in time: killing it", pid)
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        log.info("stopped")
        return 0


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _describe(change: dict) -> str:
    op = change["op"]
    pool = f"{change['pool']}/" if change.get("pool") else ""        # POOL/ADDR, as the API names it
    if op == "add":
        return f"add {pool}{spec_from_dict(change['spec']).address}"
    if op == "weight":
        return f"weight {change['weight']} to {pool}{change['address']}"
    if op == "state":
        return f"state {change['state']} to {pool}{change['address']}"
    return f"{op} {pool}{change.get('address', '')}"


def _max_fd() -> int:
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 65536
