"""The worker's one sweep and the tcp path's idle timeout, in one process, on a clock the test moves
(fastlb/server/datapath.py Sweeper, fastlb/l4.py TcpPath.sweep), and the drain's wait on the paths
(drain_paths). Idle timeouts end to end, and draining, are in test_l4.py and test_workers.py."""
import asyncio
import heapq
import itertools

from fastlb.l4 import ListenerSettings, TcpPath
from fastlb.server.datapath import Sweeper, drain_paths


class ClockLoop:
    """An event loop's clock and timers only: `advance` fires the timers due, in order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list = []
        self.order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback):
        timer = Timer(self.now + delay, callback)
        heapq.heappush(self.timers, (timer.when, next(self.order), timer))
        return timer

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while self.timers and self.timers[0][0] <= end:
            when, _, timer = heapq.heappop(self.timers)
            self.now = when
            if not timer.cancelled:
                timer.callback()
        self.now = end


class Timer:
    def __init__(self, when: float, callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class CountingPath:
    def __init__(self, name: str, interval: float, fails: bool = False) -> None:
        self.name = name
        self.sweep_interval = interval
        self.fails = fails
        self.swept: list[float] = []

    def sweep(self, now: float) -> None:
        self.swept.append(now)
        if self.fails:
            raise RuntimeError("broken path")


def test_one_timer_sweeps_each_path_at_its_own_interval():
    loop = ClockLoop()
    fast, slow, unswept = CountingPath("fast", 0.1), CountingPath("slow", 0.3), CountingPath("none", 0.0)
    sweeper = Sweeper(loop, [fast, slow, unswept])
    sweeper.start()
    assert len(loop.timers) == 1                       # one timer, whatever the number of paths
    loop.advance(1.25)
    assert len(fast.swept) == 12
    assert len(slow.swept) == 4
    assert unswept.swept == []
    sweeper.stop()
    loop.advance(1.0)
    assert len(fast.swept) == 12                       # stopped: no more sweeps


def test_a_failing_path_does_not_stop_the_others(caplog):
    loop = ClockLoop()
    broken, fine = CountingPath("broken", 0.1, fails=True), CountingPath("fine", 0.1)
    sweeper = Sweeper(loop, [broken, fine])
    sweeper.start()
    loop.advance(0.55)
    assert len(broken.swept) == len(fine.swept) == 5
    assert "broken data path: sweep failed" in caplog.text


def test_no_path_to_sweep_no_timer():
    loop = ClockLoop()
    Sweeper(loop, [CountingPath("none", 0.0)]).start()
    assert loop.timers == []


class FakeSide:
    def __init__(self) -> None:
        self.active = False


class FakeClient:
    """What TcpPath.sweep reads of a ClientSide."""

    def __init__(self, started: float, connected: bool = True) -> None:
        self.active = False
        self.backend_side = FakeSide() if connected else None
        self.peer = object() if connected else None
        self.idle_since = 0.0
        self.started = started
        self.source = ("127.0.0.1", 1)
        self.closed = False

    def close(self) -> None:
        self.closed = True


def tcp_path(idle: float, *clients) -> TcpPath:
    path = TcpPath(ListenerSettings(None, None, header_timeout=1.0), None, None, idle)
    path.connections.update(clients)
    return path


def test_tcp_sweep_cuts_after_idle_timeout_from_the_last_activity_seen():
    client = FakeClient(started=10.0)
    path = tcp_path(5.0, client)
    assert path.sweep_interval == 0.5                  # a tenth of the idle timeout
    client.active = True
    path.sweep(20.0)                                   # activity seen: idle from now at the earliest
    assert not client.active and not client.closed
    path.sweep(24.9)
    assert not client.closed
    client.backend_side.active = True                  # the backend's bytes count as activity too
    path.sweep(25.0)
    assert not client.closed and not client.backend_side.active
    path.sweep(29.9)
    assert not client.closed
    path.sweep(30.0)
    assert client.closed


def test_tcp_sweep_silent_connection_is_idle_since_it_began():
    silent = FakeClient(started=10.0)
    connecting = FakeClient(started=10.0, connected=False)     # no backend yet: the connect timeout's
    path = tcp_path(5.0, silent, connecting)
    path.sweep(14.9)
    assert not silent.closed
    path.sweep(15.0)
    assert silent.closed
    path.sweep(100.0)
    assert not connecting.closed
    assert path.live == 2


def test_tcp_path_without_idle_timeout_asks_for_no_sweep():
    assert tcp_path(0.0).sweep_interval == 0.0


class DrainingPath:
    """A path with `live` connections that says when its last one ended, as a data path does."""

    def __init__(self, live: int) -> None:
        self.live = live
        self.on_idle = None

    def start_draining(self, on_idle) -> None:
        self.on_idle = on_idle

    def end_one(self) -> None:
        self.live -= 1
        if self.live == 0:
            self.on_idle()


def turns(loop, count: int = 5) -> None:
    for _ in range(count):
        loop.run_until_complete(asyncio.sleep(0))


def test_the_drain_ends_when_the_last_path_says_its_last_connection_ended():
    loop = asyncio.new_event_loop()
    try:
        first, second = DrainingPath(2), DrainingPath(1)
        drain = loop.create_task(drain_paths(loop, [first, second], 3600.0))
        turns(loop)
        assert first.on_idle is not None and second.on_idle is not None and not drain.done()
        first.end_one()
        first.end_one()                                # one path idle, the other still has one
        turns(loop)
        assert not drain.done()
        second.end_one()
        turns(loop)
        assert drain.done() and drain.result() == 0
    finally:
        loop.close()


def test_the_drain_gives_up_after_the_grace_period_with_what_is_left():
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(drain_paths(loop, [DrainingPath(0), DrainingPath(3)], 0.0)) == 3
        assert loop.run_until_complete(drain_paths(loop, [DrainingPath(0)], 3600.0)) == 0   # none to wait for
    finally:
        loop.close()
