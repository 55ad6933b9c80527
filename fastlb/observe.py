"""Traffic accounting: per-backend counters, the latency histogram, and the access log.

Everything here runs once per connection (TCP) or once per request (HTTP), never per chunk:

- The relay does not count bytes. When a relayed connection ends, `Observer.tcp_closed` asks the kernel
  how many bytes each socket received (`TCP_INFO`: `tcpi_bytes_received`, one getsockopt per socket),
  so the per-chunk path stays exactly what it was.
- Counters are plain integers on each `Backend` (`Traffic`); the admin side turns them into Prometheus
  families at scrape time (see fastlb/admin.py), so no prometheus-client object is touched per
  connection.
- The access log formats each line in C into a buffer that a thread of its own writes
  (fastlb/_accesslog.pyx: the event loop never waits for the disk; the HTTP engine logs through the
  same writer). Not built: the reference below keeps a tuple per entry and formats the batch on a
  timer (every `ACCESS_LOG_FLUSH` seconds, or at `ACCESS_LOG_BATCH` entries) with one write().

HTTP mode hook: call `observer.http_request(...)` once per finished request (see its docstring). When
neither metrics nor an access log is configured the listener has no observer and nothing runs.
"""
from __future__ import annotations

import asyncio
import bisect
import ctypes
import json
import os
import socket
import struct
import sys
import time
from typing import Any, Callable, Protocol

# Latency buckets (seconds), upper bounds; a last implicit +Inf bucket. From 0.5 ms (a loopback connect)
# to 10 s (a slow backend response).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")

ACCESS_LOG_FLUSH = 0.5        # seconds between two writes of the access log buffer
ACCESS_LOG_BATCH = 4096       # entries that make it write at once

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked and tcpi_bytes_received are two u64 at offset 120.
_TCP_INFO_LENGTH = 144
_BYTES_OFFSET = 120
_bytes = struct.Struct("=QQ")


def sum_counts(views: list[dict[str, Any]]) -> dict[str, Any]:
    """Counters of several sources (a worker's HTTP engines, the workers' reports) added up, key by key,
    nested dicts included (the HTTP engine's hand-overs by reason)."""
    total: dict[str, Any] = {}
    for view in views:
        for key, value in view.items():
            if isinstance(value, dict):
                total[key] = sum_counts([total.get(key, {}), value])
            else:
                total[key] = total.get(key, 0) + value
    return total


class Histogram:
    """Counts per bucket (not cumulative: the exposition adds them up) and the sum of observations."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds


class Counted(Protocol):
    """What the counters need of a backend (fastlb.pool.Backend: the pool imports this module, not the
    other way round)."""

    address: str
    traffic: "Traffic"


class Traffic:
    """One backend's counters in one worker, since the worker started."""

    __slots__ = ("connections", "requests", "responses", "bytes_in", "bytes_out", "connect_errors",
                 "retries", "connect_time", "response_time")

    def __init__(self) -> None:
        self.connections = 0          # relayed connections that reached the backend (and ended)
        self.requests = 0             # HTTP requests answered through it (HTTP mode)
        self.responses = [0] * 5      # by status class 1xx..5xx (HTTP mode)
        self.bytes_in = 0             # from clients to the backend
        self.bytes_out = 0            # from the backend to clients
        self.connect_errors = 0       # failed connect attempts
        self.retries = 0              # attempts on it that were a retry after another backend failed
        self.connect_time = Histogram()
        self.response_time = Histogram()    # HTTP mode: request sent -> response head received

    def snapshot(self) -> dict[str, Any]:
        return {"connections": self.connections, "requests": self.requests,
                "responses": list(self.responses), "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "connect_errors": self.connect_errors, "retries": self.retries,
                "connect_time": [list(self.connect_time.counts), self.connect_time.sum],
                "response_time": [list(self.response_time.counts), self.response_time.sum]}


