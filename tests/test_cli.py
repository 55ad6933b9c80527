"""The `fastlb` command line: flags, their errors, start-up messages, the demo. Real processes."""
import signal
import subprocess
import sys
import urllib.request

import pytest

from procs import REPO, backend_name, free_port, subprocess_env


def run_fastlb(*args, timeout=20):
    return subprocess.run([sys.executable, "-m", "fastlb", *args], capture_output=True, text=True,
                          env=subprocess_env(), cwd=REPO, timeout=timeout)


def test_version():
    result = run_fastlb("--version")
    assert result.returncode == 0 and result.stdout.startswith("fastlb 0.")


def test_help_lists_every_flag_and_examples():
    result = run_fastlb("--help")
    assert result.returncode == 0
    for flag in ("--mode", "--bind", "--backend", "--algorithm", "--hash-key", "--workers", "--config",
                 "--check-config", "--connect-timeout", "--idle-timeout", "--maxconn", "--log-level",
                 "--version", "--retries", "--queue-timeout", "--grace-period", "examples:"):
        assert flag in result.stdout, flag


@pytest.mark.parametrize("args,expected", [
    (["--backend", "10.0.0.1"], "argument --backend: expected HOST:PORT"),
    (["--backend", "10.0.0.1:80,weight=-1"], "argument --backend: weight:"),
    (["--backend", "10.0.0.1:80,colour=red"], "argument --backend: unknown backend option 'colour=red'"),
    (["--bind", "127.0.0.1:70000"], "argument --bind: port must be 1-65535"),
    (["--algorithm", "fastest"], "argument --algorithm: unknown algorithm 'fastest'; choose one of: roundrobin"),
    (["--workers", "0"], "argument --workers: expected a number of processes >= 1, or 'auto'"),
    (["--connect-timeout", "-1"], "argument --connect-timeout: expected a duration"),
    (["--idle-timeout", "soon"], "argument --idle-timeout: expected a duration"),
    (["--maxconn", "0"], "argument --maxconn: expected an integer >= 1"),
    (["--log-level", "loud"], "argument --log-level: unknown log level 'loud'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_flag_fails_fast_naming_the_flag(args, expected):
    result = run_fastlb("--bind", "127.0.0.1:1", "--backend", "127.0.0.1:2", *args)
    assert result.returncode == 2
    assert expected in result.stderr, result.stderr


@pytest.mark.parametrize("args,expected", [
    (["--bind", "127.0.0.1:1"], "no backend: give --backend HOST:PORT"),
    (["--backend", "127.0.0.1:2"], "no listening address: give --bind HOST:PORT"),
    (["--bind", "127.0.0.1:1", "--backend", "127.0.0.1:2", "--hash-key", "source"],
     "--hash-key: hash key 'source' needs a hashing algorithm"),
    (["--bind", "127.0.0.1:1", "--backend", "127.0.0.1:2", "--mode", "tcp", "--algorithm", "ketama",
      "--hash-key", "uri"], "--hash-key: hash key 'uri' needs mode 'http'"),
    (["--bind", "127.0.0.1:1", "--backend", "127.0.0.1:2,backup"], "--backend: every backend is a backup"),
    (["--bind", "127.0.0.1:1", "--backend", "127.0.0.1:2", "--algorithm", "ketama", "--bounded-load", "0.5"],
     "--bounded-load: bounded load must be 0 (off) or >= 1.0"),
    (["--bind", "127.0.0.1:1", "--backend", "127.0.0.1:2", "--bounded-load", "1.25"],
     "--bounded-load: bounded load applies to the hashing algorithms"),
])
def test_inconsistent_flags_name_the_flag(args, expected):
    result = run_fastlb(*args)
    assert result.returncode == 2
    assert f"fastlb: error: {expected}" in result.stderr, result.stderr


def test_maxconn_beyond_the_open_files_limit_is_reported_at_start(procs):
    _, ports = procs.backends("a")
    port = free_port()
    fastlb = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                          "--maxconn", "15000")
    line = fastlb.wait_for_line(r"--maxconn 15000 cannot be honoured").string
    assert "2 open files" in line and "open-files limit is" in line and "Capping maxconn at" in line
    assert backend_name(port) == "a"            # and it runs, with the lower limit


def test_address_in_use_is_a_clear_error(procs):
    _, ports = procs.backends("a")
    port = free_port()
    procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}")
    second = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}", wait_port=0)
    assert second.wait_exit() == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in second.output


def test_demo_serves_curl_and_stops_cleanly_on_ctrl_c(procs):
    port = free_port()
    demo = procs.start([sys.executable, "-m", "fastlb", "demo", "--port", str(port)], "demo")
    demo.wait_for_line(rf"curl http://127\.0\.0\.1:{port}/")
    bodies = []
    for _ in range(3):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert response.status == 200
            bodies.append(response.read().decode())
    assert all(body.startswith("hello from demo backend") for body in bodies)
    assert len(set(bodies)) == 3                  # round robin over the three demo backends
    demo.signal(signal.SIGINT)
    assert demo.wait_exit() == 0
    assert "Traceback" not in demo.output and "fastlb demo: stopped" in demo.output
