"""Health logic in one process: rise/fall counting, ejection growth and caps, slow start, state
composition, and the health settings' validation. End-to-end behaviour is in test_health.py."""
import asyncio
import textwrap

import pytest

from fastlb.cli import config_from_args
from fastlb.config import ConfigError
from fastlb.health import CONNECT, RESPONSE, CheckTarget, HealthChecker, check_targets
from fastlb.pool import BackendPool


def make_config(*flags, backends=3):
    argv = ["--bind", "127.0.0.1:1"]
    for i in range(backends):
        argv += ["--backend", f"127.0.0.1:{10001 + i}"]
    return config_from_args([*argv, *flags])[1]


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def run_until(loop, condition, timeout=5.0):
    """Runs the loop until condition() holds (bounded), returning what it saw at each turn."""
    async def poll():
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.01)
    loop.run_until_complete(poll())


# ---- rise / fall ---------------------------------------------------------------------------------

def checker_with(loop, rise, fall):
    config = make_config("--check", "tcp", "--rise", str(rise), "--fall", str(fall), backends=1)
    flips = []
    checker = HealthChecker(loop, check_targets(config), lambda i, up, why: flips.append((up, why)))
    return checker, checker.checks[0], flips


def test_a_first_failed_check_takes_a_backend_down_at_once(loop):
    checker, check, flips = checker_with(loop, rise=2, fall=3)
    checker._result(check, "connection refused")
    assert flips == [(False, "first check failed (connection refused)")]


def test_state_flips_only_after_rise_or_fall_results_in_a_row(loop):
    checker, check, flips = checker_with(loop, rise=2, fall=3)
    checker._result(check, None)                      # up and passing
    for outcome in ("refused", "refused", None, "refused", "refused"):
        checker._result(check, outcome)
    assert flips == []                                # never 3 failures in a row
    checker._result(check, "timeout after 1s")
    assert flips == [(False, "3 consecutive check failures (timeout after 1s)")]
    for outcome in (None, "refused", None):
        checker._result(check, outcome)
    assert len(flips) == 1                            # never 2 passes in a row
    checker._result(check, None)
    assert flips[-1] == (True, "2 consecutive checks passed")
    assert checker.states == {0: True}


def test_check_targets_use_the_check_port_and_per_backend_overrides():
    config = config_from_args(["--bind", "127.0.0.1:1", "--check", "tcp",
                               "--backend", "127.0.0.1:10001,check-port=9000,rise=5",
                               "--backend", "127.0.0.1:10002,check=none"])[1]
    [target] = check_targets(config)
    assert (target.index, target.port, target.settings.rise, target.settings.fall) == (0, 9000, 5, 3)
    assert isinstance(target, CheckTarget)


# ---- passive ejection ----------------------------------------------------------------------------

def test_ejections_grow_and_are_capped(loop):
    config = make_config("--outlier-failures", "2", "--outlier-ejection-time", "0.05s",
                         "--outlier-max-ejection-time", "0.1s", "--max-ejection-percent", "50", backends=4)
    pool = BackendPool(config, loop, 100)
    a, b, c, _ = (backend.health for backend in pool.primaries)
    pool.health.record(a, False, CONNECT, "connection refused")
    assert not a.ejected                                      # one failure is not a streak
    pool.health.record(a, False, CONNECT, "connection refused")
    assert a.ejected and pool.primary.stats(a.backend.index)["state"] == "down"
    assert a.eject_handle.when() - loop.time() == pytest.approx(0.05, abs=0.02)
    for _ in range(2):                                        # 50 % of 4 is 2: b yes, c no
        pool.health.record(b, False, CONNECT, "refused")
        pool.health.record(c, False, CONNECT, "refused")
    assert b.ejected and not c.ejected
    run_until(loop, lambda: not a.ejected)
    assert pool.primary.stats(a.backend.index)["state"] == "up"
    for _ in range(2):
        pool.health.record(a, False, CONNECT, "refused")
    assert a.ejected and a.ejections == 2
    assert a.eject_handle.when() - loop.time() == pytest.approx(0.1, abs=0.02)   # 2 x 0.05, capped at 0.1
    pool.close()
    assert a.eject_handle is None and b.eject_handle is None


def test_a_good_connect_does_not_reset_a_streak_of_bad_responses(loop):
    pool = BackendPool(make_config("--outlier-failures", "3"), loop, 100)
    a = pool.primaries[0].health
    for _ in range(2):
        pool.health.record(a, False, RESPONSE, "HTTP 503")
        pool.health.record(a, True, CONNECT)
    pool.health.record(a, False, RESPONSE, "HTTP 503")
    assert a.ejected
    pool.close()


def test_a_passing_health_check_ends_an_ejection(loop):
    pool = BackendPool(make_config("--outlier-failures", "1"), loop, 100)
    a = pool.primaries[0].health
    pool.health.record(a, False, CONNECT, "refused")
    pool.health.set_checked(a, False, "check failed")
    pool.health.set_checked(a, True, "check passed")
    assert not a.ejected and a.eject_handle is None and a.available
    pool.close()


