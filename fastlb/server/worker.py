"""A worker: one event loop's balancer, its data paths (fastlb/server/datapath.py), draining.

A worker on SIGTERM (or SIGINT) drains: its data paths stop accepting (the listening sockets close), let
live connections finish for up to `grace_period` seconds, then cut what is left; the worker exits 0.
With a master (fastlb/server/master.py) it applies the master's changes and reports its counters over
its channel; alone (`--workers 1`) it is its own controller (fastlb/server/controller.py).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys

from fastlb.admission import configured as admission_configured
from fastlb.channel import SNAPSHOT_INTERVAL, LineChannel
from fastlb.config import RESERVED_FDS, SMALL_MAXCONN, Config, ConfigError, connection_limits, open_files_limit
from fastlb.control import aggregate, apply_runtime, apply_to_pools, merge_snapshot
from fastlb.l4 import AcceptGate, EpollRelay, ListenerSettings, TcpPath
from fastlb.observe import AccessLog, Observer, pool_snapshot, sum_counts
from fastlb.pool import BackendPool
from fastlb.server.controller import (ControllerBase, certificate_view, describe_certificate_reload, reload_logged,
                                      warn_expiring)
from fastlb.server.datapath import DataPath, Sweeper, drain_paths
from fastlb.tls import (ServerTLS, TLSConfigError, alpn_for, certificate_expiry, prepare_server_tls,
                        reload_certificates)

log = logging.getLogger("fastlb")

EXIT_STARTUP_FAILED = 3       # a worker that cannot start (e.g. address in use): the master gives up


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


def build_paths(worker: Worker) -> list[DataPath]:
    """The data paths of the worker's mode, in the order they are offered each bind. HTTP mode: the
    HTTP path. tcp mode: the relay thread first (`--relay epoll`: it takes the TLS binds it can
    terminate), then the event loop's tcp path (every other bind)."""
    config, loop = worker.config, worker.loop
    if config.mode == "http":
        from fastlb.http.datapath import HttpPath
        http = HttpPath(config, loop, worker.router, worker.observer, worker.accept_gate)
        if worker.admission is not None:
            http.runtime.use_admission(worker.admission)
        return [http]
    sticky = None
    if config.sticky is not None and worker.pool is not None:
        from fastlb.sticky import Sticky, default_secret
        sticky = Sticky(config.sticky, "default", worker.pool, worker.store, default_secret(config))
    settings = ListenerSettings(loop, worker.pool, pools=worker.pools, sni_routes=config.sni_routes,
                                hash_source=config.hash_key == "source",
                                header_timeout=config.connect_timeout, sticky=sticky,
                                observer=worker.observer, admission=worker.admission)
    paths: list[DataPath] = []
    relay = None
    if config.relay == "epoll" and worker.pool is not None:
        # Room for the pool's queue too: TLS clients the thread accepts wait there like any other.
        relay = EpollRelay(loop, worker.maxconn + config.queue_size, config.idle_timeout, settings,
                           config.backends)
        paths.append(relay)
    paths.append(TcpPath(settings, worker.accept_gate, relay, config.idle_timeout))
    return paths


class LocalController(ControllerBase):
    """`--workers 1`: the worker is its own controller: changes apply to its pools at once."""

    def __init__(self, worker: Worker, reload_source=None) -> None:
        super().__init__(worker.loop, worker.config, reload_source)
        self.worker = worker
        self.make_checker(worker.config)

    async def start(self) -> None:
        await self.start_services()

    async def close(self) -> None:
        await self.close_services()

    def deliver(self, change: dict) -> None:
        apply_to_pools(self.worker.pools, change, self.worker.named_pools)

    def admission_specs(self):
        admission = self.worker.admission
        return admission.specs if admission is not None else None

    def deliver_admission(self, change: dict) -> dict:
        return self.worker.admission.apply(change)

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
        _, changes, other = self.reread_and_apply()
        if other:
            log.warning("reload: %s changed; with --workers 1 only backends change in place: restart "
                        "fastlb (or run --workers 2+) to apply them", ", ".join(other))
        message = f"reloaded: {len(changes)} backend change(s)" + (f"; not applied: {', '.join(other)}"
                                                                    if other else "")
        if certificates:
            message += "; " + certificates
        log.info("%s", message)
        return message


