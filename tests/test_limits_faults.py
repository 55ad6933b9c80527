"""Robust at the limits (issue 20, items 1-6, 10, 11): file descriptors, connection limits, drain, too many
workers, bad config. Each test drives a real fastlb with a real limit (`prlimit` on its process), backend,
signal or config file, on both HTTP data paths where the item concerns them (the C engine, and
FASTLB_HTTP_ENGINE=python, as tests/conftest.py's http_engine fixture switches them)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from fastlb.config import RESERVED_FDS, ConfigError, connection_limits, load_file
from http_client import Client, KeepAliveLoad, requests_seen
from procs import REPO, backend_name, free_port, port_open, subprocess_env, wait_until

def start_fastlb(procs, *args, nofile=None, wait=True):
    """`python -m fastlb ARGS`, under an open-files limit of `nofile` (soft and hard) when given."""
    command = [sys.executable, "-m", "fastlb", *args]
    if nofile is not None:
        command = ["prlimit", f"--nofile={nofile}:{nofile}", "--", *command]
    proc = procs.start(command, "fastlb")
    if wait:
        port = int(args[args.index("--bind") + 1].rsplit(":", 1)[1])
        proc.wait_for_line(r"listening on")
        wait_until(lambda: port_open(port), what=f"fastlb on port {port}")
    return proc


def run_fastlb(*args, timeout=20):
    return subprocess.run([sys.executable, "-m", "fastlb", *args], capture_output=True, text=True,
                          env=subprocess_env(), cwd=REPO, timeout=timeout)


def get(port, path="/", timeout=5.0):
    with Client(port, timeout=timeout) as client:
        return client.request("GET", path)


def worker_pid(proc) -> int:
    return int(proc.wait_for_line(r"fastlb\[(\d+)\] worker 0: INFO listening on").group(1))


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of a process, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def hold_connections(port: int, count: int) -> list[socket.socket]:
    """`count` idle client connections (non-blocking connects: those fastlb does not accept wait in its
    backlog)."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(sock)
    return socks


# ---- 1. maxconn and the queue, sized together from the open-files limit ------------------------------

def test_connection_limits_leave_the_connections_most_files():
    # The old sizing gave maxconn 1 here: the default queue of 1024 took every file.
    assert connection_limits(1024, None, 1024) == (384, 192, 384)
    maxconn, queue, _ = connection_limits(1024, None, 1024)
    assert 2 * maxconn + queue + RESERVED_FDS <= 1024 and queue < maxconn
    assert connection_limits(65536, None, 1024)[:2] == (32224, 1024)        # a roomy limit: as before
    assert connection_limits(1024, 100, 1024)[:2] == (100, 192)              # an explicit maxconn fits
    assert connection_limits(1024, 5000, 1024)[:2] == (384, 192)             # ... or is capped


