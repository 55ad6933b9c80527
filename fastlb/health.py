"""Health: active checks, passive outlier detection, slow start.

Three parts, all off the relay's data path (they run on timers and on failures, which are rare):

- `HealthChecker` runs the active checks (TCP connect, or an HTTP request) of every backend on one event
  loop: once per balancer, in the master with `--workers N`, in the worker itself with one worker. A
  backend's verdict flips only after `rise` passed / `fall` failed checks in a row (like HAProxy, a
  backend starts up and its very first failed check takes it down, so a backend dead at start-up is out
  at once). Each flip is logged once, by the checker, and handed to `on_change`.
- `BackendHealth` is a worker's side: it applies check verdicts (`set_checked`) to its `Backend`s,
  ejects backends that fail live traffic (`record`: passive outlier detection, also the hook for the
  HTTP mode's 5xx and response timeouts), brings them back after the ejection time, and ramps a
  returning backend's weight (slow start). Every state and weight change goes through the core via
  `Backend.refresh` / `Backend.set_weight`.
- The master's verdicts reach its workers over the worker channel (fastlb/channel.py), one message per
  flip naming the backend by address.

Passive detection is per worker (each sees its own traffic, as Envoy's per-host detectors see theirs);
active verdicts are global. An ejected backend is probed in the background every `outlier_probe_interval`
(a connect, or its pool's http check) and returns as soon as it answers, so a backend that restarts is
back within a probe interval instead of after the ejection time (which stays the longest it is out).

Every pool has all of this: the top-level one and each HTTP [[pool]], whose targets carry its name.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from fastlb.config import Config, HealthSettings

if TYPE_CHECKING:
    from fastlb.pool import Backend, BackendPool

log = logging.getLogger("fastlb")

# `record()` kinds: a connect attempt (refused, reset, timed out), or a response (a 5xx, a response
# timeout: the HTTP mode's). A good connect resets only the connect streak, so a backend that accepts
# connections and answers 500 still builds up its response streak.
CONNECT = "connect"
RESPONSE = "response"

SLOWSTART_STEPS = 10            # weight steps of a ramp; a step at least MIN_RAMP_STEP seconds apart
MIN_RAMP_STEP = 0.1
HTTP_HEAD_LIMIT = 16384         # a check response's head larger than this fails the check
HTTP_BODY_LIMIT = 65536         # check_body is looked for in the body's first bytes only


def describe_error(exc: BaseException | str, timeout: float | None = None) -> str:
    """A short reason for a log line: 'connection refused', 'timeout after 1s', ..."""
    if isinstance(exc, str):
        return exc
    if isinstance(exc, TimeoutError):
        return f"timeout after {timeout:g}s" if timeout else "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed before a complete response"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return exc.__class__.__name__


# A connect (or check) failing with these failed in fastlb, not at the backend: out of file descriptors
# (the process's or the system's), of socket buffers or memory. Never counted against the backend:
# ejecting a healthy backend for our own limit would only make things worse.
OWN_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def own_resource_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in OWN_RESOURCE_ERRNOS


OWN_FAILURE = object()      # a probe's "problem" when it failed on fastlb's own limits: no verdict


# ---- active checks --------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckTarget:
    index: int                  # the backend's position in the configuration
    address: str                # for log lines
    host: str
    port: int                   # the check port, or the backend's
    settings: HealthSettings
    pool: str | None = None     # a named [[pool]]'s name; None: the top-level pool

    @property
    def key(self) -> str:
        """How verdicts name the backend: ADDR in the top-level pool, POOL/ADDR in a named one."""
        return f"{self.pool}/{self.address}" if self.pool else self.address

    def change(self, up: bool, reason: str) -> dict:
        """The verdict as a change for the workers (fastlb/control.py)."""
        change = {"op": "health", "address": self.address, "up": up, "reason": reason}
        if self.pool:
            change["pool"] = self.pool
        return change


def check_targets(config: Config, first_index: int = 0) -> list[CheckTarget]:
    """The backends that have an active check (`check` not "none"), with where to check them: the
    top-level pool's, then every named pool's (with that pool's settings)."""
    targets = []
    index = first_index
    for pool_name, pool_config in [(None, config), *((p.name, config.pool_config(p)) for p in config.pools)]:
        for spec in pool_config.backends:
            target = check_target(pool_config, spec, index, pool_name)
            index += 1
            if target is not None:
                targets.append(target)
    return targets


def check_target(config: Config, spec, index: int, pool: str | None = None) -> CheckTarget | None:
    settings = config.health_for(spec)
    if settings.check == "none":
        return None
    return CheckTarget(index, spec.address, spec.host, settings.check_port or spec.port, settings, pool)


async def probe_tcp(loop: asyncio.AbstractEventLoop, target: CheckTarget) -> str | None:
    """Connects and closes. Returns None when the check passes, else why it failed."""
    transport, _ = await loop.create_connection(asyncio.Protocol, target.host, target.port)
    transport.close()
    return None


def http_check_request(target: CheckTarget) -> bytes:
    settings = target.settings
    host = settings.check_host or target.address
    return (f"{settings.check_method} {settings.check_path} HTTP/1.1\r\nHost: {host}\r\n"
            f"User-Agent: fastlb-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n").encode()


async def probe_http(loop: asyncio.AbstractEventLoop, target: CheckTarget) -> str | None:
    """Sends one HTTP/1.1 request (Connection: close) and checks the status and, optionally, the body."""
    settings = target.settings
    reader, writer = await asyncio.open_connection(target.host, target.port, limit=HTTP_HEAD_LIMIT)
    try:
        writer.write(http_check_request(target))
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return f"response head larger than {HTTP_HEAD_LIMIT} bytes"
        status_line, _, header_block = head.partition(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            return f"not an HTTP response ({status_line[:40]!r})"
        status = int(parts[1])
        low, high = settings.check_expect
        if not low <= status <= high:
            return f"HTTP {status}, expected {low}-{high}" if low != high else f"HTTP {status}, expected {low}"
        if settings.check_body is None or settings.check_method == "HEAD":
            return None
        length = HTTP_BODY_LIMIT
        for line in header_block.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length" and value.strip().isdigit():
                length = min(length, int(value))
        # Chunked bodies are searched as sent: a chunk boundary inside the text would hide it.
        body = b""
        while len(body) < length:
            chunk = await reader.read(length - len(body))
            if not chunk:
                break
            body += chunk
        if settings.check_body.encode() not in body:
            return f"HTTP {status} but the body lacks {settings.check_body!r}"
        return None
    finally:
        writer.transport.abort()     # Connection: close was asked; nothing more to read or say


PROBES = {"tcp": probe_tcp, "http": probe_http}


class _CheckState:
    __slots__ = ("target", "up", "fresh", "passes", "failures", "handle", "task")

    def __init__(self, target: CheckTarget, up: bool) -> None:
        self.target = target
        self.up = up
        self.fresh = True           # no result yet: the first failure counts as `fall` of them
        self.passes = 0             # in a row
        self.failures = 0           # in a row
        self.handle: asyncio.TimerHandle | None = None
        self.task: asyncio.Task | None = None


class HealthChecker:
    """Runs every target's checks on one loop; calls on_change(index, up, reason) after each flip.

    Checks of one backend never overlap: the next is scheduled `check_interval` (+- jitter) after the
    previous one ended, so a slow check cannot pile up connections on a sick backend."""

    def __init__(self, loop: asyncio.AbstractEventLoop, targets: list[CheckTarget],
                 on_change: Callable[[int, bool, str], None]) -> None:
        self.loop = loop
        self.on_change = on_change
        self.checks = {t.index: _CheckState(t, up=True) for t in targets}
        self.random = random.Random()
        self.closed = False

    @property
    def states(self) -> dict[int, bool]:
        """index -> up, for every checked backend."""
        return {index: check.up for index, check in self.checks.items()}

    @property
    def verdicts(self) -> dict[str, bool]:
        """ADDR or POOL/ADDR (CheckTarget.key) -> up, for every checked backend (what a newly started
        worker must know)."""
        return {check.target.key: check.up for check in self.checks.values()}

    def add_target(self, target: CheckTarget, up: bool = False) -> None:
        """Starts checking a backend added at run time. It starts down (`up=False`): a new server takes
        traffic once `rise` checks passed."""
        if target.index in self.checks:
            return
        check = self.checks[target.index] = _CheckState(target, up)
        check.fresh = up
        if not self.closed:
            check.handle = self.loop.call_soon(self._run, check)

    def remove_target(self, address: str, pool: str | None = None) -> None:
        for index, check in list(self.checks.items()):
            if check.target.address == address and check.target.pool == pool:
                for job in (check.handle, check.task):
                    if job is not None:
                        job.cancel()
                del self.checks[index]

    def start(self) -> None:
        # First checks are spread over a short time rather than fired together: a backend that is down
        # at start-up is found out within about one check timeout.
        for check in self.checks.values():
            settings = check.target.settings
            delay = self.random.uniform(0, min(settings.check_interval, 1.0) * settings.check_jitter)
            check.handle = self.loop.call_later(delay, self._run, check)

    def close(self) -> None:
        self.closed = True
        for check in self.checks.values():
            if check.handle is not None:
                check.handle.cancel()
                check.handle = None
            if check.task is not None:
                check.task.cancel()
                check.task = None

    def _run(self, check: _CheckState) -> None:
        check.handle = None
        check.task = self.loop.create_task(self._check(check))

    async def _check(self, check: _CheckState) -> None:
        target = check.target
        settings = target.settings
        try:
            async with asyncio.timeout(settings.check_timeout):
                problem = await PROBES[settings.check](self.loop, target)
        except asyncio.CancelledError:
            raise
        except Exception as exc:       # any failure of the probe is a failed check, never a crash
            problem = describe_error(exc, settings.check_timeout)
            if own_resource_error(exc):
                problem = OWN_FAILURE          # no verdict: the check could not even be tried
        check.task = None
        if self.closed:
            return
        if problem is not OWN_FAILURE:
            self._result(check, problem)
        jitter = settings.check_jitter
        delay = settings.check_interval * (1.0 + self.random.uniform(-jitter, jitter))
        check.handle = self.loop.call_later(delay, self._run, check)

    def _result(self, check: _CheckState, problem: str | None) -> None:
        settings = check.target.settings
        fresh, check.fresh = check.fresh, False
        if problem is None:
            check.failures = 0
            check.passes += 1
            if not check.up and check.passes >= settings.rise:
                passes = check.passes
                reason = "check passed" if passes == 1 else f"{passes} consecutive checks passed"
                self._flip(check, True, reason)
            return
        check.passes = 0
        check.failures += 1
        if check.up and (fresh or check.failures >= settings.fall):
            failures = check.failures
            reason = (f"first check failed ({problem})" if fresh else
                      f"check failed ({problem})" if failures == 1 else
                      f"{failures} consecutive check failures ({problem})")
            self._flip(check, False, reason)
        elif not check.up:
            log.debug("backend %s still down: %s", check.target.address, problem)

    def _flip(self, check: _CheckState, up: bool, reason: str) -> None:
        check.up = up
        log.log(logging.INFO if up else logging.WARNING, "backend %s %s: %s", check.target.address,
                "UP" if up else "DOWN", reason)
        self.on_change(check.target.index, up, reason)


# ---- a worker's side: verdicts, ejections, slow start ---------------------------------------------

class BackendHealth:
    """Applies health to one worker's backends. Every change goes through `Backend.refresh` (state) or
    `Backend.set_weight` (slow start), i.e. through the core."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: "BackendPool", config: Config) -> None:
        self.loop = loop
        self.pool = pool
        self.outlier_failures = config.outlier_failures
        self.ejection_time = config.outlier_ejection_time
        self.max_ejection_time = config.outlier_max_ejection_time
        self.max_ejection_percent = config.max_ejection_percent
        self.probe_interval = config.outlier_probe_interval
        self.probes: dict["Backend", asyncio.Task] = {}     # ejected backend -> its recovery probe

    def close(self) -> None:
        for probe in self.probes.values():
            probe.cancel()
        self.probes.clear()
        for backend in self.pool.backends:
            for handle in (backend.eject_handle, backend.ramp_handle):
                if handle is not None:
                    handle.cancel()
            backend.eject_handle = backend.ramp_handle = None

    # ---- active verdicts ----------------------------------------------------------------------

    def set_checked(self, backend: "Backend", up: bool, reason: str) -> None:
        """The active checks' verdict (already logged by the checker). A passing verdict also ends a
        passive ejection: the checks have just seen the backend answer."""
        if backend.checked_up == up:
            return
        backend.checked_up = up
        if up and backend.ejected:
            self._end_ejection(backend)
        self._refresh(backend)
        log.debug("backend %s now %s (health check: %s)", backend.address, backend.state, reason)

    # ---- passive outlier detection ------------------------------------------------------------

    def record(self, backend: "Backend", ok: bool, kind: str = CONNECT,
               detail: BaseException | str = "") -> None:
        """One outcome of live traffic on backend: kind CONNECT (a connect attempt) or RESPONSE (the
        HTTP mode: a 5xx or a response timeout is a failure). `outlier_failures` failures of one kind
        in a row eject the backend, within the max_ejection_percent cap."""
        if ok:
            if kind == CONNECT:
                backend.connect_failures = 0
            else:
                backend.bad_responses = 0
            return
        if kind == CONNECT:
            backend.connect_failures += 1
            streak, what = backend.connect_failures, "connect failures"
        else:
            backend.bad_responses += 1
            streak, what = backend.bad_responses, "bad responses"
        if not self.outlier_failures or streak < self.outlier_failures or backend.ejected:
            return
        reason = f"{streak} consecutive {what} ({describe_error(detail)})"
        refusal = self._ejection_refusal(backend)
        if refusal:
            if streak == self.outlier_failures:      # said once per streak, not per failure
                log.warning("backend %s not ejected after %s: %s", backend.address, reason, refusal)
            return
        self._eject(backend, reason, kind)

    def _ejection_refusal(self, backend: "Backend") -> str | None:
        group = self.pool.group_of(backend)
        ejected = sum(1 for b in group if b.ejected)
        allowed = len(group) * self.max_ejection_percent // 100
        if ejected + 1 > allowed:
            return (f"{ejected} of {len(group)} already ejected, max_ejection_percent is "
                    f"{self.max_ejection_percent}")
        if not any(b.available for b in group if b is not backend):
            return "it is the last available backend of its pool"
        return None

    def _eject(self, backend: "Backend", reason: str, kind: str = CONNECT) -> None:
        now = self.loop.time()
        if backend.returned_at and now - backend.returned_at > self.max_ejection_time:
            backend.ejections = 0          # well-behaved for a long time: start again from the base time
        backend.ejections += 1
        duration = min(self.ejection_time * backend.ejections, self.max_ejection_time)
        backend.ejected = True
        backend.eject_handle = self.loop.call_later(duration, self._ejection_over, backend)
        self._refresh(backend)
        # A connect proves a backend that refused connects is back; one that answered badly needs its
        # http check to show it (without one it waits out the ejection).
        probing = bool(self.probe_interval) and (kind == CONNECT or backend.health.check == "http")
        log.warning("backend %s ejected for %gs (ejection %d): %s%s", backend.address, duration,
                    backend.ejections, reason, f"; probed every {self.probe_interval:g}s" if probing else "")
        if probing:
            self._schedule_probe(backend)

    # ---- recovery probes: an ejected backend returns as soon as it answers --------------------------

    def _schedule_probe(self, backend: "Backend") -> None:
        self.probes[backend] = self.loop.call_later(self.probe_interval, self._start_probe, backend)

    def _start_probe(self, backend: "Backend") -> None:
        if backend.removed or not backend.ejected:
            self.probes.pop(backend, None)
            return
        self.probes[backend] = self.loop.create_task(self._probe(backend))

    async def _probe(self, backend: "Backend") -> None:
        """One probe of an ejected backend (its http check, or a connect): when it passes the ejection
        ends (through slow start, when set), else the next one is scheduled."""
        settings = backend.health
        kind = "http" if settings.check == "http" else "tcp"
        target = CheckTarget(-1, backend.address, backend.host, settings.check_port or backend.port, settings)
        try:
            async with asyncio.timeout(settings.check_timeout):
                problem = await PROBES[kind](self.loop, target)
        except asyncio.CancelledError:
            raise
        except Exception as exc:           # any failure of the probe is a failed probe, never a crash
            problem = describe_error(exc, settings.check_timeout)
        if problem is not None:
            self._schedule_probe(backend)
            return
        self.probes.pop(backend, None)
        if backend.removed or not backend.ejected:
            return
        self._end_ejection(backend)
        self._refresh(backend)
        log.info("backend %s back from ejection: it answers again (%s probe)%s", backend.address, kind,
                 "" if backend.checked_up else ", but its health checks still fail: stays down")

    def _ejection_over(self, backend: "Backend") -> None:
        backend.eject_handle = None
        self._end_ejection(backend)
        self._refresh(backend)
        log.info("backend %s back from ejection%s", backend.address,
                 "" if backend.checked_up else " (its health checks still fail: stays down)")

    def _end_ejection(self, backend: "Backend") -> None:
        probe = self.probes.pop(backend, None)
        if probe is not None:
            probe.cancel()
        if backend.eject_handle is not None:
            backend.eject_handle.cancel()
            backend.eject_handle = None
        backend.ejected = False
        backend.connect_failures = backend.bad_responses = 0
        backend.returned_at = self.loop.time()

    # ---- state and slow start -----------------------------------------------------------------

    def _refresh(self, backend: "Backend") -> None:
        was_available = backend.available
        backend.refresh()
        if backend.available and not was_available:
            self._start_ramp(backend)
        elif was_available and not backend.available:
            self._stop_ramp(backend)

    def _start_ramp(self, backend: "Backend") -> None:
        slowstart = backend.health.slowstart
        if not slowstart or backend.full_weight <= 1:
            return
        steps = max(1, min(SLOWSTART_STEPS, int(slowstart / MIN_RAMP_STEP)))
        self._ramp_step(backend, 1, steps, slowstart / steps)

    def _ramp_step(self, backend: "Backend", step: int, steps: int, step_time: float) -> None:
        backend.ramp_handle = None
        weight = max(1, backend.full_weight * step // steps)
        backend.set_weight(weight)
        if step < steps:
            backend.ramp_handle = self.loop.call_later(step_time, self._ramp_step, backend, step + 1,
                                                       steps, step_time)
        else:
            log.debug("backend %s at full weight after slow start", backend.address)

    def _stop_ramp(self, backend: "Backend") -> None:
        if backend.ramp_handle is not None:
            backend.ramp_handle.cancel()
            backend.ramp_handle = None
        backend.set_weight(backend.full_weight)    # a down backend is not picked whatever its weight
