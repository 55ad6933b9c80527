"""Health: active checks, passive outlier detection, slow start.

Three parts, all off the relay's data path (they run on timers and on failures, which are rare):

- `HealthChecker` runs the active checks (TCP connect, or an HTTP request) of every backend on one event
  loop: once per balancer, in the master with `--workers N`, in the worker itself with one worker. A
  backend's verdict flips only after `rise` passed / `fall` failed checks in a row (like HAProxy, a
  backend starts up and its very first failed check takes it down, so a backend dead at start-up is out
  at once). Each flip is logged once, by the checker, and handed to `on_change`.
- `BackendHealth` is a worker's side. It keeps a `HealthState` per backend (the state's sources: the
  operator's state, the checks' verdict, a passive ejection; the streaks and timers), applies check
  verdicts (`set_checked`) and operator states (`set_admin_state`), ejects backends that fail live
  traffic (`record`: passive outlier detection, also the hook for the HTTP mode's 5xx and response
  timeouts), brings them back after the ejection time, and ramps a returning backend's weight (slow
  start). It publishes the effective state and weight to the backend (`Selection.publish_state` /
  `publish_weight`: fastlb/pool.py's `Backend`, which tells the core); selection only reads them.
  This module imports nothing of the pool.
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
from typing import Callable, Protocol

from fastlb.config import Config, HealthSettings

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
    ssl: bool = False           # the backend's TLS settings (its `ssl`, `verify=` and `sni=` options): the
    verify: str | None = None   # grpc check speaks TLS to an ssl backend as its requests do
    sni: str | None = None

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
    return CheckTarget(index, spec.address, spec.host, settings.check_port or spec.port, settings, pool,
                       spec.ssl, spec.verify, spec.sni)


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


async def probe_grpc(loop: asyncio.AbstractEventLoop, target: CheckTarget) -> str | None:
    """One gRPC health call (grpc.health.v1.Health/Check for check_service, by default none: the whole
    server) over HTTP/2 (libnghttp2: fastlb/http2/backend.py), TLS with ALPN h2 to an ssl backend:
    passes on grpc-status 0 and SERVING."""
    from fastlb.http2.backend import grpc_health_check, h2_context
    settings = target.settings
    context = h2_context(target.verify) if target.ssl else None
    return await grpc_health_check(loop, target.host, target.port, settings.check_host or target.address,
                                   settings.check_service or "", context, target.sni or target.host)


PROBES = {"tcp": probe_tcp, "http": probe_http, "grpc": probe_grpc}


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

ADMIN_STATES = ("up", "drain", "maint")


class Selection(Protocol):
    """What health publishes to: one backend as selection sees it (fastlb.pool.Backend). Health reads
    who it is (for probes and log lines) and publishes the effective state and weight to it; it never
    reads selection's own bookkeeping (slots taken, the full flag)."""

    address: str
    host: str
    port: int

    def publish_state(self, state: str) -> None: ...

    def publish_weight(self, weight: int) -> None: ...


class HealthState:
    """One backend's health in one worker: the sources of its state, what they make of it (`state`),
    the live-traffic streaks and the timers. Only BackendHealth changes it, and publishes `state` and
    the weight (lowered for a while by slow start) to `backend`, where selection reads them."""

    __slots__ = ("backend", "settings", "group", "admin_state", "checked_up", "ejected", "state",
                 "full_weight", "connect_failures", "bad_responses", "ejections", "returned_at",
                 "eject_handle", "ramp_handle")

    def __init__(self, backend: Selection, settings: HealthSettings, group: list["HealthState"],
                 full_weight: int, checked_up: bool) -> None:
        self.backend = backend
        self.settings = settings
        self.group = group                   # the states of the backends sharing its Balancer, itself included
        # The sources of the state
        self.admin_state = "up"              # the operator's: "up", "drain" or "maint" (disabled: down)
        self.checked_up = checked_up         # the active health checks' verdict
        self.ejected = False                 # ejected by passive outlier detection, until eject_handle fires
        # What they make of it: "up" (can take new connections), "drain" (finishes its connections, takes
        # no new one) or "down"
        self.state = self.effective_state()
        self.full_weight = full_weight       # the core weight when not ramping up after a return
        # Live traffic (passive detection)
        self.connect_failures = 0            # in a row
        self.bad_responses = 0               # in a row (5xx, response timeouts), fed by the HTTP mode
        self.ejections = 0                   # how many times in a row it was ejected: the n-th lasts n x base
        self.returned_at = 0.0
        self.eject_handle: asyncio.TimerHandle | None = None
        self.ramp_handle: asyncio.TimerHandle | None = None

    @property
    def available(self) -> bool:
        """Can take new connections."""
        return self.state == "up"

    def effective_state(self) -> str:
        if self.ejected or not self.checked_up or self.admin_state == "maint":
            return "down"
        return self.admin_state

    def __repr__(self) -> str:
        return f"<HealthState {self.backend.address} {self.state}>"


