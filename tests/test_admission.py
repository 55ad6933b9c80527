"""Admission control (fastlb/admission.py, fastlb/_admission.pyx): rate limits per key, connections per
source, CIDR lists, the admin bind's allow list, runtime blocks, sharing through a real Redis.

In-process tests drive the C table with a given clock (exact counts). End-to-end tests run real fastlb
processes, HTTP and echo backends and redis-server on 127.0.0.0/8; their assertions count responses
(behaviour), with the tolerance of each explained where it is asserted. Load loops are bounded by a
request count.
"""
import json
import socket
import sys
import time
import urllib.request

import pytest

from http_client import Client, build
from procs import connect, free_port, read_line, replace_file, wait_until
from stores import start_redis

from fastlb._admission import Limiter
from fastlb.admission import KINDS, merge_views, ranges
from fastlb.config.admission import parse_rate_limit
from fastlb.cli import config_from_args
from fastlb.config import ConfigError

RATE, BURST = 50, 10                 # the limit: 50/s, burst 10
OFFERED, SECONDS = 200, 5.0          # offered: 200 requests/s for 5 s
OTHER_EVERY = 10                     # one request of another key per 10: 20/s, under the limit


def limiter(*rules, capacity=4096, max_conn=0):
    """A Limiter with rules given as parse_rate_limit strings."""
    specs = [parse_rate_limit(r) for r in rules]
    return Limiter(capacity, [(1 / s.rate, s.burst / s.rate, KINDS[s.kind], 0, -1, -1, b"") for s in specs],
                   [b"default"], max_conn)


# ---- in process ---------------------------------------------------------------------------------------

def test_token_bucket_allows_rate_times_time_plus_burst():
    table = limiter(f"header:X-Api-Key={RATE}/s,burst={BURST}")
    allowed = other = 0
    for i in range(int(OFFERED * SECONDS)):
        now = 1000.0 + i / OFFERED
        allowed += table.check_key(0, b"bot", now) == 0.0
        if i % OTHER_EVERY == 0:
            other += table.check_key(0, b"someone-else", now) == 0.0
    # GCRA with an exact clock: the burst at once, then one per 1/RATE s over the 4.995 s of sending.
    assert allowed == BURST + int((SECONDS - 1 / OFFERED) * RATE)
    assert other == OFFERED * SECONDS / OTHER_EVERY           # the other key never limited


def test_retry_after_is_the_wait_until_allowed():
    table = limiter("source=2/s,burst=1")
    assert table.check_key(0, b"a", 10.0) == 0.0
    assert table.check_key(0, b"a", 10.1) == pytest.approx(0.4)
    assert table.check_key(0, b"a", 10.5) == 0.0


