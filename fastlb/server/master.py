"""The master of `--workers N`, and `run`, which starts fastlb as configured.

`--workers 1`: the fastlb process is the worker (fastlb/server/worker.py), and runs the health checks
itself. `--workers N`: a master forks N workers; each worker listens on its own socket with
SO_REUSEPORT, so the kernel spreads new connections over them. The master supervises: it restarts a
worker that dies (with a backoff when workers die young, so a crash loop does not spin), and on
SIGTERM/SIGINT forwards SIGTERM and waits. It is the controller (fastlb/server/controller.py): it runs
the active health checks, once for the whole balancer, on its own event loop, the admin bind and
discovery, and sends each verdict and change to every worker over its channel (fastlb/channel.py); a
worker it (re)starts gets the current backends, verdicts and operator states with the fork. The master
forks only while its loop is not running, and the child closes what it inherited.

Reload (SIGHUP, or the admin API): the TLS certificates reload (the master's copy, then every worker's
over its channel); backend changes apply in place everywhere; other changes start a new generation of
workers on the same listening sockets (with TLS contexts made for the new config), and the old
generation drains. A forked worker starts with SIGHUP blocked, unblocked once its loop runs with a
handler (a SIGHUP sent to a worker itself reloads that worker's certificates).

TLS binds: the contexts are made once before the workers fork (fastlb/tls.py: shared ticket keys) and
each worker's listener on its inherited socket gets its bind's front context. Backends are one pool per
backend group (tcp mode's SNI routes); verdicts and admin changes name backends by address.
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

from fastlb.admission import configured as admission_configured, merge_views
from fastlb.channel import LineChannel
from fastlb.config import Config, ConfigError
from fastlb.control import aggregate, merge_snapshot, retire, spec_from_dict
from fastlb.discovery import Discovery
from fastlb.server.controller import (ControllerBase, certificate_view, describe_certificate_reload,
                                      warn_expiring)
from fastlb.server.worker import (EXIT_STARTUP_FAILED, StartupError, check_addresses_free, listen_socket,
                                  run_worker, setup_logging)
from fastlb.tls import (ServerTLS, TLSConfigError, alpn_for, certificate_expiry, prepare_server_tls,
                        reload_certificates)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3       # glibc mallopt() parameters
PR_SET_PDEATHSIG = 1
log = logging.getLogger("fastlb")

YOUNG_WORKER_SECONDS = 1.0    # a worker dying sooner than this counts towards the restart backoff
MAX_YOUNG_DEATHS = 5          # this many young deaths in a row: a crash loop; the master gives up
MAX_RESTART_DELAY = 5.0


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


def _die_with_parent() -> None:
    """A worker gets SIGTERM when the master dies, whatever killed it, so no orphan keeps the port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


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


class Master(ControllerBase):
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
        super().__init__(None, config, reload_source)      # the loop: made in `run`
        # The TLS binds' contexts of the current config, handed to each worker with the fork (one set of
        # session ticket keys); reloaded here too, so a worker forked later starts with the new files.
        self.server_tls = server_tls if server_tls is not None else {}
        self.workers: dict[int, WorkerHandle] = {}
        self.generation = 0
        self.listen_socks: dict[tuple[str, int], socket.socket] = {}    # (bind address, slot) -> socket
        self.young_deaths = 0
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

    # ---- the controller interface (admin API, discovery; ControllerBase) ---------------------------

    def deliver(self, change: dict) -> None:
        """A change or a health verdict: every worker applies it."""
        self._send_all(change)
        if change["op"] != "health":
            log.info("applied %s to %d worker(s)", _describe(change), len(self.workers))

    def admission_specs(self):
        return self.config.rate_limit if admission_configured(self.config) else None

    def deliver_admission(self, change: dict) -> dict:
        """A block / unblock: to every worker, and kept for the workers started later."""
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
        new, changes, other = self.reread_and_apply()
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
            targets = self.make_checker(self.config)
            try:
                for worker_id in range(self.config.workers):
                    if self._stop_requested():
                        break           # SIGTERM while forking: no more workers; _supervise stops these
                    self._spawn(worker_id)
            except StartupError as exc:
                log.error("%s", exc)
                self._shutdown("startup failure")
                return 1
            loop.run_until_complete(self.start_services())
            log.info("master running %d workers%s", len(self.workers),
                     f", checking {targets} backend(s)" if targets else "")
            return self._supervise()
        finally:
            loop.run_until_complete(self.close_services())
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
        self.next_check_index = self.make_checker(self.table.current_config())
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
