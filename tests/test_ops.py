"""Operations with real processes: the admin API and its token, metrics summed over workers, the access
log, `fastlb ctl`, hot reload under load, and discovery from a file and from a real DNS server."""
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from procs import (REPO, ConnectionLoad, backend_name, connect, free_port, port_open, read_line,
                   subprocess_env, wait_until)

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
    args = ["--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--admin", str(admin),
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
        samples = metrics(admin)
        return samples if metric(samples, "fastlb_pool_connections_total", pool="default") == count else None

    samples = wait_until(settled, what=f"{count} connections counted")
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
    fastlb = procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                          "--access-log", "-")
    ping(port)
    match = fastlb.wait_for_line(rf"^\S+Z 127\.0\.0\.1:\d+ default 127\.0\.0\.1:{ports['a']} - 5 7 [\d.]+ [\d.]+$")
    assert match