def test_table_memory_is_bounded_and_a_limited_key_survives_an_attack():
    table = limiter("source=50/s,burst=10", capacity=4096)
    limited = 0
    for i in range(100_000):                       # 100k distinct attackers, one request each ...
        now = 1.0 + i / 20_000                     # ... over 5 s (20k keys/s)
        table.check_key(0, b"10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255), now)
        if i % 100 == 0:                           # ... while one client sends 200/s
            limited += table.check_key(0, b"victim", now) > 0.0
    assert table.capacity == 4096 and table.used() <= 4096
    assert table.evictions >= 100_000 - 4096
    # The client was limited all along: its entry was never evicted (else it would restart at burst).
    assert limited == 1000 - (BURST + int(5 * 50 - 50 * 100 / 20_000))


def test_blocked_key_is_limited_until_unblocked_and_never_evicted():
    table = limiter("source=1000/s", capacity=64)
    assert table.block(0, b"203.0.113.7", 3600.0)
    for i in range(10_000):
        table.check_key(0, b"k%d" % i, 5.0)
    assert table.check_key(0, b"203.0.113.7") > 3000
    assert table.unblock(0, b"203.0.113.7")
    assert table.check_key(0, b"203.0.113.7") == 0.0


def test_cidr_lists_ipv4_ipv6_and_connections_per_source():
    table = limiter(max_conn=2)
    table.set_lists(ranges(["10.0.0.0/8", "10.1.0.0/16", "2001:db8::/32", "192.0.2.1/32"]),
                    [], False)
    assert [table.listed(a) for a in (b"10.200.1.1", b"192.0.2.1", b"192.0.2.2", b"2001:db8::5",
                                      b"2001:db9::", b"::ffff:10.0.0.1", b"not-an-ip")] == \
        [True, True, False, True, False, True, False]
    table.set_lists([], ranges(["127.0.0.0/8", "::1/128"]), True)
    assert [table.admit(a) for a in (b"127.0.0.1", b"::1", b"8.8.8.8")] == [0, 0, 1]
    assert table.admit(b"127.0.0.1") == 0 and table.admit(b"127.0.0.1") == 2      # 2 open: a third is over
    table.leave_ip(b"127.0.0.1")
    assert table.admit(b"127.0.0.1") == 0
    assert ranges(["10.0.0.0/9", "10.128.0.0/9"]) == [(0xffff0a000000, 0xffff0affffff)]   # merged


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="rate must be"):
        parse_rate_limit("source=fast")
    with pytest.raises(ValueError, match="take a name"):
        parse_rate_limit("header=5/s")
    with pytest.raises(ValueError, match="bad rate limit option"):
        parse_rate_limit("source=5/s,burst=0")
    spec = parse_rate_limit({"key": "cookie:sid", "rate": "600/m", "burst": 20, "pool": "api"})
    assert (spec.kind, spec.name, spec.rate, spec.burst, spec.pool) == ("cookie", "sid", 10.0, 20, "api")
    base = ["--bind", "127.0.0.1:1", "--backend", "127.0.0.1:2"]
    with pytest.raises(ConfigError, match="--rate-limit: .* no pool 'api'"):
        config_from_args([*base, "--rate-limit", "source=5/s,pool=api"])
    with pytest.raises(ConfigError, match="need mode 'http'"):
        config_from_args([*base, "--mode", "tcp", "--rate-limit", "source=5/s"])
    with pytest.raises(SystemExit):
        config_from_args([*base, "--deny", "10.0.0.1/8"])        # host bits set: a typo, refused


