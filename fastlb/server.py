"""Listeners, worker processes, the supervising master, signals and graceful shutdown.

`--workers 1`: the fastlb process is the worker, and runs the health checks itself. `--workers N`: a
master forks N workers; each worker binds its own listening socket with SO_REUSEPORT, so the kernel
spreads new connections over them. The master supervises: it restarts a worker that dies (with a backoff
when workers die young, so a crash loop does not spin), and on SIGTERM/SIGINT forwards SIGTERM and waits.
It also runs the active health checks, once for the whole balancer, on its own event loop, and sends each
verdict to every worker over a socketpair; a worker it (re)starts inherits the current verdicts with the
fork. The master forks only while its loop is not running, and the child closes what it inherited.

A worker on SIGTERM (or SIGINT) drains: it closes its listening sockets, lets live connections finish
for up to `grace_period` seconds, then cuts what is left and exits 0.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
import time

from fastlb.config import Config, maxconn_capacity, open_files_limit
from fastlb.health import HealthChecker, HealthFeed, check_targets, encode_verdict
from fastlb.l4 import Listener
from fastlb.pool import Backend, BackendPool
from fastlb.tls import (ServerTLS, TLSConfigError, certificate_expiry, prepare_server_tls,
                        reload_certificates)

log = logging.getLogger("fastlb")

EXIT_STARTUP_FAILED = 3       # a worker that cannot start (e.g. address in use): the master gives up
PR_SET_PDEATHSIG = 1
YOUNG_WORKER_SECONDS = 1.0    # a worker dying sooner than this counts towards the restart backoff
MAX_RESTART_DELAY = 5.0


def setup_logging(level: str, worker_id: int | None = None) -> None:
    name = "master" if worker_id is None else f"worker {worker_id}"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"fastlb[%(process)d] {name}: %(levelname)s %(message)s"))
    root = logging.getLogger("fastlb")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def effective_maxconn(config: Config) -> int:
    """The per-worker maxconn the open-files limit allows; says so loudly when it is less than asked."""
    soft, hard = open_files_limit()
    capacity = maxconn_capacity(soft, config.queue_size)
    if config.maxconn is None:
        return capacity
    if config.maxconn > capacity:
        needed = 2 * config.maxconn + config.queue_size + 64
        log.warning(
            "--maxconn %d cannot be honoured: each relayed connection takes 2 open files (client + "
            "backend), so %d connections plus a wait queue of %d need %d open files per worker, but the "
            "open-files limit is %d (hard limit %d). Capping maxconn at %d per worker. Raise `ulimit -n`, "
            "lower --maxconn or --queue-size, or spread the load with --workers.",
            config.maxconn, config.maxconn, config.queue_size, needed, soft, hard, capacity)
        return capacity
    return config.maxconn


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
    """One event loop's balancer: listeners, the backend pool, the idle sweep, draining."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, maxconn: int,
                 health_channel: socket.socket | None = None, verdicts: dict[int, bool] | None = None,
                 server_tls: dict[int, ServerTLS] | None = None) -> None:
        self.config = config
        self.loop = loop
        # One pool per backend group: "default" (backends without group=) and the groups SNI routes name.
        # Without groups that is one pool, as before; `pool` is the default group's (None if it has none).
        # In HTTP mode every top-level backend is in "default" (config checks it): that pool is the HTTP
        # pool named "default", beside any [[pool]]; the active health checks cover it.
        by_group: dict[str, list] = {}
        for spec in config.backends:
            by_group.setdefault(spec.group, []).append(spec)
        self.pools = {group: BackendPool(config.replace(backends=specs), loop, maxconn)
                      for group, specs in by_group.items()}
        self.pool = self.pools.get("default")
        # Config position -> its Backend, for the health verdicts (which name backends by position).
        taken = dict.fromkeys(self.pools, 0)
        self.in_config_order: list[tuple[BackendPool, Backend]] = []
        for spec in config.backends:
            pool = self.pools[spec.group]
            self.in_config_order.append((pool, pool.in_config_order[taken[spec.group]]))
            taken[spec.group] += 1
        # TLS binds' contexts, made before the fork (shared ticket keys), by bind position.
        self.server_tls: dict[int, ServerTLS] = server_tls if server_tls is not None else {}
        # Active checks: the master's verdicts (the state at fork, then a feed), or our own checker.
        self.health_channel = health_channel
        self.feed_transport: asyncio.BaseTransport | None = None
        self.checker: HealthChecker | None = None
        for index, up in (verdicts or {}).items():
            if not up:
                self._on_verdict(index, False, "down at start")
        if health_channel is None:
            targets = check_targets(config)
            if targets:
                self.checker = HealthChecker(loop, targets, self._on_verdict)
        self.connections: set = set()
        self.http = None
        if config.mode == "http":
            from fastlb.http.runtime import HttpRuntime, build_router
            self.http = HttpRuntime(config, loop, build_router(config, loop, maxconn, self.pool),
                                    self.connections)
        self.servers: list[asyncio.AbstractServer] = []
        self.sweep_handle: asyncio.TimerHandle | None = None
        # The idle sweep runs about 10 times per idle_timeout (at most once a second), so a connection
        # is cut between idle_timeout and 1.1 x idle_timeout after its last byte.
        idle = config.idle_timeout
        self.sweep_interval = min(1.0, max(0.02, idle / 10)) if idle and not self.http else 0.0
        self.idle_ticks = max(1, round(idle / self.sweep_interval)) if self.sweep_interval else 0
        self.stopping = False

    async def start(self) -> None:
        hash_source = self.config.hash_key == "source"
        for index, bind in enumerate(self.config.binds):
            try:
                sock = listen_socket(bind.host, bind.port, self.config.backlog)
            except OSError as exc:
                raise StartupError(f"cannot listen on {bind.address}: {exc.strerror}") from None
            tls = self.server_tls.get(index)
            tls_options = {} if tls is None else {
                "ssl": tls.front, "ssl_handshake_timeout": self.config.connect_timeout}
            if self.http is not None:
                factory = self.http.protocol_factory(bind)
            else:
                factory = Listener(self.loop, self.pool, bind, hash_source, self.config.connect_timeout,
                                   self.connections, self.pools if bind.sni_route else None,
                                   self.config.sni_routes).protocol_factory()
            server = await self.loop.create_server(factory, sock=sock, backlog=self.config.backlog,
                                                   **tls_options)
            self.servers.append(server)
        if self.health_channel is not None and self.pool is not None:
            self.feed_transport, _ = await self.loop.create_unix_connection(
                lambda: HealthFeed(self._on_verdict), sock=self.health_channel)
        if self.checker is not None:
            self.checker.start()
        if self.sweep_interval:
            self.sweep_handle = self.loop.call_later(self.sweep_interval, self._sweep)
        if self.http is not None:
            self.http.start()     # HTTP timeouts and idle backend connections: one sweep of its own

    def _on_verdict(self, index: int, up: bool, reason: str) -> None:
        pool, backend = self.in_config_order[index]
        pool.health.set_checked(backend, up, reason)

    # ---- TLS hooks (hot reload, /metrics and the admin API call these) ---------------------------

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
        for server in self.servers:
            server.close()
        if self.http is not None:
            self.http.draining = True          # responses say Connection: close; idle clients are closed
        deadline = self.loop.time() + grace_period
        if self.connections:
            log.info("draining %d connection(s), grace period %.3gs", len(self.connections), grace_period)
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - self.loop.time())))
        if self.connections:
            log.warning("grace period over: closing %d connection(s)", len(self.connections))
            for client in list(self.connections):
                client.close()
            await asyncio.sleep(0)
        if self.sweep_handle is not None:
            self.sweep_handle.cancel()
        if self.http is not None:
            self.http.stop()
        if self.checker is not None:
            self.checker.close()
        if self.feed_transport is not None:
            self.feed_transport.close()
        for pool in self.pools.values():
            pool.close()