def _libc_getsockopt():
    """libc's getsockopt through ctypes with one reused buffer: uvloop's PseudoSocket.getsockopt costs
    ~7.5 us a call here, this ~1.5 us."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.getsockopt
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                         ctypes.POINTER(ctypes.c_uint32)]
    function.restype = ctypes.c_int
    return function


try:
    from fastlb._sockinfo import tcp_bytes      # compiled: ~1 us a call
    _getsockopt = None
except ImportError:                              # not built: ctypes, ~3 us
    tcp_bytes = None
    _getsockopt = _libc_getsockopt()
try:
    from fastlb._accesslog import LogWriter      # compiled: lines formatted in C, written by a thread
except ImportError:
    LogWriter = None
_info = ctypes.create_string_buffer(_TCP_INFO_LENGTH)
_info_length = ctypes.c_uint32(_TCP_INFO_LENGTH)
_info_length_ref = ctypes.byref(_info_length)


def socket_bytes(transport) -> tuple[int, int] | None:
    """(bytes acked by the peer, bytes received from it) for a transport's open TCP socket, else None."""
    if transport is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    if tcp_bytes is not None:
        return tcp_bytes(sock.fileno())
    if _getsockopt is not None:
        _info_length.value = _TCP_INFO_LENGTH
        if _getsockopt(sock.fileno(), socket.IPPROTO_TCP, socket.TCP_INFO, _info, _info_length_ref) != 0 \
                or _info_length.value < _BYTES_OFFSET + 16:
            return None
        return _bytes.unpack_from(_info, _BYTES_OFFSET)
    try:
        return _bytes.unpack_from(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LENGTH),
                                  _BYTES_OFFSET)
    except (OSError, AttributeError, struct.error):
        return None