def test_default_maxconn_serves_64_clients_under_a_1024_files_limit(procs, engine):
    backend, ports = procs.http_backends("a")
    port = free_port()
    fastlb = start_fastlb(procs, "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                          nofile=1024)
    warning = fastlb.wait_for_line(r"WARNING the open-files limit is 1024 \(hard limit 1024\): it allows "
                                   r"maxconn (\d+) and a wait queue of (\d+) per worker; raise the limit")
    assert "ulimit -n" in warning.string
    maxconn, queue = int(warning.group(1)), int(warning.group(2))
    assert (maxconn, queue) == (384, 192)
    assert fastlb.wait_for_line(r"listening on .*maxconn (\d+), queue (\d+)").groups() == ("384", "192")
    loads = [KeepAliveLoad(port, "/slow?ms=5", max_seconds=30, max_requests=10).start() for _ in range(64)]
    for load in loads:
        load.thread.join(40)
    assert [f for load in loads for f in load.failures] == []
    assert sum(len(load.answers) for load in loads) == 640


# ---- 2. requests waiting for a slot take the idle backend connections -------------------------------

def test_queued_requests_reuse_backend_connections(procs, engine):
    backend, ports = procs.http_backends("a")
    port = free_port()
    start_fastlb(procs, "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}", "--maxconn", "8")
    start = len(backend.lines)
    # 9 keep-alive clients for 8 slots: one request always waits for a slot.
    loads = [KeepAliveLoad(port, "/", max_seconds=30, max_requests=40).start() for _ in range(9)]
    for load in loads:
        load.thread.join(40)
    assert [f for load in loads for f in load.failures] == []
    seen = requests_seen(backend, start, at_least=360)
    connections = {request["conn"] for request in seen}
    # At most a connection per slot on each data path (the engine keeps its own idle ones); before, every
    # request that had waited opened a new one (1,008 in 3 s with wrk -c9).
    assert len(connections) <= 2 * 8 + 1, f"{len(connections)} backend connections for {len(seen)} requests"


# ---- 3. fastlb's own EMFILE is not the backend's fault -----------------------------------------------

def set_soft_nofile(pid: int, soft: int) -> int:
    """Sets a running process's soft open-files limit (the hard one stays: raising it back would need
    CAP_SYS_RESOURCE); returns the soft limit it had."""
    with open(f"/proc/{pid}/limits") as f:
        old_soft, hard = next(line for line in f if line.startswith("Max open files")).split()[3:5]
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:{hard}"], check=True)
    return int(old_soft)


def test_own_file_limit_on_connect_does_not_eject_the_backend(procs, engine):
    backend, ports = procs.http_backends("a", "b")
    port = free_port()
    fastlb = start_fastlb(procs, "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                          "--backend", f"127.0.0.1:{ports['b']}", "--backend-max-idle", "0",
                          "--outlier-failures", "2")
    pid = worker_pid(fastlb)
    clients = [Client(port) for _ in range(4)]
    for client in clients:
        assert client.request("GET", "/").status == 200      # accepted, and each kept alive
    # No file can be opened any more (those open stay usable): a limit of 3 leaves stdio only.
    soft = set_soft_nofile(pid, 3)
    try:
        for _ in range(3):
            for client in clients:
                assert client.request("GET", "/").status == 503
    finally:
        set_soft_nofile(pid, soft)
    line = fastlb.wait_for_line(r"connect to 127\.0\.0\.1:\d+ failed in fastlb, not at the backend: "
                                r"Too many open files").string
    assert "not counted against the backend" in line
    # Both backends serve at once: neither was ejected (an ejection lasts 30 s).
    answered = {get(port).header("X-Backend") for _ in range(10)}
    assert answered == {"a", "b"}
    assert "ejected" not in fastlb.output
    for client in clients:
        client.close()


# ---- 4. accepting rests at the limit, never spins -------------------------------------------------------

def test_accept_pauses_at_the_open_files_limit_and_resumes(procs, engine):
    backend, ports = procs.http_backends("a")
    port, admin = free_port(), free_port()
    fastlb = start_fastlb(procs, "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                          "--admin", str(admin), nofile=256)
    pid = worker_pid(fastlb)
    # 256 files: maxconn 77, queue 38, so at most 256 - 64 - 77 = 115 clients; 300 idle ones come.
    held = hold_connections(port, 300)
    try:
        line = fastlb.wait_for_line(r"WARNING (\d+) client connections, the most the open-files limit "
                                    r"leaves \(open-files limit 256, 115 client connections at most\): "
                                    r"accepting paused").string
        assert "listen backlog" in line
        before = cpu_ticks(pid)
        time.sleep(2.0)              # a window at the limit: a spinning accept would take all of it
        used = cpu_ticks(pid) - before
        ticks_per_second = os.sysconf("SC_CLK_TCK")
        assert used < 0.25 * 2.0 * ticks_per_second, f"{used} ticks of CPU in 2 s at the limit"
        # The loop is free, and files are left for the admin bind (and backend connects).
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=5) as answer:
            assert answer.status == 200
    finally:
        for sock in held:
            sock.close()
    # The idle clients left: accepting resumed, a new client is served.
    assert wait_until(lambda: get(port).status == 200, what="a request after the pause")
    assert len([ln for ln in fastlb.lines if "accepting paused" in ln]) == 1       # logged once


@pytest.mark.parametrize("relay", ["epoll", "uvloop"])
def test_tcp_mode_accept_pauses_at_the_open_files_limit(procs, relay):
    _, ports = procs.backends("a")
    port = free_port()
    fastlb = start_fastlb(procs, "--mode", "tcp", "--relay", relay, "--bind", f"127.0.0.1:{port}",
                          "--backend", f"127.0.0.1:{ports['a']}", nofile=256)
    pid = worker_pid(fastlb)
    held = hold_connections(port, 300)
    try:
        fastlb.wait_for_line(r"WARNING 115 client connections, the most the open-files limit leaves")
        before = cpu_ticks(pid)
        time.sleep(2.0)
        used = cpu_ticks(pid) - before
        assert used < 0.25 * 2.0 * os.sysconf("SC_CLK_TCK"), f"{used} ticks of CPU in 2 s at the limit"
        # Files are left for the backend connections of the clients accepted: they are relayed.
        assert "Too many open files" not in fastlb.output
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: backend_name(port) == "a", what="a connection after the pause")


