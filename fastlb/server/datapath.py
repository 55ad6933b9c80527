"""The data paths of a worker, the one shape they share, and the one sweep that serves them all.

A data path accepts client connections on the binds it serves and carries them to the backends:
- `TcpPath` (fastlb/l4.py): tcp mode on the event loop, uvloop protocols relaying in compiled code;
- `EpollRelay` (fastlb/l4.py over fastlb/_crelay.pyx): `--relay epoll`, the C relay engine, in a thread
  of its own or inline in the event loop's; it takes the tcp path's established plaintext connections
  and terminates the TLS binds it can;
- `HttpPath` (fastlb/http/datapath.py): HTTP mode, the C engine on the binds it can serve and the
  Python path on the others (HTTP/2 connections are its connections too).
The worker holds a list of them (fastlb/server/worker.py `build_paths`) and knows nothing of their
insides: it gives each bind to the first path that `serves` it, starts them, sweeps them with one timer
(`Sweeper`) and drains them.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from fastlb.config import BindSpec

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

    def start_draining(self, on_idle: Callable[[], None]) -> None:
        """Keep-alive ends: responses say close, idle clients are closed. From now on the path calls
        on_idle (on the event loop) when its live count falls to 0: the worker's drain waits on that,
        not on a poll."""

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


async def drain_paths(loop: asyncio.AbstractEventLoop, paths: list[DataPath], grace_period: float) -> int:
    """Every path starts draining; returns once no connection is live on any, or when grace_period is
    over: how many are left then. Woken by the paths (`start_draining`'s on_idle), not by a poll."""
    drained = asyncio.Event()

    def live() -> int:
        return sum([path.live for path in paths])

    def check() -> None:
        if not live():
            drained.set()

    def path_idle() -> None:
        # A path's count reached 0; every path's is looked at once the code that said so has returned (a
        # connection moving between two parts of one path, engine to Python, is counted again by then).
        loop.call_soon(check)

    for path in paths:
        path.start_draining(path_idle)
    if live():
        log.info("draining %d connection(s), grace period %.3gs", live(), grace_period)
        try:
            await asyncio.wait_for(drained.wait(), grace_period)
        except asyncio.TimeoutError:
            pass
    return live()


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
