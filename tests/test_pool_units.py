"""The pool in one process, no sockets: the connect loop (candidates, not winners), the wait queue and
its timeout, slot accounting, and the outcome methods every data path reports to (connect_worked,
connect_attempt_failed, response_done). `loop.create_connection` is a fake network (tests/fakes.py) whose
answer per backend port the test sets. End-to-end behaviour is in test_l4.py, test_pools.py and test_http.py."""
import asyncio
import errno
import ssl

import pytest

from fastlb.cli import config_from_args
from fastlb.pool import BackendPool, NoBackendError, QueueError
from fakes import HANG, FakeNetwork, FakeTransport

PORTS = (10001, 10002, 10003)


def make_pool(loop, *flags, maxconn=100, backends=PORTS):
    argv = ["--bind", "127.0.0.1:1"]
    for backend in backends:
        argv += ["--backend", backend if isinstance(backend, str) else f"127.0.0.1:{backend}"]
    return BackendPool(config_from_args([*argv, *flags])[1], loop, maxconn)


class Protocol(asyncio.Protocol):
    transport = None

    def connection_made(self, transport):
        self.transport = transport


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def network(loop):
    return FakeNetwork(loop)


def connect(pool, key=None, **options):
    return pool.connect(key, Protocol, **options)


def core_state(pool, backend):
    return backend.balancer.stats(backend.index)["state"]


def slots(pool):
    """Slots taken: the pool's count and each backend's."""
    return pool.active, [b.inflight for b in pool.backends]


# ---- the connect loop ----------------------------------------------------------------------------

def test_a_refused_connect_goes_to_the_next_candidate_and_counts_against_the_first(loop, network):
    pool = make_pool(loop, "--algorithm", "roundrobin", "--outlier-failures", "5")
    first = pool.primaries[0]
    network.answers[first.port] = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    refused_before = pool.primary.stats(first.index)["failures"]
    backend, transport, protocol = loop.run_until_complete(connect(pool))
    assert network.attempts == [first.port, backend.port] and backend is not first
    assert isinstance(transport, FakeTransport) and protocol.transport is transport
    # The slot taken is the winner's; the failed attempt gave its slot back and counts against it.
    assert slots(pool) == (1, [1 if b is backend else 0 for b in pool.backends])
    assert first.traffic.connect_errors == 1 and first.health.connect_failures == 1
    assert pool.primary.stats(first.index)["failures"] == refused_before + 1
    assert backend.traffic.retries == 1 and backend.traffic.connect_errors == 0
    pool.release(backend)
    assert slots(pool) == (0, [0, 0, 0])


def test_the_loop_stops_after_retries_plus_one_attempts_leaving_no_slot(loop, network):
    pool = make_pool(loop, "--retries", "1")
    for port in PORTS:
        network.answers[port] = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    with pytest.raises(NoBackendError, match="connect failed to 2 backend"):
        loop.run_until_complete(connect(pool))
    assert len(network.attempts) == 2 and len(set(network.attempts)) == 2    # each candidate once
    assert slots(pool) == (0, [0, 0, 0])


def test_backends_tried_by_the_request_are_avoided_and_counted(loop, network):
    pool = make_pool(loop, "--retries", "2")
    a, b, c = pool.primaries
    backend, _, _ = loop.run_until_complete(connect(pool, tried=[a, b]))
    assert backend is c and network.attempts == [c.port]
    pool.release(backend)
    with pytest.raises(NoBackendError):                  # every attempt used by the request already
        loop.run_until_complete(connect(pool, tried=[a, b, c]))
    assert slots(pool) == (0, [0, 0, 0])


def test_a_timed_out_connect_is_a_failed_attempt(loop, network):
    pool = make_pool(loop, "--connect-timeout", "50ms", "--algorithm", "roundrobin")
    first = pool.primaries[0]
    network.answers[first.port] = HANG
    backend, _, _ = loop.run_until_complete(connect(pool))
    assert backend is not first and first.traffic.connect_errors == 1
    assert slots(pool)[0] == 1