class BackendHealth:
    """Health of one pool's backends in one worker: applies check verdicts and operator states, ejects
    backends that fail live traffic, ramps returning ones up. It keeps a `HealthState` per backend
    (`track` / `forget`) and publishes every change of state or weight to the backend (`Selection`),
    i.e. to the core."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: Config) -> None:
        self.loop = loop
        self.outlier_failures = config.outlier_failures
        self.ejection_time = config.outlier_ejection_time
        self.max_ejection_time = config.outlier_max_ejection_time
        self.max_ejection_percent = config.max_ejection_percent
        self.probe_interval = config.outlier_probe_interval
        # The primaries' states and the backups': the max_ejection_percent cap counts within one.
        self.groups: dict[bool, list[HealthState]] = {False: [], True: []}
        self.probes: dict[HealthState, asyncio.TimerHandle | asyncio.Task] = {}   # ejected -> its recovery probe

    def track(self, backend: Selection, settings: HealthSettings, full_weight: int, backup: bool,
              checked_up: bool = True) -> HealthState:
        """Starts keeping backend's health and publishes its state. A backend added while the active
        checks run starts down (`checked_up=False`) until they pass, as a new server should."""
        state = HealthState(backend, settings, self.groups[backup], full_weight, checked_up)
        state.group.append(state)
        backend.publish_state(state.state)
        return state

    def forget(self, state: HealthState) -> None:
        """A removed backend: its timers and recovery probe are cancelled, its group no longer counts it."""
        self._cancel_timers(state)
        state.group.remove(state)

    def close(self) -> None:
        for group in self.groups.values():
            for state in group:
                self._cancel_timers(state)

    def _cancel_timers(self, state: HealthState) -> None:
        probe = self.probes.pop(state, None)
        for job in (probe, state.eject_handle, state.ramp_handle):
            if job is not None:
                job.cancel()
        state.eject_handle = state.ramp_handle = None

    # ---- the operator's state and weight ----------------------------------------------------------

    def set_admin_state(self, state: HealthState, admin_state: str) -> None:
        """"up", "drain" (no new connections; live ones finish) or "maint" (disabled: down whatever the
        health checks say; live connections finish too)."""
        if admin_state not in ADMIN_STATES:
            raise ValueError(f"operator state must be one of {', '.join(ADMIN_STATES)}, not {admin_state!r}")
        state.admin_state = admin_state
        self._refresh(state)

    def set_full_weight(self, state: HealthState, weight: int) -> None:
        """The configured weight (in core units); a backend ramping up after slow start continues towards it."""
        state.full_weight = weight
        if state.ramp_handle is None:
            state.backend.publish_weight(weight)

    # ---- active verdicts ----------------------------------------------------------------------

    def set_checked(self, state: HealthState, up: bool, reason: str) -> None:
        """The active checks' verdict (already logged by the checker). A passing verdict also ends a
        passive ejection: the checks have just seen the backend answer."""
        if state.checked_up == up:
            return
        state.checked_up = up
        if up and state.ejected:
            self._end_ejection(state)
        self._refresh(state)
        log.debug("backend %s now %s (health check: %s)", state.backend.address, state.state, reason)

    # ---- passive outlier detection ------------------------------------------------------------

    def record(self, state: HealthState, ok: bool, kind: str = CONNECT,
               detail: BaseException | str = "") -> None:
        """One outcome of live traffic on a backend: kind CONNECT (a connect attempt) or RESPONSE (the
        HTTP mode: a 5xx or a response timeout is a failure). `outlier_failures` failures of one kind
        in a row eject the backend, within the max_ejection_percent cap."""
        if ok:
            if kind == CONNECT:
                state.connect_failures = 0
            else:
                state.bad_responses = 0
            return
        if kind == CONNECT:
            state.connect_failures += 1
            streak, what = state.connect_failures, "connect failures"
        else:
            state.bad_responses += 1
            streak, what = state.bad_responses, "bad responses"
        if not self.outlier_failures or streak < self.outlier_failures or state.ejected:
            return
        reason = f"{streak} consecutive {what} ({describe_error(detail)})"
        refusal = self._ejection_refusal(state)
        if refusal:
            if streak == self.outlier_failures:      # said once per streak, not per failure
                log.warning("backend %s not ejected after %s: %s", state.backend.address, reason, refusal)
            return
        self._eject(state, reason, kind)

    def _ejection_refusal(self, state: HealthState) -> str | None:
        group = state.group
        ejected = sum(1 for s in group if s.ejected)
        allowed = len(group) * self.max_ejection_percent // 100
        if ejected + 1 > allowed:
            return (f"{ejected} of {len(group)} already ejected, max_ejection_percent is "
                    f"{self.max_ejection_percent}")
        if not any(s.available for s in group if s is not state):
            return "it is the last available backend of its pool"
        return None

    def _eject(self, state: HealthState, reason: str, kind: str = CONNECT) -> None:
        now = self.loop.time()
        if state.returned_at and now - state.returned_at > self.max_ejection_time:
            state.ejections = 0          # well-behaved for a long time: start again from the base time
        state.ejections += 1
        duration = min(self.ejection_time * state.ejections, self.max_ejection_time)
        state.ejected = True
        state.eject_handle = self.loop.call_later(duration, self._ejection_over, state)
        self._refresh(state)
        # A connect proves a backend that refused connects is back; one that answered badly needs its
        # http check to show it (without one it waits out the ejection).
        probing = bool(self.probe_interval) and (kind == CONNECT or state.settings.check == "http")
        log.warning("backend %s ejected for %gs (ejection %d): %s%s", state.backend.address, duration,
                    state.ejections, reason, f"; probed every {self.probe_interval:g}s" if probing else "")
        if probing:
            self._schedule_probe(state)

    # ---- recovery probes: an ejected backend returns as soon as it answers --------------------------

    def _schedule_probe(self, state: HealthState) -> None:
        self.probes[state] = self.loop.call_later(self.probe_interval, self._start_probe, state)

    def _start_probe(self, state: HealthState) -> None:
        if not state.ejected:
            self.probes.pop(state, None)
            return
        self.probes[state] = self.loop.create_task(self._probe(state))

    async def _probe(self, state: HealthState) -> None:
        """One probe of an ejected backend (its http check, or a connect): when it passes the ejection
        ends (through slow start, when set), else the next one is scheduled."""
        settings, backend = state.settings, state.backend
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
            self._schedule_probe(state)
            return
        self.probes.pop(state, None)
        if not state.ejected:
            return
        self._end_ejection(state)
        self._refresh(state)
        log.info("backend %s back from ejection: it answers again (%s probe)%s", backend.address, kind,
                 "" if state.checked_up else ", but its health checks still fail: stays down")

    def _ejection_over(self, state: HealthState) -> None:
        state.eject_handle = None
        self._end_ejection(state)
        self._refresh(state)
        log.info("backend %s back from ejection%s", state.backend.address,
                 "" if state.checked_up else " (its health checks still fail: stays down)")

    def _end_ejection(self, state: HealthState) -> None:
        probe = self.probes.pop(state, None)
        if probe is not None:
            probe.cancel()
        if state.eject_handle is not None:
            state.eject_handle.cancel()
            state.eject_handle = None
        state.ejected = False
        state.connect_failures = state.bad_responses = 0
        state.returned_at = self.loop.time()

    # ---- publishing: state and slow start -----------------------------------------------------------

    def _refresh(self, state: HealthState) -> None:
        """Recombines the sources and publishes the result; a backend that became available ramps up
        (slow start), one that stopped being available drops its ramp."""
        was_available = state.available
        state.state = state.effective_state()
        state.backend.publish_state(state.state)
        if state.available and not was_available:
            self._start_ramp(state)
        elif was_available and not state.available:
            self._stop_ramp(state)

    def _start_ramp(self, state: HealthState) -> None:
        slowstart = state.settings.slowstart
        if not slowstart or state.full_weight <= 1:
            return
        steps = max(1, min(SLOWSTART_STEPS, int(slowstart / MIN_RAMP_STEP)))
        self._ramp_step(state, 1, steps, slowstart / steps)

    def _ramp_step(self, state: HealthState, step: int, steps: int, step_time: float) -> None:
        state.ramp_handle = None
        state.backend.publish_weight(max(1, state.full_weight * step // steps))
        if step < steps:
            state.ramp_handle = self.loop.call_later(step_time, self._ramp_step, state, step + 1, steps,
                                                     step_time)
        else:
            log.debug("backend %s at full weight after slow start", state.backend.address)

    def _stop_ramp(self, state: HealthState) -> None:
        if state.ramp_handle is not None:
            state.ramp_handle.cancel()
            state.ramp_handle = None
        state.backend.publish_weight(state.full_weight)    # a down backend is not picked whatever its weight