def test_config_file_rate_limit_tables(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text('bind = "127.0.0.1:1"\nbackend = "127.0.0.1:2"\ndeny = ["192.0.2.0/24"]\n'
                    '[[rate_limit]]\nkey = "header:X-Api-Key"\nrate = "50/s"\nburst = 100\n'
                    '[[rate_limit]]\nkey = "source"\nrate = "5/s"\nmissing = "shared"\n')
    _, config = config_from_args(["--config", str(path)])
    assert [(s.key, s.rate, s.burst) for s in config.rate_limit] == [("header:X-Api-Key", 50.0, 100),
                                                                      ("source", 5.0, 5)]
    path.write_text('bind = "127.0.0.1:1"\nbackend = "127.0.0.1:2"\n[[rate_limit]]\nkey = "source"\n'
                    'rate = "5/s"\nburst = -1\n')
    with pytest.raises(ConfigError, match=r"lb.toml:\d+: rate_limit: bad rate limit option"):
        config_from_args(["--config", str(path)])


@pytest.mark.parametrize("missing, expected", [("source", [0.0, 0.0, 1, 1]), ("shared", [0.0, 1, 1, 1]),
                                               ("allow", [0.0, 0.0, 0.0, 0.0])])
def test_requests_without_the_key_fall_under_missing(missing, expected):
    from fastlb.admission import Admission
    _, config = config_from_args(["--bind", "127.0.0.1:1", "--backend", "127.0.0.1:2", "--rate-limit",
                                  f"cookie:sid=1/m,burst=1,missing={missing}", "--rate-limit",
                                  "query:k=1/m,burst=1,pool=default,missing=allow"])
    admission = Admission(config, None, ["default"])
    got = [admission.check_request(source, b"/", None, "default") for source in
           (b"192.0.2.1", b"192.0.2.2", b"192.0.2.1", b"192.0.2.2")]
    assert [0.0 if wait == 0.0 else 1 for wait in got] == expected
    # A key present: its own bucket (cookie parsed from the captured header, query from the URL).
    assert admission.check_request(b"192.0.2.1", b"/?k=a", {b"cookie": b"x=1; sid=abc"}, "default") == 0.0
    assert admission.check_request(b"192.0.2.1", b"/?k=b", {b"cookie": b"sid=abc"}, "default") > 0
    assert admission.check_request(b"192.0.2.1", b"/?k=a", {b"cookie": b"sid=new"}, "default") > 0


def test_engine_cookie_parser_matches_the_python_path():
    from fastlb.http.routing import cookie_value
    table = limiter()
    headers = [b"sid=abc", b"a=1; sid=abc", b"a=1;sid=abc ; b=2", b'sid="quoted"', b"xsid=1; sid=2",
               b"sid =1; sid=2", b"sid=; sid=2", b"a=1", b"", b";;", b"sid", b" \tsid=v=w ", b'sid=""x""']
    for header in headers:
        assert table.cookie_key(header, b"sid") == cookie_value(header, b"sid"), header


def test_worker_views_merge_per_key():
    row = {"rule": "r", "key": "k", "label": "k", "allowed": 5, "limited": 3, "blocked": False}
    view = {"rules": [{"rule": "r", "limited": 3}], "talkers": [row], "top_limited": [row], "blocked_keys": [],
            "blocked_networks": [], "denied": 1, "too_many_connections": 0, "store": None,
            "table": {"capacity": 8, "evictions": 0}}
    merged = merge_views([view, json.loads(json.dumps(view))])
    assert merged["rules"][0]["limited"] == 6 and merged["denied"] == 2
    assert merged["talkers"] == [{**row, "allowed": 10, "limited": 6}]


# ---- end to end: rate limits ----------------------------------------------------------------------------

def offer(sends, count: int = int(OFFERED * SECONDS), rate: float = OFFERED, between=None):
    """Calls each of `sends` in turn, `count` times in all, paced at `rate` per second (by a schedule,
    so a late send does not delay the others); `between(i)` after each. Returns (statuses per send,
    seconds from the first send to the last)."""
    statuses = [[] for _ in sends]
    start = time.monotonic()
    for i in range(count):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        statuses[i % len(sends)].append(sends[i % len(sends)]())
        if between is not None:
            between(i)
    return statuses, time.monotonic() - start


def keyed_client(port: int, source: str, key: str | None, kind: str = "header:X-Api-Key"):
    """A keep-alive client from `source` whose requests carry `key` as the rule `kind` reads it (a header
    or cookie sid; None: no key), and a send() answering the status."""
    client = Client.__new__(Client)
    client.sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    client.leftover = b""
    client.timeout = 5.0
    headers = None if key is None else {"Cookie": f"lang=en; sid={key}"} if kind == "cookie:sid" else {
        "X-Api-Key": key}
    path = f"/x?a=1&k={key}" if kind == "query:k" and key is not None else "/x"

    def send():
        response = client.request("GET", path, headers)
        if response.status == 429:
            assert int(response.header("Retry-After")) >= 1
        return response.status
    return client, send


@pytest.mark.parametrize("key, engine", [("source", "c"), ("header:X-Api-Key", "c"),
                                         ("header:X-Api-Key", "python"), ("cookie:sid", "c"),
                                         ("query:k", "c")])
def test_one_balancer_limits_one_key_and_not_the_others(procs, key, engine, monkeypatch):
    monkeypatch.setenv("FASTLB_HTTP_ENGINE", engine)
    _, ports = procs.http_backends("a")
    port = free_port()
    lb = procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                      "--rate-limit", f"{key}={RATE}/s,burst={BURST}")
    # source, header and cookie: the engine checks them in C; query: the Python path (said at start).
    lb.wait_for_line("HTTP engine c" if key != "query:k" and engine == "c" else "HTTP engine python")
    if key == "query:k":
        lb.wait_for_line(r"HTTP engine python \(rate limit keyed by query:k")
    bot, send_bot = keyed_client(port, "127.0.0.1", "bot" if key != "source" else None, key)
    other, send_other = keyed_client(port, "127.0.0.2", "someone-else" if key != "source" else None, key)
    others = []
    (statuses,), seconds = offer([send_bot], between=lambda i: i % OTHER_EVERY or others.append(send_other()))
    bot.close()
    other.close()
    assert set(statuses) <= {200, 429} and set(others) == {200}
    # The balancer sees the requests as sent, give or take scheduling: about 50/s over the sending time
    # plus the burst. ±5 % of it (13 requests) covers a late or early send of up to ~0.25 s.
    expected = RATE * seconds + BURST
    assert abs(statuses.count(200) - expected) <= 0.05 * expected, (statuses.count(200), expected)