# ---- 5. SIGTERM: listening stops at once everywhere -----------------------------------------------------

def test_sigterm_with_workers_refuses_new_connections_at_once(procs, engine):
    backend, ports = procs.http_backends("a")
    port = free_port()
    fastlb = start_fastlb(procs, "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                          "--workers", "2", "--grace-period", "6s")
    for worker in (0, 1):
        fastlb.wait_for_line(rf"worker {worker}: INFO listening on")
    in_flight = []
    slow = threading.Thread(target=lambda: in_flight.append(get(port, "/slow?ms=1500").status))
    slow.start()
    idle = Client(port)
    assert idle.request("GET", "/").status == 200
    wait_until(lambda: any("/slow" in line for line in backend.lines), what="the slow request at the backend")
    fastlb.signal(signal.SIGTERM)
    fastlb.wait_for_line(r"SIGTERM: stopping 2 worker\(s\)")
    # Refused at once: no listening socket is left open in the master or a worker.
    wait_until(lambda: not port_open(port), timeout=2, what="the port to close")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    # The idle keep-alive connection is closed cleanly (EOF, no reset); the request in flight finishes.
    idle.sock.settimeout(5)
    assert idle.sock.recv(1) == b""
    idle.close()
    slow.join(10)
    assert in_flight == [200]
    assert fastlb.wait_exit(15) == 0


# ---- 6. too many workers ----------------------------------------------------------------------------------

def test_workers_are_bounded_by_the_cpus(tmp_path):
    config = tmp_path / "lb.toml"
    config.write_text('bind = "127.0.0.1:1"\nbackend = "127.0.0.1:2"\nworkers = 100000\n')
    result = run_fastlb("--check-config", str(config))
    assert result.returncode == 2
    assert "lb.toml:3 (workers): 100000 workers is more than 4 per CPU" in result.stderr
    assert "--allow-many-workers true" in result.stderr
    config.write_text('bind = "127.0.0.1:1"\nbackend = "127.0.0.1:2"\nworkers = 100000\n'
                      'allow_many_workers = true\n')
    assert run_fastlb("--check-config", str(config)).returncode == 0


def test_sigterm_stops_spawning_workers_at_once(procs):
    backend, ports = procs.http_backends("a")
    port = free_port()
    fastlb = start_fastlb(procs, "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                          "--workers", "64", "--allow-many-workers", "true", wait=False)
    fastlb.wait_for_line(r"worker 1 started")
    fastlb.signal(signal.SIGTERM)
    assert fastlb.wait_exit(20) == 0
    started = [line for line in fastlb.lines if " started (pid " in line]
    assert len(started) < 64, "every worker was forked after SIGTERM"
    assert fastlb.wait_for_line(r"SIGTERM: stopping (\d+) worker").group(1) == str(len(started))


# ---- 10. an access log that cannot be written -------------------------------------------------------------

@pytest.mark.parametrize("path, problem", [("/nonexistent/dir/x.log", "no directory /nonexistent/dir"),
                                           ("/tmp", "it is a directory")])
def test_unwritable_access_log_is_one_line_of_error(path, problem):
    for args in (("--check-config", "/dev/null"), ("--workers", "2")):
        result = run_fastlb("--bind", f"127.0.0.1:{free_port()}", "--backend", "127.0.0.1:2",
                            "--access-log", path, *args)
        assert result.returncode == 2
        assert result.stderr.strip() == f"fastlb: error: --access-log: cannot write the access log {path}: {problem}"


def test_worker_that_cannot_open_the_access_log_stops_the_master(procs, tmp_path):
    backend, ports = procs.http_backends("a")
    port = free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    fastlb = start_fastlb(procs, "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                          "--workers", "2", "--access-log", str(logs / "access.log"))
    pid = int(fastlb.wait_for_line(r"worker 0 started \(pid (\d+)\)").group(1))
    (logs / "access.log").unlink()
    logs.rmdir()
    os.kill(pid, signal.SIGKILL)                # its replacement cannot open the log
    fastlb.wait_for_line(r"ERROR cannot start: \[Errno 2\] No such file or directory")
    assert fastlb.wait_exit(20) == 1
    assert "Traceback" not in fastlb.output


def test_crash_looping_workers_make_the_master_give_up(procs):
    backend, ports = procs.http_backends("a")
    port = free_port()
    fastlb = start_fastlb(procs, "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                          "--workers", "2")
    killed: set[int] = set()
    while len(killed) < 5:
        pids = [int(pid) for pid in re.findall(r"worker 0 started \(pid (\d+)\)", fastlb.output)]
        fresh = [pid for pid in pids if pid not in killed]
        if not fresh:
            fastlb.wait_for_line(r"worker 0 started", start=len(fastlb.lines))
            continue
        os.kill(fresh[0], signal.SIGKILL)        # dies young (within 1 s of its start), again and again
        killed.add(fresh[0])
    fastlb.wait_for_line(r"ERROR workers died 5 times in a row within 1s of starting .*a crash loop; stopping")
    assert fastlb.wait_exit(20) == 1


# ---- 11. lenient values are errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend, message", [
    ('[[backend]]\naddress = "127.0.0.1:2"\nweight = "3"\n',
     'lb.toml:4: backend[1].weight: expected an integer, not the string \'3\' (write it without quotes)'),
    ('[[backend]]\naddress = "127.0.0.1:2"\nbackup = "yes"\n',
     "lb.toml:4: backend[1].backup: expected true or false, not the string 'yes'"),
    ('backend = ["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:2,weight=2"]\n',
     "backend[3] 127.0.0.1:2 is listed twice (also backend[1])"),
    ('backend = "bad host name!!:80"\n',
     "lb.toml:2: backend[1]: bad host 'bad host name!!': expected an IPv4 address, [IPv6] or a DNS name"),
])
def test_lenient_values_are_errors_naming_file_line_and_field(tmp_path, backend, message):
    path = tmp_path / "lb.toml"
    path.write_text('bind = "127.0.0.1:1"\n' + backend)
    result = run_fastlb("--check-config", str(path))
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_good_values_still_load(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text('bind = "127.0.0.1:1"\nworkers = "auto"\n[[backend]]\naddress = "db-1.internal_x:5432"\n'
                    'weight = 3\nbackup = false\n[[backend]]\naddress = "10.0.0.2:5432"\n')
    values, _ = load_file(str(path))
    assert [b.weight for b in values["backends"]] == [3, 1]


def test_a_bad_flag_gets_a_short_usage_line():
    result = run_fastlb("--bind", "127.0.0.1:1", "--backend", "127.0.0.1:2", "--no-such-flag")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["usage: fastlb --bind HOST:PORT --backend HOST:PORT [OPTION...]  (fastlb --help for all)",
                     "fastlb: error: unrecognized arguments: --no-such-flag"]
    bad_value = run_fastlb("--bind", "127.0.0.1:1", "--backend", "bad host!!:80")
    assert len(bad_value.stderr.strip().splitlines()) == 2
    assert "bad host 'bad host!!'" in bad_value.stderr


def test_config_error_type_is_raised_for_a_quoted_weight(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text('bind = "127.0.0.1:1"\n[[backend]]\naddress = "127.0.0.1:2"\nmaxconn = "10"\n')
    with pytest.raises(ConfigError, match=r"lb.toml:4: backend\[1\].maxconn: expected an integer"):
        load_file(str(path))


def test_admin_api_refuses_unknown_fields_and_untyped_values(procs, tmp_path):
    _, ports = procs.backends("a")
    port, admin = free_port(), free_port()
    token = "limits-token-0123456789"
    (tmp_path / "token").write_text(token)
    start_fastlb(procs, "--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                 "--admin", str(admin), "--admin-token-file", str(tmp_path / "token"))

    def post(path, body):
        request = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", method="POST",
                                         data=json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    status, body = post("/api/backends", {"address": "127.0.0.1:1", "colour": "red"})
    assert status == 400 and "unknown field 'colour'; this endpoint takes: address, weight, backup, pool" in body
    status, body = post("/api/backends", {"address": "127.0.0.1:1", "backup": "yes"})
    assert status == 400 and "backup: expected true or false" in body
    status, body = post(f"/api/backends/127.0.0.1:{ports['a']}/weight", {"weight": 2, "wieght": 3})
    assert status == 400 and "'wieght'" in body
    assert post("/api/backends", {"address": "127.0.0.1:1", "backup": True})[0] == 201