def _die_with_parent() -> None:
    """A worker gets SIGTERM when the master dies, whatever killed it, so no orphan keeps the port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


EXPIRY_WARNING_DAYS = 14


def warn_expiring(server_tls: dict[int, ServerTLS]) -> None:
    for address, path, days in certificate_expiry(server_tls):
        if days < EXPIRY_WARNING_DAYS:
            log.warning("certificate %s of %s %s", path, address,
                        f"expired {-days:.1f} days ago" if days < 0 else f"expires in {days:.1f} days")


def run_worker(config: Config, worker_id: int | None = None, master_pid: int | None = None,
               health_channel: socket.socket | None = None, verdicts: dict[int, bool] | None = None,
               server_tls: dict[int, ServerTLS] | None = None) -> int:
    """Runs one worker until SIGTERM/SIGINT; SIGHUP reloads the certificates. Returns the exit status.

    health_channel / verdicts: from the master, which runs the checks (else the worker runs them).
    server_tls: the TLS binds' contexts made before the fork (made here when None)."""
    import uvloop

    maxconn = effective_maxconn(config)
    if server_tls is None:
        try:
            server_tls = prepare_server_tls(config.binds)
        except TLSConfigError as exc:
            log.error("%s", exc)
            return EXIT_STARTUP_FAILED
        warn_expiring(server_tls)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    if master_pid is not None and os.getppid() != master_pid:
        return 0                                   # the master died before PDEATHSIG was set
    worker = Worker(config, loop, maxconn, health_channel, verdicts, server_tls)
    loop.add_signal_handler(signal.SIGHUP, worker.reload_certificates)

    async def serve() -> None:
        # One run of the loop from start to drain: uvloop handles signals only while it runs, so a signal
        # sent right after "listening on" must not find it stopped between two run_until_complete calls.
        # A forked worker starts with SIGHUP blocked (Master._spawn); unblocked here, with the loop running
        # and the handler above in place, a reload sent meanwhile is delivered now and reloads this
        # worker's copy of the certificates (unblocked before the loop runs, uvloop would drop it).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        await worker.start()
        log.info("listening on %s (mode %s, %s, %d backend(s), maxconn %d)",
                 ", ".join(b.address for b in config.binds), config.mode, config.algorithm,
                 len(config.backends), maxconn)
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