class AccessLog:
    """Buffered access log. `add()` takes an entry tuple: with fastlb._accesslog built, its LogWriter
    formats the line at once (in C) and its thread writes it; else `add()` keeps the tuple and the flush
    timer formats and writes the batch with `_format_text` / `_format_json` (the reference the C
    formatter matches byte for byte).

    text:  `TIME CLIENT POOL BACKEND STATUS BYTES_IN BYTES_OUT CONNECT_MS TOTAL_MS [METHOD TARGET]`
    json:  one object per line with the same fields."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: str, fmt: str, *, reference: bool = False) -> None:
        """reference: the Python formatter even when the C writer is built (tests compare the two)."""
        self.loop = loop
        self.fmt = fmt
        self.writer = LogWriter(path, fmt) if LogWriter is not None and not reference else None
        if self.writer is not None:
            self.add = self.writer.add            # one C call per entry, no Python frame of ours
            return
        self.fd = 1 if path == "-" else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.owns_fd = path != "-"
        self.entries: list[tuple] = []
        self.handle: asyncio.TimerHandle | None = None
        self.stamp_second = -1
        self.stamp_prefix = ""

    def add(self, entry: tuple) -> None:
        self.entries.append(entry)
        if len(self.entries) >= ACCESS_LOG_BATCH:
            self.flush()
        elif self.handle is None:
            self.handle = self.loop.call_later(ACCESS_LOG_FLUSH, self.flush)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            return
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        entries, self.entries = self.entries, []
        if not entries:
            return
        data = "".join(map(self._format_json if self.fmt == "json" else self._format_text, entries)).encode()
        try:
            # One write per batch: with O_APPEND the batch lands whole even when several workers share
            # the file. Blocking, but once per batch (a regular file or a terminal).
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as exc:
            print(f"fastlb: access log write failed: {exc}", file=sys.stderr)

    def _timestamp(self, wall: float) -> str:
        """ISO 8601 UTC with milliseconds; strftime once per second, not once per entry."""
        second = int(wall)
        if second != self.stamp_second:
            self.stamp_second = second
            self.stamp_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.stamp_prefix}.{int((wall - second) * 1000):03d}Z"

    def _format_text(self, entry: tuple) -> str:
        (wall, client, pool, backend, status, bytes_in, bytes_out, connect_seconds, total_seconds,
         method, target) = entry
        line = "%s %s %s %s %s %d %d %.3f %.3f" % (
            self._timestamp(wall), client, pool, backend, status, bytes_in, bytes_out,
            connect_seconds * 1000, total_seconds * 1000)
        if method is not None:
            line += f" {method} {json.dumps(target)}"     # quoted and escaped: a target is client input
        return line + "\n"

    def _format_json(self, entry: tuple) -> str:
        (wall, client, pool, backend, status, bytes_in, bytes_out, connect_seconds, total_seconds,
         method, target) = entry
        # By hand (json.dumps of a dict costs ~2x): every field is a number or fastlb's own ASCII text,
        # except status, method and target, which go through json.dumps.
        line = ('{"time":"%s","client":"%s","pool":"%s","backend":"%s","status":%s,"bytes_in":%d,'
                '"bytes_out":%d,"connect_ms":%.3f,"total_ms":%.3f' % (
                    self._timestamp(wall), client, pool, backend, json.dumps(status), bytes_in, bytes_out,
                    connect_seconds * 1000, total_seconds * 1000))
        if method is not None:
            line += f',"method":{json.dumps(method)},"target":{json.dumps(target)}'
        return line + "}\n"

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            return
        self.flush()
        if self.owns_fd:
            os.close(self.fd)


def _client_text(source) -> str:
    if not source:
        return "-"
    host, port = source[0], source[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Observer:
    """What the listeners call when a connection or request ends. Exists only when metrics (the admin
    bind) or an access log is configured."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool_name: str = "default",
                 access_log: AccessLog | None = None) -> None:
        self.loop = loop
        self.pool_name = pool_name
        self.access_log = access_log
        self.refused: dict[str, int] = {}    # pool name -> clients (TCP) or requests (HTTP: 503) no backend took
        # monotonic -> wall clock, for access-log timestamps without a time.time() call per entry.
        # (Timings use time.monotonic(), not loop.time(): uvloop's clock moves in milliseconds.)
        self.wall_offset = time.time() - time.monotonic()
        # What counts requests elsewhere (the HTTP engine's Engine.flush_counts): adds them to the
        # backends' Traffic before a read (collect()).
        self.collectors: list[Callable[[], None]] = []

    def collect(self) -> None:
        for flush in self.collectors:
            flush()

    def tcp_closed(self, client, gone: str | None) -> None:
        """A relayed connection ends. `gone`: which socket is already closed ("client", "backend", or
        None when both are open). Byte counts come from TCP_INFO of the sockets still open."""
        if client.backend is None:
            return
        bytes_in = bytes_out = 0
        backend_side = client.peer if gone != "backend" else None
        client_side = client.transport if gone != "client" else None
        from_client = socket_bytes(client_side)
        from_backend = socket_bytes(backend_side)
        # A received FIN counts one in tcpi_bytes_received, and an acked SYN or FIN one in
        # tcpi_bytes_acked: `eofs` says which FINs went by.
        client_fin = client.eofs & 1
        backend_fin = client.eofs >> 1 & 1
        if from_client is not None:
            bytes_in = from_client[1] - client_fin
        elif from_backend is not None:
            bytes_in = max(0, from_backend[0] - 1 - client_fin)       # acked by the backend, less our SYN
        if from_backend is not None:
            bytes_out = from_backend[1] - backend_fin
        elif from_client is not None:
            bytes_out = max(0, from_client[0] - backend_fin) + client.transport.get_write_buffer_size()
        self.tcp_counted(client, bytes_in, bytes_out)

    def tcp_counted(self, client, bytes_in: int, bytes_out: int) -> None:
        """A relayed connection ends with these byte counts (`--relay epoll` counts them itself)."""
        backend: Counted | None = client.backend
        if backend is None:
            return
        traffic = backend.traffic
        traffic.connections += 1
        traffic.bytes_in += bytes_in
        traffic.bytes_out += bytes_out
        if self.access_log is not None:
            now = time.monotonic()
            self.access_log.add((self.wall_offset + client.started, _client_text(client.source),
                                 self.pool_name, backend.address, "-", bytes_in, bytes_out,
                                 client.connect_seconds, now - client.started, None, None))

    def tcp_refused(self, client, reason: str) -> None:
        self.refused[self.pool_name] = self.refused.get(self.pool_name, 0) + 1
        if self.access_log is not None:
            now = time.monotonic()
            self.access_log.add((self.wall_offset + client.started, _client_text(client.source),
                                 self.pool_name, "-", reason, 0, 0, 0.0, now - client.started, None, None))

    def http_request(self, backend: Counted | None, client_address: str, method: str, target: str,
                     status: int, bytes_in: int, bytes_out: int, started: float,
                     connect_seconds: float, response_seconds: float | None, pool: str | None = None) -> None:
        """The HTTP mode's hook: one call per finished request (status sent to the client, or 0 when the
        client left first). `started`: when the request head began to arrive, on the time.monotonic()
        clock (uvloop's loop.time() is that clock in milliseconds); response_seconds: request sent ->
        response head received (None when no backend answered); pool: the routed pool's name (None
        when the request was refused before routing). Counts, histogram and access-log entry;
        formatting happens later, in the access log's flush. A 503 without a backend counts as
        refused for its pool."""
        if backend is not None:
            self.count_request(backend, status, bytes_in, bytes_out, response_seconds)
        elif status == 503 and pool is not None:
            self.count_refused(pool)
        if self.access_log is not None:
            now = time.monotonic()
            self.access_log.add((self.wall_offset + started, client_address, pool or "-",
                                 backend.address if backend is not None else "-", status, bytes_in,
                                 bytes_out, connect_seconds, now - started, method, target))

    def count_refused(self, pool: str) -> None:
        """A request of the pool got 503 without a backend (http_request's part; the HTTP engine logs
        the request itself)."""
        self.refused[pool] = self.refused.get(pool, 0) + 1

    @staticmethod
    def count_request(backend: Counted, status: int, bytes_in: int, bytes_out: int,
                      response_seconds: float | None) -> None:
        """A request answered through backend, in its counters (http_request's part; the HTTP engine
        calls it alone, and writes its access-log line itself)."""
        traffic = backend.traffic
        traffic.requests += 1
        if 100 <= status < 600:
            traffic.responses[status // 100 - 1] += 1
        traffic.bytes_in += bytes_in
        traffic.bytes_out += bytes_out
        if response_seconds is not None:
            traffic.response_time.observe(response_seconds)

    def close(self) -> None:
        if self.access_log is not None:
            self.access_log.close()


def pool_snapshot(name: str, pool: Any, observer: Observer | None,
                  sent: dict[str, tuple] | None = None) -> dict[str, Any]:
    """One worker's view of one pool (a fastlb.pool.BackendPool), JSON-ready: what the admin side
    aggregates over workers. sent (address -> what was last sent of it): only the backends that changed
    since are listed, so a snapshot of thousands of idle backends costs a pass over them, not their
    encoding and decoding."""
    if observer is not None:
        observer.collect()
    backends = []
    for backend in pool.backends:
        health = backend.health
        if sent is not None:
            traffic = backend.traffic
            mark = (traffic.connections, traffic.requests, traffic.connect_errors, traffic.bytes_in,
                    traffic.bytes_out, backend.inflight, backend.state, health.admin_state,
                    health.checked_up, health.ejected, health.full_weight, backend.is_backup)
            if sent.get(backend.address) == mark:
                continue
            sent[backend.address] = mark
        core = backend.balancer.stats(backend.index)
        backends.append({
            "address": backend.address, "backup": backend.is_backup, "state": backend.state,
            "admin_state": health.admin_state, "checked_up": health.checked_up,
            "ejected": health.ejected, "weight": health.full_weight // pool.weight_scale,
            "effective_weight": core["weight"], "inflight": backend.inflight, "picks": core["picks"],
            "failures": core["failures"], "ewma": core["ewma"], "traffic": backend.traffic.snapshot()})
    return {"pool": name, "active": pool.active, "queued": len(pool.waiters),
            "refused": observer.refused.get(name, 0) if observer is not None else 0, "backends": backends}