def test_routed_requests_are_limited_per_pool(procs, tmp_path):
    _, ports = procs.http_backends("a", "b")
    port = free_port()
    config = tmp_path / "lb.toml"
    a, b = ports["a"], ports["b"]
    config.write_text(f'bind = "127.0.0.1:{port}"\ndefault_pool = "web"\n[[pool]]\nname = "api"\nbackend = ["127.0.0.1:{a}"]\n'
                      f'[[pool]]\nname = "web"\nbackend = ["127.0.0.1:{b}"]\n'
                      f'[[route]]\npool = "api"\npath_prefix = "/api/"\n'
                      f'[[rate_limit]]\nkey = "source"\nrate = "1/m"\nburst = 3\npool = "api"\n'
                      f'[[rate_limit]]\nkey = "route"\nrate = "1/m"\nburst = 5\npool = "web"\n')
    lb = procs.fastlb("--config", str(config), wait_port=port)
    lb.wait_for_line("HTTP engine c")                  # routing rules: the engine asks Python per request
    with Client(port) as c:
        api = [c.request("GET", "/api/x").status for _ in range(5)]
        web = [c.request("GET", "/").status for _ in range(7)]
    with Client(port) as c:                            # `route`: the pool's total, whoever sends
        web += [c.request("GET", "/").status]
    assert api == [200, 200, 200, 429, 429] and web == [200] * 5 + [429] * 3
    # A limited client that asked to close gets the 429 with `Connection: close`, then the close (the
    # engine answers the routed 429 in the form the connection needs).
    with Client(port) as c:
        answer = c.request("GET", "/api/x", {"Connection": "close"})
        assert answer.status == 429 and answer.header("Connection") == "close"
        assert c.closed()


@pytest.mark.parametrize("path", ["/chunked?n=1", "/x"])
def test_a_request_the_engine_hands_over_counts_once(procs, path):
    """A chunked response makes the engine hand the connection, with the request in flight, to the Python
    path: that request was counted by the engine, and must neither be counted again nor refused there."""
    _, ports = procs.http_backends("a")
    port = free_port()
    lb = procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                      "--rate-limit", "source=1/m,burst=5")
    lb.wait_for_line("HTTP engine c")
    with Client(port) as c:
        statuses = [c.request("GET", path).status for _ in range(7)]
    assert statuses == [200] * 5 + [429] * 2


def two_balancers(procs, redis_port: int, key: str = "header:X-Api-Key"):
    _, ports = procs.http_backends("a")
    nodes = []
    for _ in range(2):
        port = free_port()
        proc = procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                            "--rate-limit", f"{key}={RATE}/s,burst={BURST}",
                            "--store", f"redis://127.0.0.1:{redis_port}/0")
        proc.wait_for_line(f"limits shared through redis://127.0.0.1:{redis_port}")
        nodes.append((proc, port))
    return nodes


def test_two_balancers_sharing_redis_enforce_one_global_limit(procs, tmp_path):
    _, redis_port = start_redis(procs, str(tmp_path))
    (_, port_a), (_, port_b) = two_balancers(procs, redis_port)
    a, send_a = keyed_client(port_a, "127.0.0.1", "shared-key")
    b, send_b = keyed_client(port_b, "127.0.0.1", "shared-key")
    (on_a, on_b), seconds = offer([send_a, send_b])          # 100/s on each, 200/s on the key
    a.close()
    b.close()
    assert set(on_a + on_b) <= {200, 429}
    allowed = on_a.count(200) + on_b.count(200)
    # One global bucket: 50/s x time + burst. Each node decides alone between two exchanges (every 50 ms),
    # so the other's last ~2.5 requests, plus each node's first burst before the first exchange, may
    # pass on top: well within ±10 % (26 requests). Without sharing it would be about twice as many.
    expected = RATE * seconds + BURST
    assert abs(allowed - expected) <= 0.10 * expected, (on_a.count(200), on_b.count(200), expected)
    assert on_a.count(200) > 0.25 * expected and on_b.count(200) > 0.25 * expected    # both nodes served