def test_fastlbs_own_resource_error_fails_at_once_and_counts_against_no_backend(loop, network):
    pool = make_pool(loop, "--algorithm", "roundrobin")
    first = pool.primaries[0]
    network.answers[first.port] = OSError(errno.EMFILE, "Too many open files")
    with pytest.raises(NoBackendError, match="out of resources"):
        loop.run_until_complete(connect(pool))
    assert network.attempts == [first.port]              # another backend would fail the same way
    assert first.traffic.connect_errors == 0 and first.health.connect_failures == 0
    assert pool.own_failures == 0 and pool.last_own_failure_warning > 0      # reported once, then reset
    assert slots(pool) == (0, [0, 0, 0])


def test_a_failed_tls_handshake_says_so_in_the_error_and_the_log(loop, network, caplog):
    pool = make_pool(loop, "--retries", "0", backends=["127.0.0.1:10001,ssl,verify=none"])
    error = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    error.reason, error.verify_message = "CERTIFICATE_VERIFY_FAILED", "self-signed certificate"  # as OpenSSL sets them
    network.answers[10001] = error
    with pytest.raises(NoBackendError) as info:
        loop.run_until_complete(connect(pool))
    assert info.value.tls_failure
    assert "TLS handshake with backend 127.0.0.1:10001 failed: self-signed certificate" in caplog.text
    assert slots(pool) == (0, [0])


def test_a_pinned_backend_is_preferred_until_it_fails(loop, network):
    pool = make_pool(loop, "--algorithm", "roundrobin")
    pinned = pool.primaries[2]
    for _ in range(3):
        backend, _, _ = loop.run_until_complete(connect(pool, pinned=pinned))
        assert backend is pinned
        pool.release(backend)
    network.answers[pinned.port] = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    backend, _, _ = loop.run_until_complete(connect(pool, pinned=pinned))
    assert backend is not pinned and network.attempts[-2:] == [pinned.port, backend.port]


def test_backups_take_connections_only_when_no_primary_can(loop, network):
    pool = make_pool(loop, "--retries", "3", backends=["127.0.0.1:10001", "127.0.0.1:10002,backup"])
    primary, backup = pool.primaries[0], pool.backups[0]
    backend, _, _ = loop.run_until_complete(connect(pool))
    assert backend is primary
    pool.release(backend)
    network.answers[primary.port] = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    backend, _, _ = loop.run_until_complete(connect(pool))
    assert backend is backup and network.attempts[-2:] == [primary.port, backup.port]


# ---- slots and the wait queue --------------------------------------------------------------------

def test_a_full_backend_is_drained_in_the_core_until_a_connection_ends(loop, network):
    pool = make_pool(loop, backends=["127.0.0.1:10001,maxconn=1", "127.0.0.1:10002"])
    limited = pool.primaries[0]
    taken = [pool.select_now(None, []) for _ in range(4)]
    assert taken.count(limited) == 1 and limited.full and core_state(pool, limited) == "drain"
    assert limited.state == "up"                           # health's state is not the slot count
    pool.release(limited)
    assert not limited.full and core_state(pool, limited) == "up"


def test_over_maxconn_a_connection_waits_and_gets_the_next_free_slot(loop, network):
    pool = make_pool(loop, "--queue-timeout", "5s", maxconn=1)
    first, _, _ = loop.run_until_complete(connect(pool))
    waiting = loop.create_task(connect(pool))
    loop.run_until_complete(asyncio.sleep(0))
    assert len(pool.waiters) == 1 and not waiting.done()
    assert pool.select_now(None, []) is None               # a newcomer does not jump the queue
    pool.release(first)
    second, _, _ = loop.run_until_complete(waiting)
    assert pool.active == 1 and not pool.waiters and pool.woken == 0
    pool.release(second)
    assert slots(pool) == (0, [0, 0, 0])


