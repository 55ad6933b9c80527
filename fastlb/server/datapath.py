"""The data paths of a worker, the one shape they share, and the one sweep that serves them all.

A data path accepts client connections on the binds it serves and carries them to the backends:
- `TcpPath` (fastlb/l4.py): tcp mode on the event loop, uvloop protocols relaying in compiled code;
- `EpollRelay` (fastlb/l4.py over fastlb/_crelay.pyx): `--relay epoll`, the C relay engine, in a thread
  of its own or inline in the event loop's; it takes the tcp path's established plaintext connections
  and terminates the TLS binds it can;
- `HttpRuntime` (fastlb/http/runtime.py): HTTP mode, the C engine on the binds it can serve and the
  Python path on the others (HTTP/2 connections will be its connections too).
The worker holds a list of them (`build_paths`) and knows nothing of their insides: it gives each bind
to the first path that `serves` it, starts them, sweeps them with one timer (`Sweeper`) and drains them.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from fastlb.l4 import EpollRelay, ListenerSettings, TcpPath

if TYPE_CHECKING:
    from fastlb.config import BindSpec
    from fastlb.server.worker import Worker

log = logging.getLogger("fastlb")


class DataPath(Protocol):
    name: str
    # Seconds between two calls of `sweep` (0.0: it needs none); read by the Sweeper once the path started.
    sweep_interval: float

    def serves(self, bind: BindSpec, tls) -> bool:
        """Whether this path accepts on the bind (tls: its ServerTLS or None). Asked in the order of
        the worker's paths: the first that says yes gets it."""

    def add_bind(self, bind: BindSpec, sock, tls) -> None:
        """The bind's listening socket is this path's; accepting begins with `start`."""

    async def start(self) -> None:
        """Begins accepting on its binds."""

    def stop_accepting(self) -> None:
        """Accepts no more (drain); its listening sockets close."""

    def start_draining(self) -> None:
        """Keep-alive ends: responses say close, idle clients are closed."""

    @property
    def live(self) -> int:
        """Client connections open on this path."""

    def close_all(self) -> None:
        """The grace period is over: cuts what is left."""

    def sweep(self, now: float) -> None:
        """Called by the worker's one sweep timer (`Sweeper`), about every `sweep_interval` seconds:
        timeouts, idle connections. now: the loop's clock."""

    def stop(self) -> None:
        """Releases everything (after the drain)."""


def build_router(worker: Worker):
    """HTTP mode: the worker's pools and rules (fastlb/http/runtime.py build_router), which its admission
    table, controller and snapshots name pools by; tcp mode: None."""
    config = worker.config
    if config.mode != "http":
        return None
    from fastlb.http.runtime import build_router as http_router
    return http_router(config, worker.loop, worker.maxconn, worker.pool, worker.store)


def build_paths(worker: Worker) -> list[DataPath]:
    """The data paths of the worker's mode, in the order they are offered each bind. HTTP mode: the
    HTTP path. tcp mode: the relay thread first (`--relay epoll`: it takes the TLS binds it can
    terminate), then the event loop's tcp path (every other bind)."""
    config, loop = worker.config, worker.loop
    if config.mode == "http":
        from fastlb.http.runtime import HttpRuntime
        http = HttpRuntime(config, loop, worker.router, worker.observer, worker.accept_gate)
        if worker.admission is not None:
            http.use_admission(worker.admission)
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


class Sweeper:
    """The worker's one periodic timer: calls each data path's `sweep(now)` at that path's own interval.

    One loop timer at the shortest interval; a path with a longer one is swept when due. The intervals
    are read at `start`, once the paths listen (the relay engine's depends on its TLS binds). The relay
    thread (not inline) sweeps its own connections in its thread, at the interval its path was built with
    (`fastlb.l4.idle_sweep_interval`, the tcp path's); its path asks for no sweep here."""

    def __init__(self, loop: asyncio.AbstractEventLoop, paths: list[DataPath]) -> None:
        self.loop = loop
        self.paths = paths
        self.due: list[list] = []            # [path, interval, next due time]
        self.interval = 0.0
        self.handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        now = self.loop.time()
        self.due = [[path, path.sweep_interval, now + path.sweep_interval]
                    for path in self.paths if path.sweep_interval > 0]
        if self.due:
            self.interval = min(interval for _, interval, _ in self.due)
            self.handle = self.loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        now = self.loop.time()
        # (half an interval of slack: the loop's timers have millisecond resolution)
        soon = now + self.interval / 2
        for entry in self.due:
            if entry[2] <= soon:
                entry[2] = now + entry[1]
                try:
                    entry[0].sweep(now)
                except Exception:             # one path's failure must not stop the others' timeouts
                    log.exception("%s data path: sweep failed", entry[0].name)
        self.handle = self.loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