def test_redis_gone_midway_limits_go_on_locally_and_sharing_resumes(procs, tmp_path):
    redis, redis_port = start_redis(procs, str(tmp_path))
    (lb_a, port_a), (lb_b, port_b) = two_balancers(procs, redis_port)
    a, send_a = keyed_client(port_a, "127.0.0.1", "shared-key")
    b, send_b = keyed_client(port_b, "127.0.0.1", "shared-key")
    half = int(OFFERED * SECONDS) // 2
    (on_a, on_b), seconds = offer([send_a, send_b], between=lambda i: i == half and redis.kill())
    # Only answers: every request got 200 or 429 (a failed exchange never reaches a request).
    assert set(on_a + on_b) <= {200, 429}
    # Alone, each node still limits to 50/s + burst: at most twice the global limit.
    assert on_a.count(200) + on_b.count(200) <= 2 * (RATE * seconds + BURST)
    assert on_a[-50:].count(429) > 0 and on_b[-50:].count(429) > 0
    for lb in (lb_a, lb_b):
        lb.wait_for_line("admission: store .* unreachable")
    start_redis(procs, str(tmp_path), port=redis_port)
    for lb in (lb_a, lb_b):
        lb.wait_for_line("admission: store .* reachable again", timeout=15)
        assert lb.output.count("unreachable") == 1              # one line, not one per request
    # Shared again: a request now is counted in Redis (the key's state is there again).
    send_a()
    import redis as redis_client
    with redis_client.Redis(port=redis_port) as r:
        wait_until(lambda: r.keys("fastlb:rl:*"), what="the key's state in Redis again")
    a.close()
    b.close()


# ---- end to end: lists and connection limits -----------------------------------------------------------

def refused_at_once(port: int, source: str) -> bool:
    """The connection from `source` is closed without an answer (a request sent gets nothing)."""
    with connect(port, source) as sock:
        try:
            sock.sendall(build("GET", "/"))
            return sock.recv(4096) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True


@pytest.mark.parametrize("engine", ["c", "python"])
def test_http_deny_list_and_connections_per_source(procs, engine, monkeypatch):
    monkeypatch.setenv("FASTLB_HTTP_ENGINE", engine)
    _, ports = procs.http_backends("a")
    port = free_port()
    lb = procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                      "--deny", "127.0.0.66/32", "--max-conn-per-source", "2")
    lb.wait_for_line(f"HTTP engine {engine}")
    assert refused_at_once(port, "127.0.0.66")
    held = [keyed_client(port, "127.0.0.3", None) for _ in range(2)]
    assert [send() for _, send in held] == [200, 200]
    # A third connection from the same source: 429, then closed; another source is served.
    third, _ = keyed_client(port, "127.0.0.3", None)
    third.send(build("GET", "/"))
    response = third.read_response()
    assert response.status == 429 and response.header("Connection") == "close" and third.closed()
    fourth, send_fourth = keyed_client(port, "127.0.0.4", None)
    assert send_fourth() == 200
    # One held connection closes: the source may open one again.
    held[0][0].close()

    def one_more_served():
        client, send = keyed_client(port, "127.0.0.3", None)
        try:
            return send() == 200
        except ConnectionError:
            return False
        finally:
            client.close()
    wait_until(one_more_served, what="a connection after one closed")
    for client, _ in held[1:]:
        client.close()
    fourth.close()


def test_access_file_is_watched_and_applied_live(procs, tmp_path):
    access = tmp_path / "access"
    replace_file(access, "# bots\ndeny 127.0.0.70/32\n")
    _, ports = procs.http_backends("a")
    port = free_port()
    lb = procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                      "--access-file", str(access))
    assert refused_at_once(port, "127.0.0.70")
    replace_file(access, "deny 127.0.0.71/32\ndeny 2001:db8::/32\n")
    wait_until(lambda: refused_at_once(port, "127.0.0.71"), what="the new deny list applied")
    client, send = keyed_client(port, "127.0.0.70", None)
    assert send() == 200
    client.close()
    replace_file(access, "deny not-a-network\n")           # refused: the last good lists stay
    lb.wait_for_line(r"admission: .*access:1: .*keeping its last lists")
    assert refused_at_once(port, "127.0.0.71")


