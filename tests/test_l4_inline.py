"""The L4 tests again, with the C relay engine inline (FASTLB_RELAY_INLINE=1: run from the event loop's
thread, what a worker pinned to one CPU does) instead of in its own thread: each behaviour written once
in test_l4.py / test_workers.py (and the TCP parts of test_health.py / test_sticky.py)."""
import pytest

from test_l4 import *          # noqa: F401,F403  (collected again, under the fixture below)
from test_workers import (test_grace_period_cuts_connections_that_do_not_finish,   # noqa: F401
                          test_sigterm_drains_live_connections_then_exits)
from test_health import test_tcp_backend_killed_and_restarted_under_load_loses_no_connection  # noqa: F401
from test_sticky import test_source_stick_table_in_tcp_mode  # noqa: F401


@pytest.fixture(autouse=True)
def inline_relay(monkeypatch):
    monkeypatch.setenv("FASTLB_TEST_RELAY", "epoll")
    monkeypatch.setenv("FASTLB_RELAY_INLINE", "1")