class StartupError(Exception):
    pass


class Worker:
    """One event loop's balancer: the backend pools, the data paths, the one sweep, draining.

    With a master (`channel` given) it applies the master's changes and reports its counters; alone
    (`--workers 1`) it runs the health checks, the admin bind and discovery itself (`LocalController`)."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, maxconn: int,
                 channel: socket.socket | None = None, runtime: dict | None = None,
                 listen_socks: list[socket.socket] | None = None, reload_source=None,
                 server_tls: dict[int, ServerTLS] | None = None) -> None:
        self.config = config
        self.loop = loop
        self.maxconn = maxconn
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
        # Session persistence: the worker's tables and the way to the shared store (fastlb/sticky.py).
        self.store = None
        from fastlb.sticky import any_sticky
        if any_sticky(config):
            from fastlb.sticky import make_store
            self.store = make_store(config, loop)
        # HTTP's pools and rules (None in tcp mode); its [[pool]]s by name: changes and verdicts naming
        # a pool go to them.
        self.router = None
        if config.mode == "http":
            from fastlb.http.runtime import build_router
            self.router = build_router(config, loop, maxconn, self.pool, self.store)
        self.named_pools: dict[str, BackendPool] = {
            route.name: route.pool for route in (self.router.pools.values() if self.router else ())
            if route.pool is not self.pool}
        for pool in (*self.pools.values(), *self.named_pools.values()):
            pool.track_latency = config.admin is not None
        apply_runtime(self.pools, self.named_pools, runtime or {})
        # Admission control (fastlb/admission.py): one table per worker, which every data path checks.
        self.admission = None
        if admission_configured(config):
            from fastlb.admission import Admission
            self.admission = Admission(config, loop, list(self.router.pools) if self.router else ["default"])
            log.info("admission control: %s", self.admission.describe())
        # The event loop's servers and the C engine's listeners rest at `client_limit` client connections
        # (the open files left once each slot has its backend connection), or when out of files anyway.
        self.client_limit = client_limit(maxconn)
        self.accept_gate = AcceptGate(loop, self.client_limit, lambda: self.live, config.backlog,
                                      config.connect_timeout)
        self.paths = build_paths(self)
        self.sweeper = Sweeper(loop, self.paths)

    @property
    def live(self) -> int:
        """Client connections open, on every data path."""
        return sum([path.live for path in self.paths])

    async def start(self) -> None:
        for number, bind in enumerate(self.config.binds):
            if self.listen_socks is not None:
                sock = self.listen_socks[number]
            else:
                try:
                    sock = listen_socket(bind.host, bind.port, self.config.backlog)
                except OSError as exc:
                    raise StartupError(f"cannot listen on {bind.address}: {exc.strerror}") from None
            tls = self.server_tls.get(number)
            next(path for path in self.paths if path.serves(bind, tls)).add_bind(bind, sock, tls)
        for path in self.paths:
            await path.start()
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
        self.sweeper.start()

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
        for name, pool in self.named_pools.items():
            pools.append(pool_snapshot(name, pool, self.observer))
        clients = {"open": self.live}
        for path in self.paths:
            accepted = getattr(path, "clients_accepted", None)      # the paths that count them (HTTP)
            if accepted is not None:
                clients["accepted"] = clients.get("accepted", 0) + accepted
        result = {"pools": pools, "clients": clients}
        engines = [counts for path in self.paths if (counts := getattr(path, "engine_counts", None))]
        if engines:                     # HTTP mode with the C engine serving a bind (fastlb/http/fast.py)
            result["engine"] = sum_counts(engines)
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

    async def drain(self, grace_period: float) -> None:
        """Stops accepting, waits for live connections to end, cuts them after grace_period."""
        for path in self.paths:
            path.stop_accepting()
        self.accept_gate.stop()
        if self.controller is not None:
            await self.controller.close()
        if await drain_paths(self.loop, self.paths, grace_period):
            log.warning("grace period over: closing %d connection(s)", self.live)
            for path in self.paths:
                path.close_all()
            await asyncio.sleep(0)
        self.sweeper.stop()
        for path in self.paths:
            path.stop()
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
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload_logged(worker.controller)))
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