# ---- state composition and slow start ------------------------------------------------------------

def test_drain_and_health_combine(loop):
    pool = BackendPool(make_config(), loop, 100)
    a = pool.primaries[0]
    pool.health.set_admin_state(a.health, "drain")
    pool.health.set_checked(a.health, False, "down")
    assert pool.primary.stats(a.index)["state"] == "down" and a.state == "down"
    pool.health.set_checked(a.health, True, "up")
    assert pool.primary.stats(a.index)["state"] == "drain"     # the operator's drain still holds
    pool.health.set_admin_state(a.health, "up")
    assert pool.primary.stats(a.index)["state"] == "up" and a.state == "up"
    with pytest.raises(ValueError):
        pool.health.set_admin_state(a.health, "down")          # health's to decide, not the operator's


def test_slow_start_ramps_the_weight_in_a_few_steps(loop):
    pool = BackendPool(make_config("--slowstart", "0.3s"), loop, 100)
    a = pool.primaries[0].health
    assert pool.weight_scale == 16 and a.full_weight == 16
    assert pool.primary.stats(a.backend.index)["weight"] == 16          # no ramp at start-up
    pool.health.set_checked(a, False, "down")
    pool.health.set_checked(a, True, "up")
    seen = []

    def weight_now():
        weight = pool.primary.stats(a.backend.index)["weight"]
        if not seen or seen[-1] != weight:
            seen.append(weight)
        return weight == 16
    run_until(loop, weight_now)
    assert seen[0] < 16 and seen == sorted(seen) and 2 <= len(seen) <= 10
    assert a.ramp_handle is None
    pool.close()


def test_going_down_during_slow_start_stops_the_ramp(loop):
    pool = BackendPool(make_config("--slowstart", "5s"), loop, 100)
    a = pool.primaries[0].health
    pool.health.set_checked(a, False, "down")
    pool.health.set_checked(a, True, "up")
    assert a.ramp_handle is not None
    pool.health.set_checked(a, False, "down again")
    assert a.ramp_handle is None
    pool.close()


# ---- settings ------------------------------------------------------------------------------------

def test_health_settings_from_the_file_and_per_backend(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text(textwrap.dedent("""\
        bind = "127.0.0.1:1"
        check = "http"
        check_path = "/health"
        check_expect = "200-299"
        rise = 3
        slowstart = "10s"

        [[backend]]
        address = "127.0.0.1:2"

        [[backend]]
        address = "127.0.0.1:3"
        check_port = 8081
        check_body = "OK"
        fall = 5
        """))
    config = config_from_args(["--config", str(path)])[1]
    first, second = (config.health_for(b) for b in config.backends)
    assert (first.check, first.check_path, first.check_expect, first.rise, first.fall) == \
        ("http", "/health", (200, 299), 3, 3)
    assert (second.check_port, second.check_body, second.fall, second.slowstart) == (8081, "OK", 5, 10.0)


@pytest.mark.parametrize("text,expected", [
    ('[[backend]]\naddress = "127.0.0.1:2"\nrise = 0\n', "lb.toml:3: backend[1].rise: expected an integer >= 1"),
    ('check = "ping"\nbackend = "127.0.0.1:2"\n', "lb.toml:1: check: unknown check 'ping'"),
    ('check_expect = "2xx"\nbackend = "127.0.0.1:2"\n', "lb.toml:1: check_expect: expected an HTTP status"),
    ('max_ejection_percent = 150\nbackend = "127.0.0.1:2"\n', "lb.toml:1: max_ejection_percent: expected a "
                                                             "percentage"),
    ('check = "tcp"\n[[backend]]\naddress = "127.0.0.1:2"\ncheck_path = "/x"\n',
     "lb.toml:4: backend[1].check_path: applies to HTTP checks only; the check of 127.0.0.1:2 is 'tcp'"),
    ('algorithm = "maglev"\nslowstart = 5\nbackend = "127.0.0.1:2"\n', "lb.toml:2 (slowstart): slow start ramps"),
])
def test_bad_health_settings_name_file_line_and_field(tmp_path, text, expected):
    path = tmp_path / "lb.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config_from_args(["--config", str(path), "--bind", "127.0.0.1:1"])
    assert str(info.value).startswith(f"{tmp_path}/{expected}")


@pytest.mark.parametrize("flags,expected", [
    (["--check-path", "/x"], "--check-path: applies to HTTP checks only"),
    (["--check", "http", "--check-path", "no-slash"], None),
    (["--outlier-ejection-time", "10s", "--outlier-max-ejection-time", "1s"],
     "--outlier-max-ejection-time: must be >= outlier-ejection-time"),
])
def test_bad_health_flags_name_the_flag(flags, expected, capsys):
    if expected is None:
        with pytest.raises(SystemExit):
            make_config(*flags)
        assert "argument --check-path: expected a path starting with '/'" in capsys.readouterr().err
        return
    with pytest.raises(ConfigError) as info:
        make_config(*flags)
    assert str(info.value).startswith(expected)