def test_the_queue_times_out_and_a_full_queue_refuses_at_once(loop, network):
    pool = make_pool(loop, "--queue-timeout", "50ms", "--queue-size", "1", maxconn=1)
    first, _, _ = loop.run_until_complete(connect(pool))
    waiting = loop.create_task(connect(pool))
    loop.run_until_complete(asyncio.sleep(0))
    with pytest.raises(QueueError, match="wait queue full"):
        loop.run_until_complete(connect(pool))
    with pytest.raises(QueueError, match="timed out"):
        loop.run_until_complete(waiting)
    assert not pool.waiters and pool.woken == 0 and pool.active == 1
    assert network.attempts == [first.port]                # neither waiter reached a backend


def test_a_woken_waiter_that_is_cancelled_passes_the_slot_on(loop, network):
    pool = make_pool(loop, "--queue-timeout", "5s", maxconn=1)
    first, _, _ = loop.run_until_complete(connect(pool))
    one = loop.create_task(connect(pool))
    two = loop.create_task(connect(pool))
    loop.run_until_complete(asyncio.sleep(0))
    pool.release(first)                                    # wakes `one` ...
    one.cancel()                                           # ... which leaves before it runs
    backend, _, _ = loop.run_until_complete(two)
    assert one.cancelled() and pool.active == 1 and pool.woken == 0 and not pool.waiters
    pool.release(backend)
    assert slots(pool) == (0, [0, 0, 0])


def test_an_idle_keep_alive_connection_is_reused_instead_of_connecting(loop, network):
    pool = make_pool(loop, maxconn=1, backends=PORTS[:1])
    backend = pool.primaries[0]
    parked, closed = Protocol(), Protocol()
    parked.connection_made(FakeTransport())
    closed.connection_made(FakeTransport())
    closed.transport.closed = True
    backend.idle.extend([parked, closed])                  # the newest first: closed, skipped
    got, transport, protocol = loop.run_until_complete(connect(pool))
    assert (got, transport, protocol) == (backend, parked.transport, parked)
    assert network.attempts == [] and not backend.idle and slots(pool) == (1, [1])


# ---- outcomes ------------------------------------------------------------------------------------

def test_response_done_gives_the_slot_back_and_bad_responses_eject(loop, network):
    pool = make_pool(loop, "--outlier-failures", "2", "--algorithm", "roundrobin")
    a = pool.primaries[0]

    def answer(ok, status):
        backend = pool.select_now(None, [], pinned=a)
        assert backend is a
        pool.response_done(a, 0.01, ok, status)

    answer(False, 503)
    assert a.health.bad_responses == 1 and slots(pool) == (0, [0, 0, 0])
    answer(True, 200)                                      # a good response ends the streak
    assert a.health.bad_responses == 0
    answer(False, 500)
    answer(False, 502)
    assert a.health.ejected and a.state == "down" and core_state(pool, a) == "down"
    assert slots(pool) == (0, [0, 0, 0])
    pool.close()


def test_connect_worked_resets_the_connect_streak_and_counts(loop, network):
    pool = make_pool(loop, "--outlier-failures", "3")
    a = pool.primaries[0]
    pool.track_latency = True
    tried = []
    for _ in range(2):
        pool._take(a)
        assert pool.connect_attempt_failed(a, ConnectionResetError(errno.ECONNRESET, "reset"), 0.001, tried)
    assert a.health.connect_failures == 2 and tried == [a, a] and not a.health.ejected
    pool._take(a)
    pool.connect_worked(a, 0.001, 0.0004, retried=True)
    assert a.health.connect_failures == 0 and a.traffic.retries == 1
    assert sum(a.traffic.connect_time.counts) == 1 and a.traffic.connect_time.sum == pytest.approx(0.0004)
    assert slots(pool)[0] == 1


def test_a_removed_backend_finishes_its_requests_without_a_core_slot(loop, network):
    pool = make_pool(loop)
    a = pool.primaries[0]
    pool._take(a)
    pool.remove_backend(a.address)
    assert a.removed and a not in pool.backends and a.health not in pool.health.groups[False]
    pool.response_done(a, 0.01, False, 502)                # no core slot to tell, no ejection timer
    assert slots(pool) == (0, [0, 0]) and a.health.eject_handle is None
