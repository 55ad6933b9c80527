"""Operations with real processes: the admin API and its token, metrics summed over workers, the access
log, `fastlb ctl`, hot reload under load, and discovery from a file and from a real DNS server."""
import collections
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib

import pytest
from prometheus_client.parser import text_string_to_metric_families

from procs import (REPO, ConnectionLoad, backend_name, connect, ensure_debian_tool, free_port, port_open, read_line,
                   replace_file, subprocess_env, wait_until)

TOKEN = "test-token-0123456789abcdef"


def request(port, method, path, token=None, body=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        connection.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def api(port, method, path, body=None, expect=200):
    status, data = request(port, method, path, TOKEN, body)
    assert status == expect, (status, data)
    return json.loads(data)


def backends_view(admin_port):
    return {b["address"]: b for b in api(admin_port, "GET", "/api/backends")["pools"][0]["backends"]}


def metrics(admin_port):
    status, data = request(admin_port, "GET", "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(data.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


def start_balancer(procs, backend_ports, token_file, *extra, workers=2):
    port, admin = free_port(), free_port()
    args = ["--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--admin", str(admin),
            "--admin-token-file", token_file]
    for backend_port in backend_ports:
        args += ["--backend", f"127.0.0.1:{backend_port}"]
    # Waits on log lines, not on a probe connection, which the metrics would count.
    fastlb = procs.fastlb(*args, *extra, wait_port=0)
    wait_until(lambda: fastlb.output.count("INFO listening on") == workers, what="workers listening")
    wait_until(lambda: port_open(admin), what="the admin bind")
    if workers > 1:
        wait_until(lambda: api(admin, "GET", "/api/backends")["workers"] == workers, what="workers reporting")
    return fastlb, port, admin


def ping(port):
    """One connection: reads the backend's name, echoes 'ping', returns the name."""
    with connect(port) as sock:
        name = read_line(sock).decode().strip()
        sock.sendall(b"ping\n")
        assert read_line(sock) == b"ping\n"
    return name


def test_every_api_path_needs_the_token_and_metrics_and_healthz_do_not(procs, token_file):
    _, ports = procs.backends("a", "b")
    _, _, admin = start_balancer(procs, ports.values(), token_file)
    assert request(admin, "GET", "/healthz") == (200, b"ok\n")
    assert request(admin, "GET", "/metrics")[0] == 200
    calls = [("GET", "/api/backends", None), ("POST", "/api/backends", {"address": "127.0.0.1:1"}),
             ("DELETE", f"/api/backends/127.0.0.1:{ports['a']}", None),
             ("POST", f"/api/backends/127.0.0.1:{ports['a']}/weight", {"weight": 2}),
             ("POST", f"/api/backends/127.0.0.1:{ports['a']}/state", {"state": "drain"}),
             ("POST", "/api/reload", None), ("GET", "/api/no-such-route", None), ("GET", "/api", None)]
    for method, path, body in calls:
        for token in (None, "wrong-token-0123456789abcdef", TOKEN[:-1]):
            status, data = request(admin, method, path, token, body)
            assert status == 401, (method, path, token, status, data)
    # Nothing changed through all of that.
    view = backends_view(admin)
    assert set(view) == {f"127.0.0.1:{p}" for p in ports.values()}
    assert all(b["weight"] == 1 and b["admin_state"] == "up" for b in view.values())
    status, _ = request(admin, "GET", "/api/no-such-route", TOKEN)
    assert status == 404


def test_api_changes_reach_every_worker(procs, token_file):
    _, ports = procs.backends("a", "b", "c")
    a, b, c = (f"127.0.0.1:{ports[n]}" for n in "abc")
    fastlb, port, admin = start_balancer(procs, [ports["a"], ports["b"]], token_file)

    def answers(n=24):
        return {backend_name(port) for _ in range(n)}

    assert answers() == {"a", "b"}
    view = backends_view(admin)
    for field in ("state", "weight", "inflight", "connections", "ewma", "connect_time"):
        assert field in view[a]
    assert view[a]["state"] == "up" and view[a]["weight"] == 1
    assert view[a]["connect_time"]["p50"] is not None

    # disable (maintenance): no worker sends it anything; enable brings it back.
    api(admin, "POST", f"/api/backends/{a}/state", {"state": "disable"})
    assert backends_view(admin)[a]["state"] == "down"
    assert answers() == {"b"}
    api(admin, "POST", f"/api/backends/{a}/state", {"state": "enable"})
    assert answers() == {"a", "b"}
    # drain: live connections finish, new ones go elsewhere.
    with connect(port) as live:
        name = read_line(live).decode().strip()
        address = a if name == "a" else b
        api(admin, "POST", f"/api/backends/{address}/state", {"state": "drain"})
        assert backends_view(admin)[address]["state"] == "drain"
        assert answers() == {"b" if name == "a" else "a"}
        live.sendall(b"still\n")
        assert read_line(live) == b"still\n"
    api(admin, "POST", f"/api/backends/{address}/state", {"state": "enable"})
    # weight: 0 takes it out of the rotation in every worker.
    api(admin, "POST", f"/api/backends/{b}/weight", {"weight": 0})
    assert backends_view(admin)[b]["weight"] == 0
    assert answers() == {"a"}
    api(admin, "POST", f"/api/backends/{b}/weight", {"weight": 3})
    assert answers() == {"a", "b"}
    # add and remove.
    api(admin, "POST", "/api/backends", {"address": c, "weight": 2}, expect=201)
    assert backends_view(admin)[c]["weight"] == 2
    assert "c" in answers(30)
    api(admin, "DELETE", f"/api/backends/{a}")
    assert a not in backends_view(admin)
    assert answers() == {"b", "c"}
    # Errors: bad values and unknown backends, with the token.
    assert request(admin, "POST", f"/api/backends/{b}/weight", TOKEN, {"weight": 999})[0] == 400
    assert request(admin, "POST", f"/api/backends/{b}/state", TOKEN, {"state": "sideways"})[0] == 400
    assert request(admin, "POST", "/api/backends/127.0.0.1:1/weight", TOKEN, {"weight": 1})[0] == 404
    assert request(admin, "POST", "/api/backends", TOKEN, {"address": c})[0] == 409
    assert request(admin, "GET", "/api/reload", TOKEN)[0] == 405
    # Both workers applied each change (each logs it).
    for line in (f"backend {c} added", f"backend {a} removed"):
        wait_until(lambda: sum(line in l and "worker" in l for l in fastlb.lines) == 2, what=line)


def test_ctl_client(procs, token_file):
    _, ports = procs.backends("a", "b")
    a = f"127.0.0.1:{ports['a']}"
    _, port, admin = start_balancer(procs, ports.values(), token_file, workers=1)

    def ctl(*args, token=True):
        command = [sys.executable, "-m", "fastlb", "ctl", "--admin", f"127.0.0.1:{admin}"]
        if token:
            command += ["--token-file", token_file]
        return subprocess.run(command + list(args), capture_output=True, text=True, timeout=20,
                              env=subprocess_env(), cwd=REPO)

    denied = ctl("backends", token=False)
    assert denied.returncode == 1 and "401" in denied.stderr
    listing = ctl("backends")
    assert listing.returncode == 0 and a in listing.stdout
    assert ctl("set-weight", a, "4").returncode == 0
    assert ctl("drain", a).returncode == 0
    assert backends_view(admin)[a]["admin_state"] == "drain"
    assert ctl("enable", a).returncode == 0
    assert ctl("disable", a).returncode == 0
    assert backends_view(admin)[a]["state"] == "down"
    assert ctl("enable", a).returncode == 0
    view = backends_view(admin)[a]
    assert (view["state"], view["weight"]) == ("up", 4)
    extra = f"127.0.0.1:{free_port()}"
    assert ctl("add", extra, "--weight", "2").returncode == 0
    assert backends_view(admin)[extra]["weight"] == 2
    assert ctl("remove", extra).returncode == 0
    assert extra not in backends_view(admin)
    missing = ctl("remove", extra)
    assert missing.returncode == 1 and "404" in missing.stderr
    # A reload makes the configuration (here: the flags) the truth again for its backends, as HAProxy's
    # reload forgets runtime weights.
    reload = ctl("reload")
    assert reload.returncode == 0 and "1 backend change" in reload.stdout
    assert backends_view(admin)[a]["weight"] == 1
    assert backend_name(port) in ("a", "b")


def test_metrics_add_up_across_two_workers(procs, token_file, tmp_path):
    _, ports = procs.backends("a", "bb")
    log_path = tmp_path / "access.log"
    fastlb, port, admin = start_balancer(procs, ports.values(), token_file, "--access-log", str(log_path),
                                         "--access-log-format", "json")
    count = 40
    names = [ping(port) for _ in range(count)]
    a, b = f"127.0.0.1:{ports['a']}", f"127.0.0.1:{ports['bb']}"
    expected = {a: names.count("a"), b: names.count("bb")}
    assert expected[a] and expected[b]

    def settled():
        # A connection is counted as its close begins (TCP_INFO needs the sockets open) and gives its
        # slot back once both sockets are closed: wait for both.
        samples = metrics(admin)
        if metric(samples, "fastlb_pool_connections_total", pool="default") != count:
            return None
        return samples if metric(samples, "fastlb_pool_active", pool="default") == 0 else None

    samples = wait_until(settled, what=f"{count} connections counted and closed")
    for address, name in ((a, "a"), (b, "bb")):
        n = expected[address]
        labels = {"pool": "default", "backend": address}
        assert metric(samples, "fastlb_backend_connections_total", **labels) == n
        assert metric(samples, "fastlb_backend_bytes_in_total", **labels) == n * len(b"ping\n")
        assert metric(samples, "fastlb_backend_bytes_out_total", **labels) == n * (len(name) + 1 + 5)
        assert metric(samples, "fastlb_backend_connect_seconds_count", **labels) == n
        assert metric(samples, "fastlb_backend_connect_seconds_bucket", le="+Inf", **labels) == n
        assert metric(samples, "fastlb_backend_up", **labels) == 1
        assert metric(samples, "fastlb_backend_inflight", **labels) == 0
        assert metric(samples, "fastlb_backend_connect_errors_total", **labels) == 0
    assert metric(samples, "fastlb_workers") == 2
    assert metric(samples, "fastlb_pool_bytes_in_total", pool="default") == count * 5
    # Both workers served some of it: the sum above is over two processes.
    lines = wait_until(lambda: (lambda l: l if len(l) == count else None)(
        log_path.read_text().splitlines() if log_path.exists() else []), what="access log lines")
    entries = [json.loads(line) for line in lines]
    assert {e["backend"] for e in entries} == {a, b}
    assert all(e["bytes_in"] == 5 and e["status"] == "-" and e["pool"] == "default" for e in entries)
    assert all(e["client"].startswith("127.0.0.1:") and e["total_ms"] >= e["connect_ms"] >= 0 for e in entries)
    worker_pids = {int(m) for m in __import__("re").findall(r"worker \d started \(pid (\d+)\)", fastlb.output)}
    assert len(worker_pids) == 2
    # A killed worker's counters are not lost: the master keeps its last report.
    os.kill(max(worker_pids), signal.SIGKILL)
    fastlb.wait_for_line(r"killed by SIGKILL; restarting")
    wait_until(lambda: api(admin, "GET", "/api/backends")["workers"] == 2, what="the replacement reporting")
    samples = metrics(admin)
    assert metric(samples, "fastlb_pool_connections_total", pool="default") >= count - 0  # never backwards


def test_access_log_text_to_stdout_one_worker(procs, token_file):
    _, ports = procs.backends("a")
    port = free_port()
    fastlb = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                          "--access-log", "-")
    ping(port)
    match = fastlb.wait_for_line(rf"^\S+Z 127\.0\.0\.1:\d+ default 127\.0\.0\.1:{ports['a']} - 5 7 [\d.]+ [\d.]+$")
    assert match


# ---- the stats page in a real headless Chromium ------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def run_chromium(chromium, profile, *args, timeout=60):
    """One headless Chromium run in its own session, killed with everything it forked when it is done
    or over time."""
    proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def png_rows(data):
    """Width, height and the distinct filtered scanline bytes of a PNG (enough to tell a blank image)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    offset, idat = 8, b""
    while offset < len(data):
        length = int.from_bytes(data[offset:offset + 4], "big")
        kind = data[offset + 4:offset + 8]
        if kind == b"IDAT":
            idat += data[offset + 8:offset + 8 + length]
        offset += 12 + length
    return width, height, zlib.decompress(idat)


def test_stats_page_renders_in_chromium(procs, token_file, tmp_path):
    chromium = ensure_debian_tool("chromium", "chromium")
    _, ports = procs.backends("a", "b")
    _, port, admin = start_balancer(procs, ports.values(), token_file)
    for _ in range(6):
        ping(port)
    api(admin, "POST", f"/api/backends/127.0.0.1:{ports['b']}/state", {"state": "drain"})
    url = f"http://127.0.0.1:{admin}/stats"
    # --virtual-time-budget lets the page's fetch and first render finish before the DOM is taken.
    code, dom, err = run_chromium(chromium, tmp_path / "profile-dom", "--virtual-time-budget=5000",
                                  "--dump-dom", url)
    assert code == 0, err[-2000:]
    assert 'data-loaded="yes"' in dom, dom[-2000:]
    for name, state in (("a", "up"), ("b", "drain")):
        address = f"127.0.0.1:{ports[name]}"
        assert f'data-address="{address}"' in dom
        row = dom.split(f'data-address="{address}"', 1)[1].split("</tr>", 1)[0]
        assert f'<td class="{state}">{state}</td>' in row, row
    assert "2 worker(s)" in dom
    shot = tmp_path / "stats.png"
    code, _, err = run_chromium(chromium, tmp_path / "profile-shot", "--virtual-time-budget=5000",
                                "--window-size=1400,400", f"--screenshot={shot}", url)
    assert code == 0, err[-2000:]
    data = shot.read_bytes()
    width, height, pixels = png_rows(data)
    assert (width, height) == (1400, 400)
    assert len(set(pixels)) > 16, "the screenshot is blank"


# ---- hot reload under load ------------------------------------------------------------------------------

def write_config(path, port, backends, workers, connect_timeout="2s", extra=""):
    lines = ['mode = "tcp"', f"workers = {workers}", f'connect_timeout = "{connect_timeout}"', "grace_period = \"5s\"",
             extra, "[[bind]]", f'address = "127.0.0.1:{port}"']
    for address, weight in backends:
        lines += ["[[backend]]", f'address = "{address}"', f"weight = {weight}"]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)                 # atomic: a reload never reads half a file


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_under_load_drops_nothing(procs, token_file, tmp_path, workers):
    _, ports = procs.backends("a", "b", "c")
    a, b, c = (f"127.0.0.1:{ports[n]}" for n in "abc")
    port, admin = free_port(), free_port()
    config = tmp_path / "lb.toml"
    write_config(config, port, [(a, 1), (b, 1)], workers)
    fastlb = procs.fastlb("--config", str(config), "--admin", str(admin), "--admin-token-file", token_file,
                          wait_port=port)
    load = ConnectionLoad(port, max_seconds=40).start()
    try:
        wait_until(lambda: len(load.answers) >= 20, what="load before the reload")
        # Backends change (a reweighted, b removed, c added), and with 2 workers a setting that needs new
        # workers too (the connect timeout): they start beside the old ones, which drain.
        write_config(config, port, [(a, 2), (c, 1)], workers,
                     connect_timeout="3s" if workers > 1 else "2s")
        mark = len(fastlb.lines)
        fastlb.signal(signal.SIGHUP)
        if workers > 1:
            fastlb.wait_for_line(r"reload: 2 new worker\(s\) running; 2 old worker\(s\) draining", start=mark)
            wait_until(lambda: sum(" exited with status 0" in line and "old worker" in line
                                   for line in fastlb.lines[mark:]) == 2, what="both old workers gone")
        else:
            fastlb.wait_for_line(r"reloaded: 3 backend change\(s\)", start=mark)
        after = time.monotonic()
        wait_until(lambda: load.first_answer_by("c", since=after), what="the new backend serving")
        view = backends_view(admin)
        assert set(view) == {a, c} and view[a]["weight"] == 2
        wait_until(lambda: not any(t > after + 0.5 and n == "b" for t, n in load.answers[-5:]),
                   what="no more answers from the removed backend")
        # A broken config is refused with file:line: field, and the running one stays.
        config.write_text(config.read_text().replace("weight = 2", 'weight = "heavy"'))
        mark = len(fastlb.lines)
        fastlb.signal(signal.SIGHUP)
        fastlb.wait_for_line(rf"reload failed, keeping the running configuration: {config}:\d+: "
                             rf"backend\[1\]\.weight: expected an integer", start=mark)
        count = len(load.answers)
        wait_until(lambda: len(load.answers) >= count + 20, what="load after the failed reload")
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert fastlb.popen.poll() is None


# ---- discovery --------------------------------------------------------------------------------------------

def test_discovery_from_a_watched_file(procs, token_file, tmp_path):
    _, ports = procs.backends("a", "b")
    a, b = (f"127.0.0.1:{ports[n]}" for n in "ab")
    listing = tmp_path / "backends"
    replace_file(listing, f"# discovered\n{a}\n")
    port, admin = free_port(), free_port()
    procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--backends-file", str(listing), "--workers", "2",
                 "--admin", str(admin), "--admin-token-file", token_file, wait_port=port)
    wait_until(lambda: {backend_name(port) for _ in range(6)} == {"a"}, what="a from the file")
    replace_file(listing, f"{a}\n{b},weight=2\n")
    wait_until(lambda: "b" in {backend_name(port) for _ in range(6)}, what="b added from the file")
    assert backends_view(admin)[b]["weight"] == 2
    replace_file(listing, f"{b}\n")
    wait_until(lambda: a not in backends_view(admin), what="a removed")
    assert {backend_name(port) for _ in range(10)} == {"b"}


DNSMASQ_CONFIG = """\
port={port}
listen-address=127.0.0.1
bind-interfaces
no-resolv
no-hosts
local=/test/
pid-file=
user=root
log-facility=-
host-record=be.test,127.0.0.1
"""


def start_dnsmasq(procs, dnsmasq, tmp_path, port, srv_ports, generation):
    conf = tmp_path / f"dnsmasq-{generation}.conf"
    conf.write_text(DNSMASQ_CONFIG.format(port=port) + "".join(
        f"srv-host=_echo._tcp.svc.test,be.test,{p},0,10\n" for p in srv_ports))
    proc = procs.start([dnsmasq, "--keep-in-foreground", f"--conf-file={conf}"], "dnsmasq")
    proc.wait_for_line(r"started, version")
    return proc


def test_discovery_from_dns_srv(procs, token_file, tmp_path):
    dnsmasq = ensure_debian_tool("dnsmasq", "dnsmasq-base")
    _, ports = procs.backends("a", "b")
    a, b = (f"127.0.0.1:{ports[n]}" for n in "ab")
    dns_port = free_port()
    dns = start_dnsmasq(procs, dnsmasq, tmp_path, dns_port, [ports["a"]], 1)
    port, admin = free_port(), free_port()
    fastlb = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--backends-dns", "_echo._tcp.svc.test",
                          "--dns-server", f"127.0.0.1:{dns_port}", "--dns-interval", "200ms",
                          "--admin", str(admin), "--admin-token-file", token_file, wait_port=0)
    wait_until(lambda: port_open(admin), what="the admin bind")
    wait_until(lambda: a in backends_view(admin), what="a from DNS")
    assert {backend_name(port) for _ in range(4)} == {"a"}
    # The DNS server changes its records: b appears, a goes.
    dns.kill()
    mark = len(fastlb.lines)
    fastlb.wait_for_line(r"DNS lookup of _echo._tcp.svc.test .* failed", start=mark)
    assert a in backends_view(admin)            # a failed lookup keeps the last backends
    start_dnsmasq(procs, dnsmasq, tmp_path, dns_port, [ports["b"]], 2)
    wait_until(lambda: set(backends_view(admin)) == {b}, what="b replacing a")
    assert {backend_name(port) for _ in range(4)} == {"b"}


def test_backend_added_through_the_api_is_health_checked_before_traffic(procs, token_file):
    _, ports = procs.backends("a", "b")
    b = f"127.0.0.1:{ports['b']}"
    dead = f"127.0.0.1:{free_port()}"
    fastlb, port, admin = start_balancer(procs, [ports["a"]], token_file, "--check", "tcp",
                                         "--check-interval", "100ms", "--rise", "2")
    api(admin, "POST", "/api/backends", {"address": dead}, expect=201)
    api(admin, "POST", "/api/backends", {"address": b}, expect=201)
    # b passes its checks and takes traffic in both workers; the dead one never gets a connection.
    fastlb.wait_for_line(rf"backend {b} UP")
    wait_until(lambda: backends_view(admin)[b]["state"] == "up", what="b up in every worker")
    assert backends_view(admin)[dead]["state"] == "down"
    assert {backend_name(port) for _ in range(20)} == {"a", "b"}
    samples = metrics(admin)
    assert metric(samples, "fastlb_backend_up", pool="default", backend=dead) == 0
    assert metric(samples, "fastlb_backend_connect_errors_total", pool="default", backend=dead) == 0


def test_connect_errors_and_retries_are_counted(procs, token_file):
    _, ports = procs.backends("a")
    dead_port = free_port()
    a, dead = f"127.0.0.1:{ports['a']}", f"127.0.0.1:{dead_port}"
    _, port, admin = start_balancer(procs, [ports["a"], dead_port], token_file, "--outlier-failures", "0",
                                    workers=1)
    assert {ping(port) for _ in range(10)} == {"a"}       # every failed connect retried on a
    samples = retried_connects_counted(admin, a, dead, 10)
    assert metric(samples, "fastlb_backend_connections_total", pool="default", backend=a) == 10


def retried_connects_counted(admin: int, good: str, dead: str, connections: int):
    """The metrics once `connections` connections reached `good`, checked for the connect errors on
    `dead` (at least 4 of them) and as many retries on `good` and in the pool; returns the samples.
    (Counted when the relay closes, just after the client's close: it waits for the last one.)"""
    samples = wait_until(lambda: (lambda m: m if metric(m, "fastlb_backend_connections_total", pool="default",
                                                        backend=good) == connections else None)(metrics(admin)),
                         what=f"{connections} connections counted")
    errors = metric(samples, "fastlb_backend_connect_errors_total", pool="default", backend=dead)
    assert errors >= 4
    assert metric(samples, "fastlb_backend_retries_total", pool="default", backend=good) == errors
    assert metric(samples, "fastlb_pool_retries_total", pool="default") == errors
    return samples


def test_operations_settings_are_validated_with_file_line_and_field(tmp_path):
    def check(*args):
        return subprocess.run([sys.executable, "-m", "fastlb", *args], capture_output=True, text=True,
                              timeout=20, env=subprocess_env(), cwd=REPO)

    config = tmp_path / "lb.toml"
    config.write_text('bind = "127.0.0.1:8080"\nbackend = "127.0.0.1:9000"\naccess_log_format = "xml"\n')
    result = check("--check-config", str(config))
    assert result.returncode == 2
    assert f"{config}:3: access_log_format:" in result.stderr, result.stderr
    short = tmp_path / "short-token"
    short.write_text("abc\n")
    config.write_text('bind = "127.0.0.1:8080"\nbackends_file = "/etc/fastlb/backends"\nadmin = 9000\n')
    result = check("--check-config", str(config))
    assert result.returncode == 0, result.stderr          # discovery alone may supply the backends
    config.write_text('bind = "127.0.0.1:8080"\nbackend = "127.0.0.1:9000"\nadmin_token_file = "' +
                      str(short) + '"\n')
    result = check("--check-config", str(config))
    assert result.returncode == 2 and f"{config}:3 (admin_token_file): token file" in result.stderr, result.stderr


def test_http_metrics_add_up_by_pool_and_status_class_across_two_workers(procs, token_file, tmp_path):
    """HTTP mode (the default): known requests through two workers to a top-level pool, a named pool
    chosen by a route, and a named pool whose backend is down; /metrics counts them per pool, backend
    and status class, the response-time histogram has one observation per answered request, 503s count
    as refused, the access log has a line per request, and /api/backends lists the named pools."""
    from http_client import Client

    _, ports = procs.http_backends("a", "b")
    dead = free_port()
    a, b, dead_address = f"127.0.0.1:{ports['a']}", f"127.0.0.1:{ports['b']}", f"127.0.0.1:{dead}"
    port, admin = free_port(), free_port()
    log_path = tmp_path / "access.log"
    config = tmp_path / "lb.toml"
    config.write_text("\n".join([
        "workers = 2", "outlier_failures = 0", 'access_log_format = "json"',
        f'access_log = "{log_path}"', f'bind = "127.0.0.1:{port}"', f'backend = "{a}"',
        "[[pool]]", 'name = "api"', f'backend = ["{b}"]',
        "[[pool]]", 'name = "dead"', f'backend = ["{dead_address}"]',
        "[[route]]", 'pool = "api"', 'header = "X-Pool: api"',
        "[[route]]", 'pool = "dead"', 'header = "X-Pool: dead"']) + "\n")
    fastlb = procs.fastlb("--config", str(config), "--admin", str(admin), "--admin-token-file", token_file,
                          wait_port=0)
    wait_until(lambda: fastlb.output.count("INFO listening on") == 2, what="workers listening")
    wait_until(lambda: port_open(admin), what="the admin bind")
    wait_until(lambda: api(admin, "GET", "/api/backends")["workers"] == 2, what="workers reporting")

    # (pool header, path, status) -> how many; every request on a connection of its own, so the kernel
    # spreads them over both workers (SO_REUSEPORT).
    plan = {(None, "/hello", 200): 12, (None, "/status?code=404", 404): 5, (None, "/status?code=500", 500): 4,
            ("api", "/hello", 200): 7, ("api", "/status?code=302", 302): 3, ("dead", "/hello", 503): 6}
    for (pool, path, status), count in plan.items():
        for _ in range(count):
            with Client(port) as client:
                response = client.request("GET", path, {"X-Pool": pool} if pool else None)
                assert response.status == status, (pool, path, response.status)
    total = sum(plan.values())
    answered = {a: 12 + 5 + 4, b: 7 + 3}

    def settled():
        samples = metrics(admin)
        requests = sum(metric(samples, "fastlb_pool_requests_total", pool=p) or 0 for p in ("default", "api"))
        return samples if requests == sum(answered.values()) else None

    samples = wait_until(settled, what="every request counted")
    expected = {("default", a): {"2xx": 12, "3xx": 0, "4xx": 5, "5xx": 4},
                ("api", b): {"2xx": 7, "3xx": 3, "4xx": 0, "5xx": 0}}
    for (pool, address), classes in expected.items():
        labels = {"pool": pool, "backend": address}
        n = sum(classes.values())
        assert metric(samples, "fastlb_backend_requests_total", **labels) == n
        for code, count in classes.items():
            assert metric(samples, "fastlb_backend_responses_total", code=code, **labels) == count, (pool, code)
            assert metric(samples, "fastlb_pool_responses_total", pool=pool, code=code) == count
        assert metric(samples, "fastlb_backend_response_seconds_count", **labels) == n
        buckets = [v for (name, lbls), v in samples.items()
                   if name == "fastlb_backend_response_seconds_bucket" and ("backend", address) in lbls
                   and ("pool", pool) in lbls]
        assert len(buckets) > 2 and max(buckets) == n
        assert metric(samples, "fastlb_backend_response_seconds_bucket", le="+Inf", **labels) == n
        assert metric(samples, "fastlb_backend_response_seconds_sum", **labels) > 0
        assert metric(samples, "fastlb_backend_bytes_in_total", **labels) > 0
        assert metric(samples, "fastlb_backend_bytes_out_total", **labels) > 0
        assert metric(samples, "fastlb_pool_requests_total", pool=pool) == n
    # No backend for pool "dead": connect errors on its backend, 503s counted as refused there only.
    dead_labels = {"pool": "dead", "backend": dead_address}
    assert metric(samples, "fastlb_backend_requests_total", **dead_labels) == 0
    assert metric(samples, "fastlb_backend_connect_errors_total", **dead_labels) == 6
    assert metric(samples, "fastlb_pool_refused_total", pool="dead") == 6
    assert metric(samples, "fastlb_pool_refused_total", pool="default") == 0
    assert metric(samples, "fastlb_workers") == 2
    # The API lists every pool, top-level first; only the top-level one changes through it.
    view = api(admin, "GET", "/api/backends")
    assert [(p["name"], [x["address"] for x in p["backends"]]) for p in view["pools"]] == [
        ("default", [a]), ("api", [b]), ("dead", [dead_address])]
    lines = wait_until(lambda: (lambda l: l if len(l) == total else None)(
        log_path.read_text().splitlines() if log_path.exists() else []), what="access log lines")
    entries = [json.loads(line) for line in lines]
    assert collections.Counter((e["pool"], e["status"]) for e in entries) == collections.Counter(
        {("default", 200): 12, ("default", 404): 5, ("default", 500): 4, ("api", 200): 7, ("api", 302): 3,
         ("dead", 503): 6})
    assert all(e["method"] == "GET" and e["client"] == "127.0.0.1" for e in entries)
    assert {e["backend"] for e in entries if e["status"] == 503} == {"-"}
    # A killed worker's counters stay in the totals (the master keeps its last report).
    worker_pids = {int(m) for m in re.findall(r"worker \d started \(pid (\d+)\)", fastlb.output)}
    assert len(worker_pids) == 2
    os.kill(max(worker_pids), signal.SIGKILL)
    fastlb.wait_for_line(r"killed by SIGKILL; restarting")
    wait_until(lambda: api(admin, "GET", "/api/backends")["workers"] == 2, what="the replacement reporting")
    samples = metrics(admin)
    for (pool, address), classes in expected.items():
        labels = {"pool": pool, "backend": address}
        assert metric(samples, "fastlb_backend_requests_total", **labels) == sum(classes.values())
        assert metric(samples, "fastlb_backend_response_seconds_count", **labels) == sum(classes.values())
    assert metric(samples, "fastlb_pool_refused_total", pool="dead") == 6
