"""Every pool first-class: a [[pool]] has active checks, passive ejection with recovery probes, run-time
changes through the API and `fastlb ctl` (POOL/ADDR) in every worker, and shows in /api, /metrics; and
with no health setting at all a restarted backend is back in service within about a probe interval."""
import http.client
import subprocess
import sys
import time

import pytest

from http_client import KeepAliveLoad
from procs import (BACKEND_SERVER, HTTP_BACKEND, ConnectionLoad, free_port, port_open, replace_file,
                   subprocess_env, wait_until)
from test_ops import TOKEN, api, metric, metrics, request

from fastlb.config import Config, ConfigError, PoolSpec, parse_backend
from fastlb.health import check_targets


def backend(procs, name, port=None, http=True):
    """One test backend in its own process (so it can be killed alone): (proc, port)."""
    port = port or free_port()
    proc = procs.start([sys.executable, HTTP_BACKEND if http else BACKEND_SERVER, f"{name}:{port}"],
                       f"backend {name}")
    proc.wait_for_line(r"^ready$")
    return proc, port


def write_config(tmp_path, port, admin, top_backends, pool_lines="", workers=2, mode="http"):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    path = tmp_path / "lb.toml"
    backends = ", ".join(f'"127.0.0.1:{p}"' for p in top_backends)
    path.write_text(f'mode = "{mode}"\nworkers = {workers}\nbind = "127.0.0.1:{port}"\nbackend = [{backends}]\n'
                    f'admin = "127.0.0.1:{admin}"\nadmin_token_file = "{token}"\n{pool_lines}')
    return str(path)


def start(procs, config, port, admin, workers=2):
    fastlb = procs.fastlb("--config", config, wait_port=port)
    wait_until(lambda: port_open(admin), what="the admin bind")
    wait_until(lambda: api(admin, "GET", "/api/backends")["workers"] == workers, what="workers reporting")
    return fastlb


def pool_view(admin, name):
    return {b["address"]: b for p in api(admin, "GET", "/api/backends")["pools"] if p["name"] == name
            for b in p["backends"]}


