"""Listeners, worker processes, the supervising master, signals and graceful shutdown.

`--workers 1`: the fastlb process is the worker. `--workers N`: a master forks N workers before any
event loop exists; each worker binds its own listening socket with SO_REUSEPORT, so the kernel spreads
new connections over them. The master only supervises: it restarts a worker that dies (with a backoff
when workers die young, so a crash loop does not spin), and on SIGTERM/SIGINT forwards SIGTERM and waits.

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
from fastlb.l4 import Listener
from fastlb.pool import BackendPool

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

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, maxconn: int) -> None:
        self.config = config
        self.loop = loop
        self.connections: set = set()
        self.http = None
        if config.mode == "http":
            from fastlb.http.runtime import HttpRuntime, build_router
            self.http = HttpRuntime(config, loop, build_router(config, loop, maxconn), self.connections)
            self.pool = None
        else:
            self.pool = BackendPool(config, loop, maxconn)
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
        for bind in self.config.binds:
            try:
                sock = listen_socket(bind.host, bind.port, self.config.backlog)
            except OSError as exc:
                raise StartupError(f"cannot listen on {bind.address}: {exc.strerror}") from None
            if self.http is not None:
                factory = self.http.protocol_factory(bind)
            else:
                factory = Listener(self.loop, self.pool, bind, hash_source, self.config.connect_timeout,
                                   self.connections).protocol_factory()
            server = await self.loop.create_server(factory, sock=sock, backlog=self.config.backlog)
            self.servers.append(server)
        if self.sweep_interval:
            self.sweep_handle = self.loop.call_later(self.sweep_interval, self._sweep)
        if self.http is not None:
            self.http.start()     # HTTP timeouts and idle backend connections: one sweep of its own

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


def _die_with_parent() -> None:
    """A worker gets SIGTERM when the master dies, whatever killed it, so no orphan keeps the port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def run_worker(config: Config, worker_id: int | None = None, master_pid: int | None = None) -> int:
    """Runs one worker until SIGTERM/SIGINT. Returns the process exit status."""
    import uvloop

    maxconn = effective_maxconn(config)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    if master_pid is not None and os.getppid() != master_pid:
        return 0                                   # the master died before PDEATHSIG was set
    worker = Worker(config, loop, maxconn)
    try:
        loop.run_until_complete(worker.start())
    except StartupError as exc:
        log.error("%s", exc)
        return EXIT_STARTUP_FAILED
    log.info("listening on %s (mode %s, %s, %d backend(s), maxconn %d)",
             ", ".join(b.address for b in config.binds), config.mode, config.algorithm,
             len(config.backends), maxconn)
    try:
        loop.run_until_complete(stop)
        loop.run_until_complete(worker.drain(config.grace_period))
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
    return Master(config).run()


class Master:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.workers: dict[int, tuple[int, float]] = {}      # pid -> (worker id, start time)
        self.young_deaths = 0

    def _spawn(self, worker_id: int) -> int:
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, set())
                _die_with_parent()
                setup_logging(self.config.log_level, worker_id)
                status = run_worker(self.config, worker_id, self.master_pid)
            except BaseException:
                logging.getLogger("fastlb").exception("worker crashed")
            finally:
                sys.stderr.flush()
                os._exit(status)
        self.workers[pid] = (worker_id, time.monotonic())
        log.info("worker %d started (pid %d)", worker_id, pid)
        return pid

    def run(self) -> int:
        self.master_pid = os.getpid()
        handled = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        for worker_id in range(self.config.workers):
            self._spawn(worker_id)
        log.info("master running %d workers", self.config.workers)
        pending_restarts: list[tuple[float, int]] = []          # (when, worker id)
        while True:
            timeout = 1.0
            if pending_restarts:
                timeout = max(0.0, min(when for when, _ in pending_restarts) - time.monotonic())
            info = signal.sigtimedwait(handled, timeout)
            now = time.monotonic()
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                return self._shutdown(signal.Signals(info.si_signo).name)
            for worker_id, status in self._reap():
                if status == EXIT_STARTUP_FAILED:
                    log.error("worker %d could not start; stopping", worker_id)
                    self._shutdown("startup failure")
                    return 1
                pending_restarts.append((now + self._restart_delay(), worker_id))
            for entry in [e for e in pending_restarts if e[0] <= now]:
                pending_restarts.remove(entry)
                self._spawn(entry[1])

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
        for pid in self.workers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.config.grace_period + 5.0
        while self.workers and time.monotonic() < deadline:
            signal.sigtimedwait({signal.SIGCHLD}, 0.1)
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