def run(config: Config) -> int:
    """Runs fastlb as configured: one worker in this process, or a master with N workers."""
    setup_logging(config.log_level, None if config.workers > 1 else 0)
    try:
        check_addresses_free(config)
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    if config.workers == 1:
        return run_worker(config)
    try:
        # Made once, before the workers fork, so they all hold the same session ticket keys.
        server_tls = prepare_server_tls(config.binds)
    except TLSConfigError as exc:
        log.error("%s", exc)
        return 1
    warn_expiring(server_tls)
    return Master(config, server_tls).run()


class Master:
    """Forks and supervises the workers; runs the active health checks for all of them.

    Its event loop runs between forks only (`_wait` returns on a signal or a due restart), so a fork
    never happens inside a running loop, and health checks keep their rhythm while it waits."""

    def __init__(self, config: Config, server_tls: dict[int, ServerTLS] | None = None) -> None:
        self.config = config
        self.server_tls = server_tls or {}
        self.workers: dict[int, tuple[int, float]] = {}      # pid -> (worker id, start time)
        self.channels: dict[int, socket.socket] = {}         # pid -> the master's end of its socketpair
        self.young_deaths = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.checker: HealthChecker | None = None
        self.signals: list[int] = []
        self.wakeup: asyncio.Future | None = None

    def _spawn(self, worker_id: int) -> int:
        channel = worker_end = None
        if self.checker is not None:
            channel, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # SIGHUP stays blocked in the child until its worker has a handler for it (run_worker): one sent
        # meanwhile (the master forwards reloads to every worker) waits instead of killing the worker.
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
                self._become_worker(worker_end)
                setup_logging(self.config.log_level, worker_id)
                verdicts = self.checker.states if self.checker is not None else None
                status = run_worker(self.config, worker_id, self.master_pid, worker_end, verdicts,
                                    self.server_tls)
            except BaseException:
                logging.getLogger("fastlb").exception("worker crashed")
            finally:
                sys.stderr.flush()
                os._exit(status)
        if worker_end is not None:
            worker_end.close()
            channel.setblocking(False)
            self.channels[pid] = channel
        self.workers[pid] = (worker_id, time.monotonic())
        log.info("worker %d started (pid %d)", worker_id, pid)
        return pid

    def _become_worker(self, worker_end: socket.socket | None) -> None:
        """In a freshly forked worker: drop the master's signal handling and every file it had open
        (its event loop, other workers' channels, health-check sockets in flight), keeping stdio and this
        worker's own channel. The master's objects stay referenced until os._exit, so nothing closes
        those numbers again once they are reused."""
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        keep = worker_end.fileno() if worker_end is not None else -1
        if keep >= 0:
            os.closerange(3, keep)
            os.closerange(keep + 1, _max_fd())
        else:
            os.closerange(3, _max_fd())
        _die_with_parent()

    def _on_verdict(self, index: int, up: bool, reason: str) -> None:
        """A health flip (the checker has logged it): every worker applies it."""
        message = encode_verdict(index, up, reason)
        for pid, channel in self.channels.items():
            try:
                channel.send(message)
            except BlockingIOError:
                # Only a worker stuck for thousands of flips gets here; it is restarted when it dies.
                log.error("worker pid %d is not reading health verdicts; verdict dropped", pid)
            except OSError:
                pass                   # the worker died: it is reaped and restarted with the state

    def _on_signal(self, signum: int) -> None:
        self.signals.append(signum)
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    async def _wait(self, timeout: float) -> None:
        """Returns after a signal or after timeout; health checks run meanwhile."""
        if self.signals:
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
            for worker_id in range(self.config.workers):
                self._spawn(worker_id)
            if self.checker is not None:
                self.checker.start()
            log.info("master running %d workers%s", self.config.workers,
                     f", checking {len(targets)} backend(s)" if targets else "")
            return self._supervise()
        finally:
            if self.checker is not None:
                self.checker.close()
            for channel in self.channels.values():
                channel.close()
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
                # Each worker reloads its certificates; the master reloads its copy too, so a worker it
                # forks later starts with the new ones (and the same front contexts: same ticket keys).
                for error in reload_certificates(self.server_tls):
                    log.error("certificate reload: %s; keeping the current certificates", error)
                self._forward(signal.SIGHUP)
            for worker_id, status in self._reap():
                if status == EXIT_STARTUP_FAILED:
                    log.error("worker %d could not start; stopping", worker_id)
                    self._shutdown("startup failure")
                    return 1
                pending_restarts.append((now + self._restart_delay(), worker_id))
            for entry in [e for e in pending_restarts if e[0] <= now]:
                pending_restarts.remove(entry)
                self._spawn(entry[1])

    def _forward(self, signum: int) -> None:
        for pid in self.workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _reap(self) -> list[tuple[int, int]]:
        dead = []
        while self.workers:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid not in self.workers:
                continue
            worker_id, started = self.workers.pop(pid)
            channel = self.channels.pop(pid, None)
            if channel is not None:
                channel.close()
            status = os.waitstatus_to_exitcode(wait_status)
            how = f"killed by {signal.Signals(-status).name}" if status < 0 else f"exited with status {status}"
            log.warning("worker %d (pid %d) %s; restarting", worker_id, pid, how)
            if time.monotonic() - started < YOUNG_WORKER_SECONDS:
                self.young_deaths += 1
            else:
                self.young_deaths = 0
            dead.append((worker_id, status))
        return dead

    def _restart_delay(self) -> float:
        if not self.young_deaths:
            return 0.0
        return min(MAX_RESTART_DELAY, 0.1 * 2 ** (self.young_deaths - 1))

    def _shutdown(self, reason: str) -> int:
        log.info("%s: stopping %d worker(s)", reason, len(self.workers))
        if self.checker is not None:
            self.checker.close()
        for pid in self.workers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
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


def _max_fd() -> int:
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 65536