def get(port, path):
    """One request on a new connection: the name of the backend that answered."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200, response.status
        return response.read().split(b" ", 1)[0].decode()
    finally:
        connection.close()


def answered_by(loads, name, since=0.0):
    return sum(1 for load in loads for t, n in load.answers[:] if n == name and t >= since)


API_POOL = '''
[[pool]]
name = "api"
backend = [{backends}]
{settings}

[[route]]
pool = "api"
path_prefix = "/api"
'''


# ---- settings ----------------------------------------------------------------------------------------

def test_a_pool_takes_the_top_level_settings_it_does_not_set_but_no_discovery_source():
    pool = PoolSpec("api", [parse_backend("127.0.0.1:81,check-port=9000")],
                    settings={"check": "http", "check_path": "/ready", "outlier_failures": 2})
    config = Config(check="tcp", check_interval=5.0, outlier_ejection_time=7.0, backends_file="/etc/b",
                    consul_service="web", consul_datacenter="dc2", pools=[pool])
    own = config.pool_config(pool)
    assert (own.check, own.check_path, own.outlier_failures) == ("http", "/ready", 2)
    assert (own.check_interval, own.outlier_ejection_time, own.consul_datacenter) == (5.0, 7.0, "dc2")
    assert own.backends_file is None and own.consul_service is None
    # Its backends are checked with its settings (and their own overrides), named by pool.
    targets = check_targets(config.replace(backends=[parse_backend("127.0.0.1:80")]))
    assert [(t.key, t.port, t.settings.check) for t in targets] == [
        ("127.0.0.1:80", 80, "tcp"), ("api/127.0.0.1:81", 9000, "http")]


def test_pool_settings_are_checked_with_file_line_and_field(tmp_path):
    from fastlb.cli import config_from_args
    path = tmp_path / "lb.toml"
    pool = '[[pool]]\nname = "api"\nbackend = ["127.0.0.1:81"]\n'
    for extra, message in (
            ('rise = 0\n', r"lb.toml:7: pool\[1\].rise: expected an integer >= 1"),
            ('check_path = "/x"\n', r"pool 'api': check_path: applies to HTTP checks only"),
            ('slowstart = "5s"\nalgorithm = "hash"\n', r"pool 'api': slowstart: slow start ramps weights"),
            ('outlier_probe_interval = "soon"\n', r"lb.toml:7: pool\[1\].outlier_probe_interval")):
        path.write_text(f'bind = "127.0.0.1:8080"\nbackend = "127.0.0.1:80"\n\n{pool}{extra}')
        with pytest.raises(ConfigError, match=message):
            config_from_args(["--config", str(path)])


# ---- active checks in a named pool --------------------------------------------------------------------

def test_a_named_pools_backend_killed_under_load_is_taken_out_by_its_check_and_comes_back(procs, tmp_path):
    _, port_d = backend(procs, "d")
    _, port_a = backend(procs, "a")
    b, port_b = backend(procs, "b")
    port, admin = free_port(), free_port()
    # Passive ejection off in this pool: what takes b out is its active check.
    settings = ('check = "http"\ncheck_path = "/health"\ncheck_interval = "200ms"\nrise = 1\nfall = 1\n'
                'outlier_failures = 0')
    config = write_config(tmp_path, port, admin, [port_d], API_POOL.format(
        backends=f'"127.0.0.1:{port_a}", "127.0.0.1:{port_b}"', settings=settings))
    fastlb = start(procs, config, port, admin)
    b_address = f"127.0.0.1:{port_b}"
    loads = [KeepAliveLoad(port, "/api/x", max_seconds=60).start() for _ in range(4)]
    try:
        wait_until(lambda: answered_by(loads, "b"), what="traffic to b")
        b.kill()
        fastlb.wait_for_line(rf"backend {b_address} DOWN: check failed")
        wait_until(lambda: pool_view(admin, "api")[b_address]["state"] == "down", what="b down in the view")
        down = time.monotonic()
        wait_until(lambda: answered_by(loads, "a", down) >= 100, what="traffic after b went down")
        backend(procs, "b", port_b)
        fastlb.wait_for_line(rf"backend {b_address} UP: check passed")
        wait_until(lambda: pool_view(admin, "api")[b_address]["state"] == "up", what="b up in every worker")
        up = time.monotonic()
        wait_until(lambda: answered_by(loads, "b", up), what="traffic to b again")
    finally:
        for load in loads:
            load.stop()
    assert [f for load in loads for f in load.failures] == []
    assert f"127.0.0.1:{port_d} DOWN" not in fastlb.output      # the top-level pool has no check
    samples = metrics(admin)
    assert metric(samples, "fastlb_backend_up", pool="api", backend=b_address) == 1
    assert metric(samples, "fastlb_pool_backends_up", pool="api") == 2


# ---- run-time changes in a named pool, in every worker -----------------------------------------------------

@pytest.mark.parametrize("workers", [2, 1])
def test_the_api_changes_a_named_pools_weight_and_drains_its_backend_in_every_worker(procs, tmp_path, workers):
    _, port_d = backend(procs, "d")
    _, port_a = backend(procs, "a")
    _, port_b = backend(procs, "b")
    _, port_c = backend(procs, "c")
    a, b, c = (f"127.0.0.1:{p}" for p in (port_a, port_b, port_c))
    port, admin = free_port(), free_port()
    config = write_config(tmp_path, port, admin, [port_d], API_POOL.format(backends=f'"{a}", "{b}"', settings=""),
                          workers=workers)
    fastlb = start(procs, config, port, admin, workers)

    def answers(n):
        names = [get(port, "/api/x") for _ in range(n)]
        return {name: names.count(name) for name in set(names)}

    # Weight, the pool named in one encoded path segment: every worker follows it.
    api(admin, "POST", f"/api/backends/api%2F{a}/weight", {"weight": 4})
    view = pool_view(admin, "api")
    assert view[a]["weight"] == 4 and view[a]["workers"] == workers and view[b]["weight"] == 1
    counts = answers(100)
    assert counts.get("a", 0) > 2.5 * counts.get("b", 0) > 0, counts
    assert metric(metrics(admin), "fastlb_backend_weight", pool="api", backend=a) == 4
    # The top-level pool is another pool: the same address there is unknown.
    assert request(admin, "POST", f"/api/backends/{a}/weight", TOKEN, {"weight": 2})[0] == 404
    # Drain with `fastlb ctl`, POOL/ADDR: no worker sends b a new request.
    ctl = subprocess.run([sys.executable, "-m", "fastlb", "ctl", "--admin", f"127.0.0.1:{admin}",
                          "--token-file", str(tmp_path / "token"), "drain", f"api/{b}"],
                         capture_output=True, text=True, env=subprocess_env(), timeout=30)
    assert ctl.returncode == 0, ctl.stderr
    assert pool_view(admin, "api")[b]["state"] == "drain"
    assert set(answers(40)) == {"a"}
    assert metric(metrics(admin), "fastlb_backend_up", pool="api", backend=b) == 0.5
    # Enabled again, the pool in its own path segment this time.
    api(admin, "POST", f"/api/backends/api/{b}/state", {"state": "enable"})
    assert "b" in answers(40)
    # Added to and removed from the named pool, in every worker.
    api(admin, "POST", "/api/backends", {"address": f"api/{c}", "weight": 2}, expect=201)
    wait_until(lambda: pool_view(admin, "api").get(c, {}).get("workers") == workers, what="c in every worker")
    assert "c" in answers(40)
    api(admin, "DELETE", f"/api/backends/api%2F{c}")
    assert c not in pool_view(admin, "api")
    assert "c" not in answers(40)
    assert set(pool_view(admin, "default")) == {f"127.0.0.1:{port_d}"}
    # A pool that does not exist: 404 naming the pools there are.
    status, body = request(admin, "POST", f"/api/backends/nope%2F{a}/weight", TOKEN, {"weight": 1})
    assert status == 404 and b"no pool 'nope'" in body and b"api" in body
    wait_until(lambda: sum(f"backend {c} added" in line for line in fastlb.lines) == workers,
               what="c added in each worker")


# ---- recovery with no health setting ---------------------------------------------------------------------

@pytest.mark.parametrize("mode,pool", [("tcp", None), ("http", None), ("http", "api")])
def test_with_default_settings_a_restarted_backend_is_back_at_once(procs, tmp_path, mode, pool):
    """3 backends, 4 clients, the second backend killed and restarted: no request fails, and the backend
    serves again within about a probe interval (250 ms) of listening, not after the 30 s ejection."""
    http = mode == "http"
    ports = {}
    procs_by_name = {}
    for name in ("a", "b", "c"):
        procs_by_name[name], ports[name] = backend(procs, name, http=http)
    port, admin = free_port(), free_port()
    addresses = ", ".join(f'"127.0.0.1:{p}"' for p in ports.values())
    if pool is None:
        config = write_config(tmp_path, port, admin, ports.values(), mode=mode)
        path = "/x"
    else:       # a named pool, with slow start of its own: the return goes through it
        _, port_d = backend(procs, "d")
        config = write_config(tmp_path, port, admin, [port_d], API_POOL.format(
            backends=addresses, settings='slowstart = "1s"'))
        path = "/api/x"
    fastlb = start(procs, config, port, admin)
    b_address = f"127.0.0.1:{ports['b']}"
    loads = [(KeepAliveLoad(port, path, max_seconds=60) if http else ConnectionLoad(port, max_seconds=60)).start()
             for _ in range(4)]
    try:
        wait_until(lambda: answered_by(loads, "b"), what="traffic to b")
        if http:
            procs_by_name["b"].kill()
        else:       # between connections: a relayed connection cut by the kill is lost by any balancer
            gates = [load.between_connections() for load in loads]
            for gate in gates:
                gate.acquire()
            procs_by_name["b"].kill()
            for gate in gates:
                gate.release()
        fastlb.wait_for_line(rf"backend {b_address} ejected for 30s \(ejection 1\): 5 consecutive connect "
                             rf"failures .*; probed every 0.25s")
        # Restarted (the fixture stops it after the loads): measured from when it listens again.
        procs.start([sys.executable, HTTP_BACKEND if http else BACKEND_SERVER, f"b:{ports['b']}"], "backend b again")
        wait_until(lambda: port_open(ports["b"]), what="b listening again", interval=0.005)
        listening = time.monotonic()
        back = wait_until(lambda: next((t for load in loads for t, n in load.answers[:]
                                        if n == "b" and t >= listening), None), what="traffic to b again")
        fastlb.wait_for_line(rf"backend {b_address} back from ejection: it answers again \(tcp probe\)")
    finally:
        for load in loads:
            load.stop()
    recovery = back - listening
    print(f"\nrecovery {mode}{' pool ' + pool if pool else ''}: {recovery * 1000:.0f} ms after b listened again")
    assert [f for load in loads for f in load.failures] == []
    assert recovery < 3.0, recovery        # generous (a shared machine); the target is 1 s, see the report


def test_the_controller_table_keeps_each_pools_changes_and_hands_them_to_new_workers():
    from fastlb.control import BackendTable, ChangeError, spec_to_dict
    api_pool = PoolSpec("api", [parse_backend("127.0.0.1:81"), parse_backend("127.0.0.1:82")])
    other = PoolSpec("other", [parse_backend("127.0.0.1:91")])
    config = Config(mode="http", backends=[parse_backend("127.0.0.1:80")], pools=[api_pool, other])
    table = BackendTable(config)
    change = table.validate({"op": "weight", "pool": "api", "address": "127.0.0.1:81", "weight": 5})
    assert change == {"op": "weight", "address": "127.0.0.1:81", "weight": 5, "pool": "api"}
    table.commit(change)
    table.commit(table.validate({"op": "state", "pool": "api", "address": "127.0.0.1:82", "state": "drain"}))
    table.commit(table.validate({"op": "add", "pool": "other", "spec": spec_to_dict(parse_backend("127.0.0.1:92"))}))
    # "default" is the top level; an unknown pool or an address of another pool is refused.
    assert "pool" not in table.validate({"op": "weight", "pool": "default", "address": "127.0.0.1:80", "weight": 2})
    for bad, status in (({"pool": "nope", "address": "127.0.0.1:81"}, 404),
                        ({"pool": "other", "address": "127.0.0.1:81"}, 404)):
        with pytest.raises(ChangeError) as error:
            table.validate({"op": "weight", "weight": 1, **bad})
        assert error.value.status == status
    # What a restarted worker starts from: every pool's current backends and operator states.
    current = table.current_config()
    assert [(b.address, b.weight) for b in current.pools[0].backends] == [("127.0.0.1:81", 5), ("127.0.0.1:82", 1)]
    assert [b.address for b in current.pools[1].backends] == ["127.0.0.1:91", "127.0.0.1:92"]
    assert table.runtime_admin() == {"api/127.0.0.1:82": "drain"}
    # A new generation: the pool the file left alone keeps its changes; the changed one starts from the
    # file, keeping what the API added.
    changed = PoolSpec("other", [parse_backend("127.0.0.1:93")])
    table.config = config.replace(pools=[api_pool, changed], log_level="debug")
    assert table.named["api"].specs["127.0.0.1:81"].weight == 5
    assert table.named["other"].sources == {"127.0.0.1:93": "config", "127.0.0.1:92": "api"}


FILE_POOL = API_POOL.replace("backend = [{backends}]\n", "")     # pool "api" with no backend list


def pool_following_a_file(procs, tmp_path):
    """fastlb (two workers) whose top level has backend d and whose pool "api" follows a backends file
    that lists a; returns (fastlb, port, admin, port of d, address of a, address of b, the file)."""
    _, port_d = backend(procs, "d")
    _, port_a = backend(procs, "a")
    _, port_b = backend(procs, "b")
    a, b = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
    listing = tmp_path / "api-backends"
    replace_file(listing, f"{a}\n")
    port, admin = free_port(), free_port()
    config = write_config(tmp_path, port, admin, [port_d], FILE_POOL.format(settings=f'backends_file = "{listing}"'))
    return start(procs, config, port, admin), port, admin, port_d, a, b, listing


def test_a_named_pool_follows_its_own_backends_file_in_every_worker(procs, tmp_path):
    fastlb, port, admin, port_d, a, b, listing = pool_following_a_file(procs, tmp_path)

    def listed():
        view = pool_view(admin, "api")
        return {address: b["source"] for address, b in view.items() if b["workers"] == 2}

    wait_until(lambda: listed() == {a: "file"}, what="a from the pool's file")
    assert set(pool_view(admin, "default")) == {f"127.0.0.1:{port_d}"}     # not the top level's
    assert get(port, "/api/x") == "a"
    replace_file(listing, f"# moved\n{b},weight=3\n")
    wait_until(lambda: listed() == {b: "file"}, what="a replaced by b")
    assert pool_view(admin, "api")[b]["weight"] == 3
    assert {get(port, "/api/x") for _ in range(6)} == {"b"}
    # The file disappears: the pool keeps what it had, and the log says so once.
    listing.unlink()
    fastlb.wait_for_line(rf"cannot read {listing}: .*keeping its last backends")
    assert {get(port, "/api/x") for _ in range(6)} == {"b"}
    assert fastlb.output.count("keeping its last backends") == 1
    fastlb.wait_for_line(r"discovery \(file, pool api\): add")


class ServFail:
    """A DNS server on 127.0.0.1:port (UDP) that answers every query SERVFAIL, counting them."""

    def __init__(self, port: int) -> None:
        import socket
        import threading
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.1)
        self.queries = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                query, client = self.sock.recvfrom(512)
            except OSError:
                continue
            self.queries += 1
            self.sock.sendto(query[:2] + b"\x81\x82" + query[4:], client)     # QR, RD, RA; rcode 2

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


def test_a_named_pool_follows_dns_and_says_once_when_the_server_fails(procs, tmp_path):
    from procs import ensure_debian_tool
    from test_ops import start_dnsmasq
    dnsmasq = ensure_debian_tool("dnsmasq", "dnsmasq-base")
    _, port_d = backend(procs, "d")
    _, port_a = backend(procs, "a")
    _, port_b = backend(procs, "b")
    a, b = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
    dns_port = free_port()
    dns = start_dnsmasq(procs, dnsmasq, tmp_path, dns_port, [port_a], 1)
    port, admin = free_port(), free_port()
    config = write_config(tmp_path, port, admin, [port_d], API_POOL.replace("backend = [{backends}]\n", "").format(
        settings=f'backends_dns = "_echo._tcp.svc.test"\ndns_server = "127.0.0.1:{dns_port}"\n'
                 f'dns_interval = "100ms"'))
    fastlb = start(procs, config, port, admin)
    wait_until(lambda: set(pool_view(admin, "api")) == {a}, what="a from DNS")
    assert get(port, "/api/x") == "a"
    # The server fails (SERVFAIL to every query) lookup after lookup: the pool keeps a, and the log
    # says so once.
    dns.kill()
    mark = len(fastlb.lines)
    failing = ServFail(dns_port)
    try:
        wait_until(lambda: failing.queries >= 5, what="five failed lookups")
        assert set(pool_view(admin, "api")) == {a} and get(port, "/api/x") == "a"
    finally:
        failing.close()
    assert sum("DNS lookup of _echo._tcp.svc.test" in line for line in fastlb.lines[mark:]) == 1
    fastlb.wait_for_line(r"DNS lookup of _echo._tcp.svc.test .* failed: DNS error rcode 2", start=mark)
    start_dnsmasq(procs, dnsmasq, tmp_path, dns_port, [port_b], 2)
    wait_until(lambda: set(pool_view(admin, "api")) == {b}, what="b replacing a")
    assert get(port, "/api/x") == "b"
    fastlb.wait_for_line(r"DNS lookup of _echo._tcp.svc.test via .* works again", start=mark)


def test_an_ejected_backend_is_probed_back_and_a_bad_responder_only_by_an_http_check():
    import asyncio
    import socket
    from fastlb.health import CONNECT, RESPONSE
    from fastlb.pool import BackendPool
    from test_health_units import run_until
    loop = asyncio.new_event_loop()
    port = free_port()
    specs = [parse_backend(f"127.0.0.1:{port}"), parse_backend("127.0.0.1:1"), parse_backend("127.0.0.1:2"),
             parse_backend("127.0.0.1:3,check=http")]
    pool = BackendPool(Config(backends=specs, outlier_failures=2, outlier_probe_interval=0.05,
                              max_ejection_percent=100), loop, 100)
    dead, bad, _, checked = (backend.health for backend in pool.primaries)
    try:
        for _ in range(2):
            pool.health.record(dead, False, CONNECT, "connection refused")
            pool.health.record(bad, False, RESPONSE, "status 500")
            pool.health.record(checked, False, RESPONSE, "status 500")
        assert dead.ejected and bad.ejected and checked.ejected
        # Refused connects: probed with a connect. 5xx: a connect proves nothing, so only the backend
        # with an http check is probed; the other waits out its 30 s.
        assert set(pool.health.probes) == {dead, checked}
        run_until(loop, lambda: isinstance(pool.health.probes.get(dead), asyncio.Task), timeout=2)
        run_until(loop, lambda: isinstance(pool.health.probes.get(dead), asyncio.TimerHandle), timeout=2)
        assert dead.ejected                               # nothing listens: still out
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", port))
            listener.listen()
            run_until(loop, lambda: not dead.ejected, timeout=5)
        assert dead.backend.state == "up" and dead not in pool.health.probes and dead.eject_handle is None
        assert bad.ejected and bad.eject_handle is not None
    finally:
        pool.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
    assert pool.health.probes == {}


def test_a_source_dropped_by_a_reload_keeps_its_backends_and_says_so_once(procs, tmp_path):
    fastlb, port, admin, port_d, a, b, listing = pool_following_a_file(procs, tmp_path)
    wait_until(lambda: set(pool_view(admin, "api")) == {a}, what="a from the pool's file")
    # A reload that changes another setting of the pool: new workers; the source takes its backends
    # back (nothing removed and added again) and still follows its file.
    write_config(tmp_path, port, admin, [port_d], FILE_POOL.format(
        settings=f'backends_file = "{listing}"\noutlier_failures = 3'))
    assert "new workers" in api(admin, "POST", "/api/reload")["result"]
    fastlb.wait_for_line(r"reload: 2 new worker\(s\) running")
    replace_file(listing, f"{a}\n{b}\n")
    wait_until(lambda: set(pool_view(admin, "api")) == {a, b}, what="b from the file after the reload")
    assert fastlb.output.count(f"discovery (file, pool api): add {a}") == 1
    assert f"discovery (file, pool api): remove {a}" not in fastlb.output
    replace_file(listing, f"{a}\n")
    wait_until(lambda: set(pool_view(admin, "api")) == {a}, what="b gone from the file")
    # The pool now lists b itself and has no file: new workers, with a still in the pool.
    write_config(tmp_path, port, admin, [port_d], API_POOL.format(backends=f'"{b}"', settings=""))
    assert "new workers" in api(admin, "POST", "/api/reload")["result"]
    wait_until(lambda: fastlb.output.count("new worker(s) running") == 2, what="the second reload")
    fastlb.wait_for_line(r"the file source of pool api is no longer configured: its 1 backend\(s\) stay")
    wait_until(lambda: {address: v["source"] for address, v in pool_view(admin, "api").items()
                        if v["workers"] == 2} == {a: "file", b: "config"}, what="a kept beside b")
    assert {get(port, "/api/x") for _ in range(8)} == {"a", "b"}
    assert fastlb.output.count("is no longer configured") == 1