@pytest.mark.parametrize("relay", ["epoll", "uvloop"])
def test_tcp_deny_list_connections_per_source_and_proxy_address(procs, relay):
    _, ports = procs.backends("a")
    port, proxied = free_port(), free_port()
    procs.fastlb("--mode", "tcp", "--relay", relay, "--bind", f"127.0.0.1:{port}",
                 "--bind", f"127.0.0.1:{proxied},accept-proxy", "--backend", f"127.0.0.1:{ports['a']}",
                 "--deny", "127.0.0.66/32", "--deny", "203.0.113.0/24", "--max-conn-per-source", "2")
    with connect(port, "127.0.0.66") as sock:
        assert read_line(sock) == b""                          # closed, no backend greeting
    held = [connect(port, "127.0.0.3") for _ in range(2)]
    assert [read_line(s) for s in held] == [b"a\n", b"a\n"]
    with connect(port, "127.0.0.3") as sock:
        assert read_line(sock) == b""                          # a third from that source: closed
    with connect(port, "127.0.0.4") as sock:
        assert read_line(sock) == b"a\n"
    held[0].close()

    def served_again():
        with connect(port, "127.0.0.3") as sock:
            return read_line(sock) == b"a\n"
    wait_until(served_again, what="a connection after one closed")
    held[1].close()
    # accept-proxy: the PROXY header's source address is the one the lists see.
    with connect(proxied) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 80\r\n")
        assert read_line(sock) == b""
    with connect(proxied) as sock:
        sock.sendall(b"PROXY TCP4 198.51.100.9 127.0.0.1 5555 80\r\n")
        assert read_line(sock) == b"a\n"


# ---- end to end: admin bind, runtime blocks, metrics ------------------------------------------------------

def admin_get(admin: int, path: str, source: str = "127.0.0.1", token: str | None = None):
    with connect(admin, source) as sock:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        sock.sendall(build("GET", path, headers))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_admin_bind_allow_list(procs):
    _, ports = procs.http_backends("a")
    port, admin = free_port(), free_port()
    procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                 "--admin", f"0.0.0.0:{admin}", "--admin-allow", "127.0.0.2/32")
    wait_until(lambda: admin_get(admin, "/healthz", "127.0.0.2").endswith(b"ok\n"), what="admin bind")
    assert admin_get(admin, "/healthz", "127.0.0.3") == b""
    assert admin_get(admin, "/metrics", "127.0.0.1") == b""
    # The traffic bind is not restricted by it.
    client, send = keyed_client(port, "127.0.0.3", None)
    assert send() == 200
    client.close()


def ctl(admin: int, token_file, *args: str) -> str:
    import subprocess
    done = subprocess.run([sys.executable, "-m", "fastlb", "ctl", "--admin", f"127.0.0.1:{admin}",
                           "--token-file", str(token_file), *args], capture_output=True, text=True,
                          timeout=20)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("workers", ["1", "2"])
def test_runtime_block_unblock_top_talkers_and_metrics(procs, tmp_path, workers):
    token = tmp_path / "token"
    token.write_text("s3cret-token-for-tests\n")
    _, ports = procs.http_backends("a")
    port, admin = free_port(), free_port()
    procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                 "--rate-limit", "header:X-Api-Key=5/s,burst=5", "--workers", workers,
                 "--admin", str(admin), "--admin-token-file", str(token))
    wait_until(lambda: admin_get(admin, "/healthz").endswith(b"ok\n"), what="admin bind")
    client, send = keyed_client(port, "127.0.0.1", "card-tester")
    statuses = [send() for _ in range(20)]
    assert statuses.count(200) == 5 and statuses.count(429) == 15    # burst 5, then 429 (within 1 s)
    assert "block" in ctl(admin, token, "block", "--key", "good-key")
    good, send_good = keyed_client(port, "127.0.0.1", "good-key")
    assert send_good() == 429
    assert "unblock" in ctl(admin, token, "unblock", "--key", "good-key")
    assert send_good() == 200
    ctl(admin, token, "block", "127.0.0.77")
    wait_until(lambda: refused_at_once(port, "127.0.0.77"), what="the blocked address refused")
    ctl(admin, token, "unblock", "127.0.0.77")
    extra, send_extra = keyed_client(port, "127.0.0.77", "x")
    assert send_extra() == 200
    view = ctl(admin, token, "admission")
    assert "card-tester" in view and "header:X-Api-Key=5/s,burst=5" in view
    metrics = admin_get(admin, "/metrics").decode()
    assert 'fastlb_ratelimit_limited_total{rule="header:X-Api-Key=5/s,burst=5"} 16.0' in metrics
    # API keys never appear in /metrics (no token there): only their fingerprint.
    assert "card-tester" not in metrics and 'fastlb_ratelimit_top_limited{key="#' in metrics
    assert b"401" in admin_get(admin, "/api/admission")[:20]           # the API needs the token
    stats = json.loads(admin_get(admin, "/stats.json").partition(b"\r\n\r\n")[2])
    assert stats["admission"]["rules"][0]["limited"] == 16 and "card-tester" not in json.dumps(stats)
    for c in (client, good, extra):
        c.close()
